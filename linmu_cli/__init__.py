"""linmu: turn a pretrained vision-language model into a linear-complexity one (LinMU, arXiv 2601.01322).

Importing the package registers the LinMU model classes with transformers' Auto classes, so a converted
checkpoint loads with `AutoModelForImageTextToText.from_pretrained(out)`.

The `linmu` command (the console script, `python -m linmu_cli`) skips that registration at start-up: it costs
torch + transformers (5-15 s) and `linmu --help` must answer at once. Each command imports what it needs
(`linmu_cli.models` registers the classes) inside its body. The public names below load on first access
(PEP 562), so `linmu_cli.MateConfig` and friends work the same either way.
"""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from linmu_cli.errors import LinmuError

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access
_LAZY = {
    "MateConfig": "linmu_cli.config",
    "convert_model": "linmu_cli.models",
    "linmu_classes": "linmu_cli.models",
    "load_model": "linmu_cli.loading",
    "register_all": "linmu_cli.models",
}

__all__ = ["LinmuError", "MateConfig", "__version__", "convert", "convert_model", "distill", "linmu_classes",
           "load_model"]  # fmt: skip

if TYPE_CHECKING:  # pragma: no cover
    from linmu_cli.config import MateConfig
    from linmu_cli.conversion import ConvertReport
    from linmu_cli.loading import load_model
    from linmu_cli.models import convert_model, linmu_classes


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'linmu_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def distill(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `linmu_cli.distillation.distill`."""
    from linmu_cli.distillation import distill as _distill

    return _distill(*args, **kwargs)


def convert(*args: Any, **kwargs: Any) -> ConvertReport:
    """See `linmu_cli.conversion.convert` (imported lazily to keep `import linmu_cli` light)."""
    from linmu_cli.conversion import convert as _convert

    return _convert(*args, **kwargs)


def _started_as_cli() -> bool:
    """True while the `linmu` console script or `python -m linmu_cli` is starting (this import is its first).

    The console script runs with sys.argv[0] = .../bin/linmu; `python -m linmu_cli` imports this package with
    sys.argv[0] == "-m" while runpy locates linmu_cli.__main__ (sys.orig_argv holds `-m linmu_cli`).
    """
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name in ("linmu", "linmu.exe", "linmu-script.py"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    return argv0 == "-m" and any(a == "-m" and b == "linmu_cli" for a, b in zip(orig, orig[1:], strict=False))


if not _started_as_cli():
    import_module("linmu_cli.models")  # registers the LinMU classes with transformers' Auto classes
