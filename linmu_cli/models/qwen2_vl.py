"""Qwen2-VL: the decoder layers sit at model.model.language_model.layers; segments from image/video tokens."""

from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel

from linmu_cli.models.family import Family, register_family

QWEN2_VL = register_family(Family("qwen2_vl", Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel))
