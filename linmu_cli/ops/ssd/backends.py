"""Which SSD backends can run here, and which one a scan gets (docs/design.md §8: by capability, not by name).

The CUDA libraries are imported lazily and only when a CUDA device is involved, so this is safe to import on a
CPU-only machine; an explicitly requested backend that cannot run raises, it is never silently replaced.
"""

from __future__ import annotations

import functools

import torch

from linmu_cli.ops.ssd.fla import _import_fla, fla_backward_supported
from linmu_cli.ops.ssd.mamba import _import_mamba
from linmu_cli.ops.ssd.utils import SSDBackendError

SSD_BACKENDS = ("torch", "fla", "mamba")


@functools.cache
def _backend_import_error(name: str) -> str | None:
    """None if backend ``name`` imports, else the error text (cached). Only call with CUDA."""
    try:
        if name == "fla":
            _import_fla()
        elif name == "mamba":
            _import_mamba()
    except Exception as e:  # noqa: BLE001 - report any import failure
        return f"{type(e).__name__}: {e}"
    return None


def available_ssd_backends() -> dict[str, str]:
    """Backend name -> "ok" or the reason it is unusable here (for ``linmu doctor``)."""
    out = {"torch": "ok"}
    if not torch.cuda.is_available():
        from linmu_cli.versions import package_version

        for name, dist in (("fla", "fla-core"), ("mamba", "mamba-ssm")):
            ver = package_version(dist)
            out[name] = (
                f"no CUDA device ({dist} {ver} is installed)"
                if ver
                else f"no CUDA device, and {dist} is not installed"
            )
        return out
    for name in ("fla", "mamba"):
        err = _backend_import_error(name)
        out[name] = "ok" if err is None else err
    return out


def select_ssd_backend(
    device: torch.device | str,
    requested: str = "auto",
    need_backward: bool = False,
    key_dim: int | None = None,
) -> str:
    """Pick "torch", "fla" or "mamba" for ``device``; raise :class:`SSDBackendError` if
    an explicitly requested backend cannot run (never silently substitutes another one).

    ``auto`` on CUDA: mamba_ssm if it imports (its Triton SSD runs forward and backward on
    Hopper with Triton 3.6), else fla if it imports and (no backward is needed or
    :func:`fla_backward_supported` for keys of width ``key_dim``), else torch. On CPU always torch.
    fla with a backward on Hopper under Triton < 3.7.1 lifts fla's issue-#640 guard when the key width allows it
    (:func:`linmu_cli.ops.ssd.fla.fla_backward_verdict`).
    """
    if requested not in ("auto", *SSD_BACKENDS):
        raise ValueError(f"unknown SSD backend {requested!r}; choose one of auto, {', '.join(SSD_BACKENDS)}")
    device = torch.device(device)
    if device.type != "cuda":
        if requested in ("auto", "torch"):
            return "torch"
        raise SSDBackendError(
            f"SSD backend {requested!r} needs a CUDA GPU but the device is {device}; "
            "use 'torch' or 'auto' on CPU"
        )
    if requested == "torch":
        return "torch"
    if requested in ("fla", "mamba"):
        err = _backend_import_error(requested)
        if err is not None:
            pkg = "fla-core" if requested == "fla" else "mamba-ssm"
            raise SSDBackendError(f"SSD backend {requested!r} is not importable ({pkg}): {err}")
        if requested == "fla" and need_backward:
            ok, why = fla_backward_supported(device, key_dim, lift=True)
            if not ok:
                raise SSDBackendError(why)
        return requested
    # auto
    if _backend_import_error("mamba") is None:
        return "mamba"
    if _backend_import_error("fla") is None and (
        not need_backward or fla_backward_supported(device, key_dim, lift=True)[0]
    ):
        return "fla"
    return "torch"


__all__ = ["SSD_BACKENDS", "available_ssd_backends", "select_ssd_backend"]
