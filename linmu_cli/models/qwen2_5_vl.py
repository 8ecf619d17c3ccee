"""Qwen2.5-VL: same decoder layout and token conventions as Qwen2-VL (window attention is in the vision tower)."""

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

from linmu_cli.models.family import Family, register_family

QWEN2_5_VL = register_family(
    Family("qwen2_5_vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel)
)
