"""Qwen2.5-VL as a LinMU family: the LinMU config / bare model / LM-head model, written out on transformers' classes.

Same decoder layout and token conventions as Qwen2-VL (`qwen2_vl.py`): window attention lives in the vision
tower, which a LinMU model keeps unchanged; only the decoder's self-attentions become M-MATE blocks
(docs/design.md §1). `linmu_cli.models` registers the classes with transformers' Auto classes.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    GenerationMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLProcessor,
)
from transformers.utils import ModelOutput

from linmu_cli.models.family import Family, register_family
from linmu_cli.models.modeling_linmu import LinMUGenerationMixin, LinMUModelMixin, same_signature_as


class LinMUQwen2_5_VLConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL's config plus `mate`: the M-MATE sizes as a `MateConfig` dict (saved in config.json)."""

    model_type = "linmu_qwen2_5_vl"


class LinMUQwen2_5_VLModel(LinMUModelMixin, Qwen2_5_VLModel):
    """Qwen2.5-VL's bare model (no LM head) with M-MATE decoder blocks: what `AutoModel` loads."""

    config_class = LinMUQwen2_5_VLConfig

    @same_signature_as(Qwen2_5_VLModel.forward)
    def forward(self, *args: Any, **kwargs: Any) -> ModelOutput:
        """Qwen2_5_VLModel.forward's arguments; see LinMUModelMixin.forward."""
        return super().forward(*args, **kwargs)


# GenerationMixin named directly, as transformers asks of generative classes
class LinMUQwen2_5_VLForConditionalGeneration(
    LinMUGenerationMixin, Qwen2_5_VLForConditionalGeneration, GenerationMixin
):
    """Qwen2.5-VL with M-MATE decoder blocks: what `AutoModelForImageTextToText` loads and `generate()` decodes
    with a constant-size LinMUCache (docs/design.md §3-4)."""

    config_class = LinMUQwen2_5_VLConfig

    @same_signature_as(Qwen2_5_VLForConditionalGeneration.forward)
    def forward(self, *args: Any, **kwargs: Any) -> ModelOutput:
        """Qwen2_5_VLForConditionalGeneration.forward's arguments; see LinMUModelMixin.forward."""
        return super().forward(*args, **kwargs)

    # callers (and transformers' tests) read which inputs generation takes (inputs_embeds) from the signature
    @same_signature_as(Qwen2_5_VLForConditionalGeneration.prepare_inputs_for_generation)
    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """See LinMUGenerationMixin.prepare_inputs_for_generation (multi-turn prefix trimming)."""
        return super().prepare_inputs_for_generation(*args, **kwargs)


QWEN2_5_VL = register_family(
    Family(
        name="qwen2_5_vl",
        config_class=Qwen2_5_VLConfig,
        model_class=Qwen2_5_VLForConditionalGeneration,
        base_class=Qwen2_5_VLModel,
        processor_class=Qwen2_5_VLProcessor,
        linmu_config_class=LinMUQwen2_5_VLConfig,
        linmu_model_class=LinMUQwen2_5_VLForConditionalGeneration,
        linmu_base_class=LinMUQwen2_5_VLModel,
    )
)
