"""Source-family adapters and the LinMU model classes built on them."""

from linmu_cli.models import qwen2_5_vl, qwen2_vl  # noqa: F401  (register the families)
from linmu_cli.models.modeling_linmu import convert_model, linmu_classes, register_all

register_all()

__all__ = ["convert_model", "linmu_classes", "register_all"]
