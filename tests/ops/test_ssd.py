"""CPU tests of the SSD scan: chunked reference vs the sequential ground truth, backend selection, and the
argument plumbing of the CUDA adapters (ops/ssd/fla.py, ops/ssd/mamba.py) with contract stand-ins.
Every path against the naive scan through one helper: tests/ops/."""

from __future__ import annotations

import pytest
import torch

from linmu_cli.ops import (
    SSDBackendError,
    available_ssd_backends,
    last_ssd_backend,
    select_ssd_backend,
    ssd_chunked,
    ssd_fla,
    ssd_mamba,
    ssd_naive,
    ssd_scan,
)
from linmu_cli.ops import ssd as ssd_mod
from linmu_cli.ops.ssd import fla as fla_mod
from linmu_cli.ops.ssd import mamba as mamba_mod


def make_inputs(b, T, h, p, n, *, seed=0, reset_prob=0.0, with_init=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, h, p, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, T, h, generator=g) - 1.0).to(dtype)
    A = -torch.exp(torch.empty(h).uniform_(0.0, 1.5, generator=g)).to(dtype)
    B = (torch.randn(b, T, h, n, generator=g) / n**0.5).to(dtype)
    C = (torch.randn(b, T, h, n, generator=g) / n**0.5).to(dtype)
    reset = (torch.rand(b, T, generator=g) < reset_prob) if reset_prob > 0 else None
    init = torch.randn(b, h, p, n, generator=g, dtype=dtype) if with_init else None
    return x, dt, A, B, C, reset, init


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "b,T,h,p,n,cs,reset_prob,with_init",
    [
        (2, 64, 3, 8, 4, 16, 0.0, False),
        (2, 50, 2, 5, 6, 16, 0.0, True),  # l not a multiple of the chunk
        (3, 97, 4, 8, 8, 32, 0.08, True),  # resets + initial state + padding
        (1, 130, 2, 4, 4, 64, 0.03, False),
        (2, 7, 2, 3, 3, 64, 0.3, True),  # l < chunk
        (2, 40, 2, 4, 4, 1, 0.1, True),  # chunk of 1
    ],
)
def test_chunked_matches_naive(b, T, h, p, n, cs, reset_prob, with_init):
    x, dt, A, B, C, reset, init = make_inputs(
        b, T, h, p, n, seed=T + cs, reset_prob=reset_prob, with_init=with_init
    )
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, reset=reset, initial_state=init)
    y, s = ssd_chunked(
        x, dt, A, B, C, reset=reset, initial_state=init, chunk_size=cs, return_final_state=True
    )
    assert y.shape == (b, T, h, p) and y.dtype == x.dtype
    assert s.shape == (b, h, p, n) and s.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
    # without return_final_state only y comes back
    y2 = ssd_chunked(x, dt, A, B, C, reset=reset, initial_state=init, chunk_size=cs)
    assert isinstance(y2, torch.Tensor)
    torch.testing.assert_close(y2, y)


def test_resets_really_happen():
    """Sanity: with resets the result differs from the no-reset run (so resets are exercised)."""
    x, dt, A, B, C, _, init = make_inputs(2, 60, 2, 4, 4, seed=3, with_init=True)
    reset = torch.zeros(2, 60, dtype=torch.bool)
    reset[0, 20] = True
    reset[1, 0] = True  # drops the initial state of row 1
    y_r, s_r = ssd_chunked(x, dt, A, B, C, reset, init, chunk_size=16, return_final_state=True)
    y_n = ssd_chunked(x, dt, A, B, C, None, init, chunk_size=16)
    assert torch.equal(y_r[0, :20], y_n[0, :20])
    assert not torch.allclose(y_r[0, 20:], y_n[0, 20:])
    # row 1 with a reset at t=0 == no initial state
    y_0 = ssd_chunked(x[1:], dt[1:], A, B[1:], C[1:], None, None, chunk_size=16)
    torch.testing.assert_close(y_r[1:], y_0, atol=1e-6, rtol=1e-6)


def test_reset_equals_separate_halves():
    b, T, h, p, n, t0 = 2, 90, 3, 6, 5, 37  # t0 mid-chunk
    x, dt, A, B, C, _, init = make_inputs(b, T, h, p, n, seed=11, with_init=True)
    reset = torch.zeros(b, T, dtype=torch.bool)
    reset[:, t0] = True
    y, s = ssd_chunked(x, dt, A, B, C, reset, init, chunk_size=16, return_final_state=True)
    y1, s1 = ssd_chunked(
        x[:, :t0], dt[:, :t0], A, B[:, :t0], C[:, :t0], None, init, chunk_size=16, return_final_state=True
    )
    y2, s2 = ssd_chunked(
        x[:, t0:], dt[:, t0:], A, B[:, t0:], C[:, t0:], None, None, chunk_size=16, return_final_state=True
    )
    torch.testing.assert_close(y[:, :t0], y1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y[:, t0:], y2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s, s2, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(s1, s2)
    # the second half is exactly independent of the first half's inputs
    x_mod = x.clone()
    x_mod[:, :t0] += 100.0
    y_mod = ssd_chunked(x_mod, dt, A, B, C, reset, init, chunk_size=16)
    assert torch.equal(y_mod[:, t0:], y[:, t0:])


def test_reset_at_chunk_boundary():
    x, dt, A, B, C, _, init = make_inputs(1, 64, 2, 4, 4, seed=5, with_init=True)
    reset = torch.zeros(1, 64, dtype=torch.bool)
    reset[0, 32] = True  # exactly at a chunk start for chunk_size 16/32
    for cs in (16, 32, 64):
        y, s = ssd_chunked(x, dt, A, B, C, reset, init, chunk_size=cs, return_final_state=True)
        y_ref, s_ref = ssd_naive(x, dt, A, B, C, reset, init)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


def test_gradients_match_naive():
    b, T, h, p, n = 2, 45, 3, 4, 5
    x, dt, A, B, C, reset, init = make_inputs(b, T, h, p, n, seed=7, reset_prob=0.07, with_init=True)
    g = torch.Generator().manual_seed(99)
    gy = torch.randn(b, T, h, p, generator=g)
    gs = torch.randn(b, h, p, n, generator=g)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, init)]
        y, s = fn(*leaves)
        loss = (y * gy).sum() + (s * gs).sum()
        return torch.autograd.grad(loss, leaves)

    ref = grads(lambda x_, dt_, A_, B_, C_, i_: ssd_naive(x_, dt_, A_, B_, C_, reset, i_))
    got = grads(
        lambda x_, dt_, A_, B_, C_, i_: ssd_chunked(
            x_, dt_, A_, B_, C_, reset, i_, chunk_size=16, return_final_state=True
        )
    )
    for name, r, o in zip(("x", "dt", "A", "B", "C", "initial_state"), ref, got, strict=True):
        assert torch.isfinite(o).all(), name
        assert r.abs().max() > 0, name
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_dt_zero_padding_tokens_change_nothing():
    b, T, h, p, n = 2, 50, 2, 4, 3
    x, dt, A, B, C, _, init = make_inputs(b, T, h, p, n, seed=13, with_init=True)
    # insert 7 padding tokens (dt = 0, x = 0, B/C arbitrary) at t = 20 and 9 at the end
    ins, tail = 7, 9
    g = torch.Generator().manual_seed(1)

    def padded(t, fill_random):
        shape_mid = (t.shape[0], ins, *t.shape[2:])
        shape_end = (t.shape[0], tail, *t.shape[2:])
        mk = (lambda s: torch.randn(s, generator=g)) if fill_random else (lambda s: torch.zeros(s))
        return torch.cat([t[:, :20], mk(shape_mid), t[:, 20:], mk(shape_end)], dim=1)

    xp, dtp = padded(x, False), padded(dt, False)
    Bp, Cp = padded(B, True), padded(C, True)
    keep = torch.cat([torch.arange(20), torch.arange(20 + ins, T + ins)])
    for cs in (8, 16, 64):
        leaves = [t.clone().requires_grad_(True) for t in (xp, dtp, A, Bp, Cp, init)]
        y_p, s_p = ssd_chunked(*leaves[:5], None, leaves[5], chunk_size=cs, return_final_state=True)
        y, s = ssd_chunked(x, dt, A, B, C, None, init, chunk_size=cs, return_final_state=True)
        assert torch.isfinite(y_p).all()
        torch.testing.assert_close(y_p[:, keep], y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_p, s, atol=1e-5, rtol=1e-5)
        (y_p.sum() + s_p.sum()).backward()
        for t in leaves:
            assert torch.isfinite(t.grad).all()
    # the naive loop agrees
    _, s_naive = ssd_naive(xp, dtp, A, Bp, Cp, None, init)
    torch.testing.assert_close(s_naive, s, atol=1e-5, rtol=1e-5)


def test_all_dt_zero_and_strong_decay_are_finite():
    x, dt, A, B, C, reset, init = make_inputs(2, 40, 2, 3, 3, seed=2, reset_prob=0.1, with_init=True)
    # all dt = 0: state stays the initial state, y_t = S0 C_t
    y, s = ssd_chunked(x, torch.zeros_like(dt), A, B, C, None, init, chunk_size=16, return_final_state=True)
    torch.testing.assert_close(s, init)
    torch.testing.assert_close(y, torch.einsum("bhpn,blhn->blhp", init, C), atol=1e-6, rtol=1e-6)
    # huge decays underflow to exactly 0 without NaN (forward and backward)
    leaves = [t.clone().requires_grad_(True) for t in (x, dt * 1e3, A * 1e3, B, C)]
    y = ssd_chunked(*leaves, reset, init, chunk_size=16)
    y.square().sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    torch.testing.assert_close(
        y, ssd_naive(*[t.detach() for t in leaves], reset, init)[0], atol=1e-5, rtol=1e-5
    )


def test_bf16_inputs_return_bf16_and_match_float32():
    x, dt, A, B, C, reset, init = make_inputs(2, 70, 2, 8, 8, seed=21, reset_prob=0.05, with_init=True)
    xb, Bb, Cb = x.bfloat16(), B.bfloat16(), C.bfloat16()
    y = ssd_chunked(xb, dt, A, Bb, Cb, reset, init, chunk_size=32)
    assert y.dtype == torch.bfloat16
    y_ref, _ = ssd_naive(xb.float(), dt, A, Bb.float(), Cb.float(), reset, init)
    assert rel(y.float(), y_ref) < 1e-2


def test_shape_errors():
    x, dt, A, B, C, _, _ = make_inputs(1, 8, 2, 3, 4)
    with pytest.raises(ValueError, match="dt"):
        ssd_chunked(x, dt[..., :1], A, B, C)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, initial_state=torch.zeros(1, 2, 4, 3))


# ---------------------------------------------------------------------------------------------
# backend selection on CPU
# ---------------------------------------------------------------------------------------------


def test_cpu_selection_is_torch_and_fast_backends_refused():
    assert select_ssd_backend("cpu") == "torch"
    assert select_ssd_backend(torch.device("cpu"), "auto", need_backward=True) == "torch"
    assert select_ssd_backend("cpu", "torch") == "torch"
    for name in ("fla", "mamba"):
        with pytest.raises(SSDBackendError, match=r"needs a CUDA GPU.*cpu"):
            select_ssd_backend("cpu", name)
    with pytest.raises(ValueError, match="unknown SSD backend"):
        select_ssd_backend("cpu", "triton")


def test_fast_backends_refuse_cpu_tensors():
    x, dt, A, B, C, _, _ = make_inputs(1, 8, 2, 3, 4)
    with pytest.raises(SSDBackendError, match="needs CUDA tensors"):
        ssd_fla(x, dt, A, B, C)
    with pytest.raises(SSDBackendError, match="needs CUDA tensors"):
        ssd_mamba(x, dt, A, B, C)
    with pytest.raises(SSDBackendError, match="needs a CUDA GPU"):
        ssd_scan(x, dt, A, B, C, backend="fla")


def test_ssd_scan_on_cpu_runs_torch():
    x, dt, A, B, C, reset, init = make_inputs(2, 33, 2, 4, 4, seed=4, reset_prob=0.1, with_init=True)
    y, s = ssd_scan(x, dt, A, B, C, reset=reset, initial_state=init, return_final_state=True)
    assert last_ssd_backend() == "torch"
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, reset, init)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


def test_available_backends_on_cpu():
    av = available_ssd_backends()
    assert av["torch"] == "ok"
    assert set(av) == {"torch", "fla", "mamba"}
    if not torch.cuda.is_available():
        assert av["fla"] != "ok" and "CUDA" in av["fla"]
        assert av["mamba"] != "ok" and "CUDA" in av["mamba"]


# ---------------------------------------------------------------------------------------------
# argument plumbing of the CUDA wrappers, checked on CPU with pure-PyTorch stand-ins that follow
# the documented kernel contracts (no Triton is called)
# ---------------------------------------------------------------------------------------------


def fake_chunk_simple_gla(
    q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw
):
    """fla contract: q/k (B,T,H,K), v (B,T,H,V), g (B,T,H); state [N,H,K,V]; varlen needs B=1."""
    assert scale == 1.0
    assert q.dtype == k.dtype == v.dtype
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        bounds = [(i, 0, T) for i in range(Bsz)]
    else:
        assert Bsz == 1
        assert "cu_seqlens_cpu" in kw and torch.equal(kw["cu_seqlens_cpu"], cu_seqlens.cpu())
        cu = cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == T and all(a < b for a, b in zip(cu[:-1], cu[1:], strict=True))
        bounds = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    if initial_state is not None:
        assert initial_state.shape == (len(bounds), H, K, V)
    o = torch.zeros(Bsz, T, H, V)
    finals = []
    for s_idx, (bi, s0, s1) in enumerate(bounds):
        S = initial_state[s_idx].float() if initial_state is not None else torch.zeros(H, K, V)
        for t in range(s0, s1):
            S = (
                torch.exp(g[bi, t].float())[:, None, None] * S
                + k[bi, t].float()[:, :, None] * v[bi, t].float()[:, None, :]
            )
            o[bi, t] = torch.einsum("hk,hkv->hv", q[bi, t].float(), S)
        finals.append(S)
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)


def fake_mamba_chunk_scan_combined(
    x, dt, A, B, C, chunk_size, initial_states=None, seq_idx=None, return_final_states=False
):
    """mamba contract: tokens interact iff equal seq_idx; initial state belongs to seq_idx 0."""
    assert isinstance(chunk_size, int)
    b, T, h, p = x.shape
    if seq_idx is not None:
        assert seq_idx.dtype == torch.int32 and seq_idx.shape == (b, T)
    S = initial_states.float() if initial_states is not None else torch.zeros(b, h, p, B.shape[-1])
    prev = torch.zeros(b, dtype=torch.int32)
    ys = []
    for t in range(T):
        if seq_idx is not None:
            S = torch.where((seq_idx[:, t] != prev)[:, None, None, None], torch.zeros_like(S), S)
            prev = seq_idx[:, t]
        S = torch.exp(dt[:, t].float() * A)[..., None, None] * S + (
            dt[:, t].float()[..., None, None] * x[:, t].float()[..., None] * B[:, t].float()[:, :, None, :]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t].float()))
    y = torch.stack(ys, 1).to(x.dtype)
    return (y, S) if return_final_states else y


@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("which", ["fla", "mamba"])
def test_cuda_wrapper_plumbing_with_fake_kernels(which, with_reset):
    x, dt, A, B, C, reset, init = make_inputs(3, 41, 2, 4, 3, seed=8, reset_prob=0.08, with_init=True)
    if with_reset:
        reset[1, 0] = True  # a reset at t=0 drops the row's initial state
        reset[2, 17] = True
    else:
        reset = None
    call = fla_mod._fla_call if which == "fla" else mamba_mod._mamba_call
    kernel = fake_chunk_simple_gla if which == "fla" else fake_mamba_chunk_scan_combined
    y, s = call(kernel, x, dt, A, B, C, reset, init, None, True)
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, reset, init)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
    y_only = call(kernel, x, dt, A, B, C, reset, None, None, False)
    torch.testing.assert_close(y_only, ssd_naive(x, dt, A, B, C, reset, None)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_plan", [False, True])
@pytest.mark.parametrize("which", ["fla", "mamba"])
def test_grouped_entry_maps_gqa_onto_the_kernels(monkeypatch, which, with_plan):
    """ssd_scan_gqa: x / B at key-value width, the query scale and host-built resets reach each kernel as the
    reference computes them (repeat, scale C, ssd_chunked); checked with the contract stand-ins above."""
    torch.manual_seed(3)
    b, T, h, g, p = 2, 37, 4, 2, 3
    x, B = torch.randn(b, T, g, p), torch.randn(b, T, g, p) * 0.5
    C = torch.randn(b, T, h, p)
    dt, A = torch.rand(b, T, h) * 0.5, -torch.rand(h) - 0.2
    plan = None
    if with_plan:
        reset = torch.zeros(b, T, dtype=torch.bool)
        reset[0, 5], reset[1, 0], reset[1, 20] = True, True, True
        plan = ssd_mod.reset_plan(reset)
    want = ssd_mod.ssd_scan_gqa(x, dt, A, B, C, scale=0.3, plan=plan, backend="torch")
    monkeypatch.setattr(ssd_mod, "select_ssd_backend", lambda *a, **k: which)
    monkeypatch.setattr(ssd_mod, "require_cuda", lambda *a, **k: None)

    def fla_with_scale(q, k, v, scale=1.0, **kw):  # fla applies `scale` to q; the stand-in takes 1.0 only
        return fake_chunk_simple_gla(q * scale, k, v, scale=1.0, **kw)

    monkeypatch.setattr(fla_mod, "_import_fla", lambda: fla_with_scale)
    monkeypatch.setattr(mamba_mod, "_import_mamba", lambda: fake_mamba_chunk_scan_combined)
    got = ssd_mod.ssd_scan_gqa(x, dt, A, B, C, scale=0.3, plan=plan, backend=which)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ssd_mod.last_ssd_backend() == which
