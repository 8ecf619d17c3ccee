"""Qwen2-VL as a LinMU family: the LinMU config / bare model / LM-head model, written out on transformers' classes.

Each class is the Qwen2-VL class it names with every decoder self-attention (at
`model.language_model.layers[i].self_attn`) swapped for an M-MATE block (docs/design.md §1); the shared behaviour
is `LinMUModelMixin`'s. Visual segments come from the image / video tokens and the processor's grids
(docs/design.md §2). `linmu_cli.models` registers the classes with transformers' Auto classes.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    GenerationMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLProcessor,
)
from transformers.utils import ModelOutput

from linmu_cli.models.family import Family, register_family
from linmu_cli.models.modeling_linmu import LinMUGenerationMixin, LinMUModelMixin, same_signature_as


class LinMUQwen2VLConfig(Qwen2VLConfig):
    """Qwen2-VL's config plus `mate`: the M-MATE sizes as a `MateConfig` dict (saved in config.json)."""

    model_type = "linmu_qwen2_vl"


class LinMUQwen2VLModel(LinMUModelMixin, Qwen2VLModel):
    """Qwen2-VL's bare model (no LM head) with M-MATE decoder blocks: what `AutoModel` loads."""

    config_class = LinMUQwen2VLConfig

    @same_signature_as(Qwen2VLModel.forward)
    def forward(self, *args: Any, **kwargs: Any) -> ModelOutput:
        """Qwen2VLModel.forward's arguments; see LinMUModelMixin.forward."""
        return super().forward(*args, **kwargs)


# GenerationMixin named directly, as transformers asks of generative classes
class LinMUQwen2VLForConditionalGeneration(
    LinMUGenerationMixin, Qwen2VLForConditionalGeneration, GenerationMixin
):
    """Qwen2-VL with M-MATE decoder blocks: what `AutoModelForImageTextToText` loads and `generate()` decodes
    with a constant-size LinMUCache (docs/design.md §3-4)."""

    config_class = LinMUQwen2VLConfig

    @same_signature_as(Qwen2VLForConditionalGeneration.forward)
    def forward(self, *args: Any, **kwargs: Any) -> ModelOutput:
        """Qwen2VLForConditionalGeneration.forward's arguments; see LinMUModelMixin.forward."""
        return super().forward(*args, **kwargs)

    # callers (and transformers' tests) read which inputs generation takes (inputs_embeds) from the signature
    @same_signature_as(Qwen2VLForConditionalGeneration.prepare_inputs_for_generation)
    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """See LinMUGenerationMixin.prepare_inputs_for_generation (multi-turn prefix trimming)."""
        return super().prepare_inputs_for_generation(*args, **kwargs)


QWEN2_VL = register_family(
    Family(
        name="qwen2_vl",
        config_class=Qwen2VLConfig,
        model_class=Qwen2VLForConditionalGeneration,
        base_class=Qwen2VLModel,
        processor_class=Qwen2VLProcessor,
        linmu_config_class=LinMUQwen2VLConfig,
        linmu_model_class=LinMUQwen2VLForConditionalGeneration,
        linmu_base_class=LinMUQwen2VLModel,
    )
)
