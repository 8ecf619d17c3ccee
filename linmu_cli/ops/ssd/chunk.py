"""Chunked SSD in pure PyTorch: the reference every device runs, and the CPU path (docs/design.md §3, §8).

The mamba2 "minimal SSD" decomposition: a quadratic intra-chunk part, each chunk's contribution to the state
at its end, the states passed across chunks, and the carried state's contribution inside each chunk. Resets
enter as exact zeros (segment ids from an integer cumsum), so a reset never leaks through a large decay.
"""

from __future__ import annotations

import torch

from linmu_cli.ops.ssd.utils import check_inputs


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{k=j+1..i} a[..., k]`` for ``i > j`` and 0 elsewhere.

    Masked cumsum (as in mamba2's ``ssd_minimal``): no differences of large cumsums, no -inf;
    entries above the diagonal are 0 and must be masked by the caller.
    """
    T = a.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    z = a[..., :, None].expand(*a.shape, T).masked_fill(~strict, 0.0)  # z[..., k, j] = a_k (k > j)
    return torch.cumsum(z, dim=-2)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD in pure PyTorch (CPU or GPU, differentiable); float32 math, ``y`` in ``x.dtype``.

    Resets are exact: contributions across a reset are multiplied by an exact 0 (segment ids
    from an integer cumsum of the reset flags), never approximated by a large negative decay.

    Args:
        x: (b, l, h, p); dt: (b, l, h) positive; A: (h,) negative; B, C: (b, l, h, n).
        reset: (b, l) bool or None: the state is zeroed before each True position.
        initial_state: (b, h, p, n) or None (zeros).
        chunk_size: tokens per chunk (>= 1); a length that is not a multiple is padded at the end.
        return_final_state: also return the state after the last token.

    Returns:
        y (b, l, h, p) in ``x.dtype``, or (y, final state (b, h, p, n) float32).
    """
    check_inputs(x, dt, A, B, C, reset, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, T, h, p = x.shape
    n = B.shape[-1]
    out_dtype = x.dtype
    dev = x.device
    cs = chunk_size
    nc = max(1, -(-T // cs))
    L = nc * cs
    pad = L - T

    xf, dtf, Bf, Cf = (t.float() for t in (x, dt, B, C))
    Af = A.float()
    if reset is None:
        rst = torch.zeros(b, T, dtype=torch.bool, device=dev)
    else:
        rst = reset.to(device=dev, dtype=torch.bool)
    if pad:
        # padding at the end: dt = 0, x = B = C = 0, no reset -> state unchanged, outputs dropped
        xf = torch.nn.functional.pad(xf, (0, 0, 0, 0, 0, pad))
        Bf = torch.nn.functional.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = torch.nn.functional.pad(Cf, (0, 0, 0, 0, 0, pad))
        dtf = torch.nn.functional.pad(dtf, (0, 0, 0, pad))
        rst = torch.nn.functional.pad(rst, (0, pad), value=False)

    # segment id of every position: positions i, j (j <= i) interact iff no reset in (j, i]
    rid = torch.cumsum(rst.to(torch.int64), dim=1).view(b, nc, cs)  # (b, c, l)
    rid_last = rid[:, :, -1]  # (b, c) segment id at the end of each chunk
    rid_prev = torch.cat([rid.new_zeros(b, 1), rid_last[:, :-1]], dim=1)  # before each chunk
    same_seg = rid[:, :, :, None] == rid[:, :, None, :]  # (b, c, l, s)
    causal = torch.ones(cs, cs, dtype=torch.bool, device=dev).tril()
    intra_mask = (same_seg & causal).unsqueeze(1)  # (b, 1, c, l, s)
    to_end_mask = (rid == rid_last[:, :, None]).unsqueeze(1)  # (b, 1, c, s): reaches chunk end
    from_prev_mask = (rid == rid_prev[:, :, None]).unsqueeze(1)  # (b, 1, c, l): sees carried state
    carry_mask = (rid_last == rid_prev).unsqueeze(1)  # (b, 1, c): no reset inside the chunk

    xc = xf.view(b, nc, cs, h, p)
    Bc = Bf.view(b, nc, cs, h, n)
    Cc = Cf.view(b, nc, cs, h, n)
    dtc = dtf.view(b, nc, cs, h)
    a = (dtf * Af).view(b, nc, cs, h).permute(0, 3, 1, 2)  # (b, h, c, l) log decay per step, <= 0

    seg = _segsum(a)  # (b, h, c, l, s): sum_{k=s+1..l} a_k, all <= 0
    a_cum = torch.cumsum(a, dim=-1)  # (b, h, c, l): sum_{k=0..l} a_k, all <= 0
    zero = a.new_zeros(())

    # 1) intra-chunk (quadratic) part
    Lmat = torch.where(intra_mask, torch.exp(seg), zero)  # (b, h, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * Lmat
    xdt = xc * dtc[..., None]  # (b, c, s, h, p)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2) state contributed by each chunk's own tokens, at the end of that chunk
    decay_to_end = torch.where(to_end_mask, torch.exp(seg[..., -1, :]), zero)  # (b, h, c, s)
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bc, decay_to_end, xdt)

    # 3) pass states across chunks (exact resets via carry_mask)
    carry = torch.where(carry_mask, torch.exp(a_cum[..., -1]), zero)  # (b, h, c)
    if initial_state is not None:
        S = initial_state.to(device=dev, dtype=torch.float32)
    else:
        S = xf.new_zeros(b, h, p, n)
    prev_states = []
    for c in range(nc):
        prev_states.append(S)
        S = carry[:, :, c, None, None] * S + chunk_states[:, c]
    prev = torch.stack(prev_states, dim=1)  # (b, c, h, p, n): state before each chunk

    # 4) contribution of the carried state to each position
    decay_in = torch.where(from_prev_mask, torch.exp(a_cum), zero)  # (b, h, c, l)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, prev, decay_in)

    y = (y_diag + y_off).reshape(b, L, h, p)[:, :T].to(out_dtype)
    if return_final_state:
        return y, S
    return y


__all__ = ["ssd_chunked"]
