"""linmu: turn a pretrained vision-language model into a linear-complexity one (LinMU, arXiv 2601.01322).

Importing the package registers the LinMU model classes with transformers' Auto classes, so a converted
checkpoint loads with `AutoModelForImageTextToText.from_pretrained(out)`.
"""

from linmu_cli.config import MateConfig
from linmu_cli.errors import LinmuError
from linmu_cli.models import convert_model, linmu_classes

__version__ = "0.1.0"

__all__ = ["LinmuError", "MateConfig", "__version__", "convert", "convert_model", "distill", "linmu_classes"]


def distill(*args, **kwargs):
    """See `linmu_cli.distillation.distill`."""
    from linmu_cli.distillation import distill as _distill

    return _distill(*args, **kwargs)


def convert(*args, **kwargs):
    """See `linmu_cli.conversion.convert` (imported lazily to keep `import linmu_cli` light)."""
    from linmu_cli.conversion import convert as _convert

    return _convert(*args, **kwargs)
