"""`linmu doctor`: what this machine can run (versions, CUDA, which Flex-MA kernels import and agree)."""

from __future__ import annotations

import platform

import torch

from linmu_cli.ops import available_ssd_backends, select_ssd_backend, ssd_chunked, ssd_scan
from linmu_cli.versions import package_version


def _check_backend(name: str, device: torch.device) -> str:
    """Run one small scan with `name` and compare with the PyTorch reference."""
    g = torch.Generator().manual_seed(0)
    b, length, h, p, n = 1, 300, 2, 32, 32
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x, bb, cc = (torch.randn(b, length, h, s, generator=g) for s in (p, n, n))
    dt = torch.rand(b, length, h, generator=g) * 0.1
    a = -torch.rand(h, generator=g) - 0.5
    args = [t.to(device) for t in (x, dt, a, bb, cc)]
    args = [args[0].to(dtype), args[1], args[2], args[3].to(dtype), args[4].to(dtype)]
    try:
        y = ssd_scan(*args, backend=name)
        ref = ssd_chunked(*[t.float() for t in args])
        err = ((y.float() - ref).norm() / ref.norm()).item()
        return f"ok (rel. error vs reference {err:.1e})"
    except Exception as exc:  # doctor reports, it does not fail
        return f"fails: {type(exc).__name__}: {exc}"


def collect() -> dict[str, str]:
    """What `linmu doctor` prints: versions, the GPU, and per Flex-MA backend whether it imports and agrees."""

    def installed(name: str) -> str:
        return package_version(name) or "not installed"

    info = {
        "python": platform.python_version(),
        "linmu": installed("linmu"),
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "peft": installed("peft"),
        "fla-core": installed("fla-core"),
        "mamba-ssm": installed("mamba-ssm"),
        "triton": installed("triton"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, status in available_ssd_backends().items():
        if status == "ok" and (name == "torch" or device.type == "cuda"):
            status = _check_backend(name, device)
        info[f"ssd backend {name}"] = status
    info["auto picks (inference)"] = select_ssd_backend(device, "auto")
    info["auto picks (training)"] = select_ssd_backend(device, "auto", need_backward=True)
    return info
