"""Sequence-mixing kernels (SSD scan) with a pure-PyTorch reference and optional CUDA paths."""

from linmu_cli.ops.ssd import (
    SSD_BACKENDS,
    SSDBackendError,
    available_ssd_backends,
    fla_backward_supported,
    last_ssd_backend,
    select_ssd_backend,
    ssd_chunked,
    ssd_fla,
    ssd_mamba,
    ssd_naive,
    ssd_scan,
)

__all__ = [
    "SSD_BACKENDS",
    "SSDBackendError",
    "available_ssd_backends",
    "fla_backward_supported",
    "last_ssd_backend",
    "select_ssd_backend",
    "ssd_chunked",
    "ssd_fla",
    "ssd_mamba",
    "ssd_naive",
    "ssd_scan",
]
