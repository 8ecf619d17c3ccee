"""The LinMU model classes, one file per source family, registered with transformers' Auto classes.

Importing this package (which `import linmu_cli` does) makes `AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText` resolve a converted checkpoint's model_type (`linmu_qwen2_vl`, `linmu_qwen2_5_vl`)
to the classes below, so `AutoModelForImageTextToText.from_pretrained(out)` returns a LinMU model.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from linmu_cli.models.modeling_linmu import (
    LinMUGenerationMixin,
    LinMUModelMixin,
    convert_model,
    linmu_classes,
)
from linmu_cli.models.qwen2_5_vl import (
    LinMUQwen2_5_VLConfig,
    LinMUQwen2_5_VLForConditionalGeneration,
    LinMUQwen2_5_VLModel,
)
from linmu_cli.models.qwen2_vl import (
    LinMUQwen2VLConfig,
    LinMUQwen2VLForConditionalGeneration,
    LinMUQwen2VLModel,
)


def register_all() -> None:
    """Register every LinMU class with the Auto classes (idempotent; runs on import)."""
    AutoConfig.register(LinMUQwen2VLConfig.model_type, LinMUQwen2VLConfig, exist_ok=True)
    AutoModel.register(LinMUQwen2VLConfig, LinMUQwen2VLModel, exist_ok=True)
    AutoModelForImageTextToText.register(
        LinMUQwen2VLConfig, LinMUQwen2VLForConditionalGeneration, exist_ok=True
    )

    AutoConfig.register(LinMUQwen2_5_VLConfig.model_type, LinMUQwen2_5_VLConfig, exist_ok=True)
    AutoModel.register(LinMUQwen2_5_VLConfig, LinMUQwen2_5_VLModel, exist_ok=True)
    AutoModelForImageTextToText.register(
        LinMUQwen2_5_VLConfig, LinMUQwen2_5_VLForConditionalGeneration, exist_ok=True
    )


register_all()

__all__ = [
    "LinMUGenerationMixin",
    "LinMUModelMixin",
    "LinMUQwen2VLConfig",
    "LinMUQwen2VLForConditionalGeneration",
    "LinMUQwen2VLModel",
    "LinMUQwen2_5_VLConfig",
    "LinMUQwen2_5_VLForConditionalGeneration",
    "LinMUQwen2_5_VLModel",
    "convert_model",
    "linmu_classes",
    "register_all",
]
