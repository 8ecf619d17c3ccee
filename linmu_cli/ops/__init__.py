"""Sequence-mixing kernels (SSD scan) with a pure-PyTorch reference and optional CUDA paths.

Everything public lives in `linmu_cli.ops.ssd` (its `__all__`); `ops/window_attention.py` and
`ops/ssd_step.py` are imported from their modules.
"""

from linmu_cli.ops.ssd import *  # noqa: F403
from linmu_cli.ops.ssd import __all__  # noqa: F401
