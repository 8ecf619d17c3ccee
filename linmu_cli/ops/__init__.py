"""Sequence-mixing kernels, one package or module per op with its pure-PyTorch reference beside it (as fla's ``ops/``).

``ssd/`` the SSD scan and decode step (naive, chunked, fla, mamba); ``window_attention/`` windowed and sliding
attention (dense naive reference, batched SDPA); ``short_conv.py``, ``gated_norm.py``, ``fused_linear.py``
Flex-MA's conv, output norm and merged GEMM. The SSD ops (``linmu_cli.ops.ssd.__all__``) are re-exported here.
"""

from linmu_cli.ops.ssd import *  # noqa: F403
from linmu_cli.ops.ssd import __all__  # noqa: F401
