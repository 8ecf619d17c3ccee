"""mamba-ssm's ``mamba_chunk_scan_combined`` (Triton, CUDA only) as an SSD backend (docs/design.md §8).

mamba-ssm's package ``__init__`` needs a compiled extension that an offline (``MAMBA_SKIP_CUDA_BUILD``) wheel
lacks, so :func:`_import_mamba` imports only the Triton submodules it needs, lazily, on CUDA. The decode step
(``step.py``) and the gated norm (``ops/gated_norm.py``) import their mamba kernels through it too.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

import torch

from linmu_cli.ops.ssd.utils import DEFAULT_CHUNK, ResetPlan, check_inputs, require_cuda


@functools.cache
def _import_mamba():
    """Return mamba_ssm's ``mamba_chunk_scan_combined`` without running ``mamba_ssm/__init__``.

    The package ``__init__`` imports the compiled ``selective_scan_cuda`` extension (absent from a
    wheel built with ``MAMBA_SKIP_CUDA_BUILD=TRUE``) plus Mamba3 / model code we do not need. If
    ``mamba_ssm`` is not imported yet, we register a bare package module named ``mamba_ssm``
    whose ``__path__`` points at the installed package (found with ``importlib.util.find_spec``,
    which does not execute it), then import only ``mamba_ssm.ops.triton.ssd_combined``, which
    needs torch, triton, einops and packaging. Side effect: a later ``import mamba_ssm`` in the
    same process returns that bare package (its submodules still import normally).
    """
    name = "mamba_ssm.ops.triton.ssd_combined"
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("No module named 'mamba_ssm' (pip install mamba-ssm)")
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        pkg.__package__ = "mamba_ssm"
        pkg.__spec__ = spec
        sys.modules["mamba_ssm"] = pkg
    return importlib.import_module(name).mamba_chunk_scan_combined


def _mamba_call(
    kernel, x, dt, A, B, C, reset=None, initial_state=None, chunk_size=None, return_final_state=False,
    plan: ResetPlan | None = None,
):  # fmt: skip
    """Map our SSD onto mamba_ssm's ``mamba_chunk_scan_combined`` (``kernel``).

    mamba: x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n) with g = ngroups (= h here),
    initial_states (b, h, p, n) (same layout as ours), seq_idx (b, l) int32: tokens interact
    only when their seq_idx is equal; the initial state belongs to seq_idx == 0. So
    seq_idx = cumsum(reset) per row (a reset at t = 0 drops the initial state), exactly our
    semantics. No D, z, dt_bias, dt_softplus (dt is already positive).
    """
    dtype = x.dtype
    seq_idx = None
    if plan is not None:
        seq_idx = plan.seq_idx
    elif reset is not None:
        seq_idx = torch.cumsum(reset.to(device=x.device, dtype=torch.int32), dim=1, dtype=torch.int32)
        seq_idx = seq_idx.contiguous()
    init = initial_state.float() if initial_state is not None else None
    out = kernel(
        x,
        dt,
        A.float(),
        B.to(dtype),
        C.to(dtype),
        int(chunk_size or DEFAULT_CHUNK["mamba"]),
        initial_states=init,
        seq_idx=seq_idx,
        return_final_states=return_final_state,
    )
    if return_final_state:
        y, final = out
        return y.to(dtype), final.float()
    return out.to(dtype)


def ssd_mamba(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SSD via mamba_ssm's Triton ``mamba_chunk_scan_combined`` (CUDA only).

    ``chunk_size`` None -> 256 (mamba2's default). See :func:`_import_mamba` for how the package
    is imported without its compiled extension.
    """
    check_inputs(x, dt, A, B, C, reset, initial_state)
    require_cuda("mamba", x, dt, A, B, C, initial_state)
    return _mamba_call(_import_mamba(), x, dt, A, B, C, reset, initial_state, chunk_size, return_final_state)


def mamba_scan_gqa(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    scale: float,
    plan: ResetPlan | None,
    initial_state: torch.Tensor | None,
    cs: int,
    return_final_state: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The grouped scan on mamba: x repeated and scaled (mamba has no query scale) and B repeated, both from one
    Triton launch (`linmu_cli.ops.scan_inputs`, with a one-launch backward)."""
    from linmu_cli.ops.scan_inputs import scan_inputs

    xs, bs, _ = scan_inputs(x, B, None, None, C.shape[2], x_scale=scale, dt_on_b=False)
    return _mamba_call(_import_mamba(), xs, dt, A, bs, C, None, initial_state, cs, return_final_state, plan)


__all__ = ["mamba_scan_gqa", "ssd_mamba"]
