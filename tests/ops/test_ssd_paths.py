"""Every CPU path of the SSD scan against the naive scan through one helper (`assert_matches_naive`): the chunked
reference at several chunk sizes, the dispatching entries, the grouped (GQA) entry, the CUDA adapters' argument
plumbing on contract stand-ins, and the decode step run token by token (docs/design.md §3)."""

from __future__ import annotations

import pytest
import torch
from ssd_reference import assert_matches_naive, make_inputs, step_over_sequence
from test_ssd import fake_chunk_simple_gla, fake_mamba_chunk_scan_combined

from linmu_cli.ops.ssd import (
    expand_heads,
    last_ssd_backend,
    last_ssd_step_backend,
    reset_plan,
    ssd_chunked,
    ssd_naive,
    ssd_scan,
    ssd_scan_gqa,
    ssd_step,
    ssd_step_naive,
)
from linmu_cli.ops.ssd import fla as fla_mod
from linmu_cli.ops.ssd import mamba as mamba_mod

CASES = [
    pytest.param(dict(b=2, T=50, h=2, p=5, n=6, reset_prob=0.0, with_init=True), id="init"),
    pytest.param(dict(b=3, T=97, h=4, p=8, n=8, reset_prob=0.08, with_init=True), id="init-resets"),
    pytest.param(dict(b=2, T=7, h=2, p=3, n=3, reset_prob=0.3, with_init=False), id="short-resets"),
    pytest.param(dict(b=1, T=1, h=2, p=4, n=4, reset_prob=0.0, with_init=True), id="one-token"),
]


def inputs_for(case: dict, seed: int = 0):
    inputs = make_inputs(case["b"], case["T"], case["h"], case["p"], case["n"], seed=seed + case["T"],
                         reset_prob=case["reset_prob"], with_init=case["with_init"])  # fmt: skip
    x, dt, A, B, C, reset, init = inputs
    if reset is not None and case["b"] > 1:
        reset[1, 0] = True  # a reset at t = 0 drops the row's initial state
    return x, dt, A, B, C, reset, init


def chunked(cs: int):
    return lambda *a: ssd_chunked(*a, chunk_size=cs, return_final_state=True)


def grouped(x, dt, A, B, C, reset, init):
    plan = reset_plan(reset) if reset is not None else None
    return ssd_scan_gqa(
        x, dt, A, B, C, plan=plan, initial_state=init, return_final_state=True, backend="torch"
    )


def cpu_paths() -> dict[str, object]:
    """name -> (x, dt, A, B, C, reset, initial_state) -> (y, final state), for every path that runs on CPU."""
    return {
        "chunk-1": chunked(1),
        "chunk-16": chunked(16),
        "chunk-64": chunked(64),
        "ssd_scan": lambda *a: ssd_scan(*a, return_final_state=True),
        "ssd_scan_gqa": grouped,
        "fla adapter (stand-in kernel)": lambda *a: fla_mod._fla_call(fake_chunk_simple_gla, *a, None, True),
        "mamba adapter (stand-in kernel)": lambda *a: mamba_mod._mamba_call(
            fake_mamba_chunk_scan_combined, *a, None, True
        ),
        "naive step": step_over_sequence(ssd_step_naive),
        "decode step": step_over_sequence(ssd_step),
    }


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list(cpu_paths()))
def test_every_cpu_path_matches_the_naive_scan(name, case):
    assert_matches_naive(cpu_paths()[name], inputs_for(case), atol=1e-5, rtol=1e-5, name=name)


def test_decode_step_token_by_token_equals_the_naive_scan_in_place():
    """The decode step (ops/ssd/step.py) run over a sequence with an initial state and resets is the naive
    scan, and outside autograd it updates the state tensor it was given (fixed address: CUDA graphs)."""
    x, dt, A, B, C, reset, init = make_inputs(3, 40, 4, 6, 5, seed=5, reset_prob=0.1, with_init=True)
    reset[2, 0] = True
    state = init.clone()
    address = state.data_ptr()
    ys = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            state.mul_((~reset[:, t]).float()[:, None, None, None])
            y, new = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
            assert new is state and state.data_ptr() == address
            ys.append(y)
    assert last_ssd_step_backend() == "torch"
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, reset, init)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s_ref, atol=1e-5, rtol=1e-5)


def test_decode_step_padding_row_keeps_its_state_and_continues_a_chunked_prefill():
    """Prefill with the chunked scan, then decode: equals the naive scan over the whole sequence; a padding token
    (dt = 0, x = 0) in one row leaves that row's state as it was."""
    x, dt, A, B, C, _, init = make_inputs(2, 30, 2, 4, 3, seed=9, with_init=True)
    y_pre, state = ssd_chunked(x[:, :25], dt[:, :25], A, B[:, :25], C[:, :25], None, init, chunk_size=8,
                               return_final_state=True)  # fmt: skip
    dt, x = dt.clone(), x.clone()
    dt[1, 27], x[1, 27] = 0.0, 0.0  # row 1, token 27: padding
    ys = []
    for t in range(25, 30):
        before = state[1].clone()
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        if t == 27:
            torch.testing.assert_close(state[1], before, atol=0, rtol=0)
        ys.append(y)
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, None, init)
    torch.testing.assert_close(torch.cat([y_pre, torch.stack(ys, 1)], 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s_ref, atol=1e-5, rtol=1e-5)


def test_decode_step_under_autograd_is_functional_and_its_gradients_match_the_naive_step():
    x, dt, A, B, C, _, init = make_inputs(2, 1, 3, 4, 5, seed=2, with_init=True)
    leaves = [t[:, 0].clone().requires_grad_(True) for t in (x, dt, B, C)] + [
        init.clone().requires_grad_(True)
    ]
    xs, dts, Bs, Cs, S = leaves
    y, new = ssd_step(xs, dts, A, Bs, Cs, S)
    assert new is not S  # nothing modified in place in grad mode
    y_ref, s_ref = ssd_step_naive(xs, dts, A, Bs, Cs, S)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new, s_ref)
    got = torch.autograd.grad((y.square().sum() + new.sum()), leaves)
    want = torch.autograd.grad((y_ref.square().sum() + s_ref.sum()), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_grouped_entry_equals_the_naive_scan_of_repeated_heads():
    """ssd_scan_gqa: x / B at key/value width, the query scale folded in, resets from a host plan."""
    x, dt, A, B, C, reset, init = make_inputs(2, 37, 4, 3, 3, seed=3, reset_prob=0.1, with_init=True)
    xg, Bg = x[:, :, :2], B[:, :, :2]  # 2 key/value heads for 4 query heads
    y, s = ssd_scan_gqa(xg, dt, A, Bg, C, scale=0.3, plan=reset_plan(reset), initial_state=init,
                        return_final_state=True)  # fmt: skip
    assert last_ssd_backend() == "torch"
    y_ref, s_ref = ssd_naive(expand_heads(xg, 4), dt, A, expand_heads(Bg, 4), C * 0.3, reset, init)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "hopper, triton_version, key_dim, ok, lifted",
    [
        (True, "3.6.0", 128, True, True),  # Qwen2-VL's heads: K tile 128, outside the miscompile
        (True, "3.6.0", 16, True, True),  # the tiny models: K tile 16
        (True, "3.6.0", 64, False, False),  # K tile 64: the miscompile of fla issue #640
        (True, "3.6.0", 33, False, False),  # rounds up to a tile of 64
        (True, "3.6.0", None, False, False),  # width unknown: fla's own check
        (True, "3.7.1", 64, True, False),  # fixed in Triton 3.7.1: nothing to lift
        (True, "3.3.1", 64, True, False),  # before the bug
        (False, "3.6.0", 64, True, False),  # not Hopper
    ],
)
def test_fla_backward_verdict_lifts_the_guard_only_outside_the_miscompile(hopper, triton_version, key_dim, ok,
                                                                           lifted):  # fmt: skip
    from linmu_cli.ops.ssd.fla import fla_backward_verdict, fla_dqkwg_block_k

    got_ok, why, got_lifted = fla_backward_verdict(hopper, triton_version, key_dim)
    assert (got_ok, got_lifted) == (ok, lifted), why
    if not ok:
        assert "#640" in why and "mamba" in why  # says what to do instead
    assert [fla_dqkwg_block_k(k) for k in (8, 16, 32, 33, 64, 65, 128, 256)] == [
        16,
        16,
        32,
        64,
        64,
        128,
        128,
        128,
    ]
