"""The one comparison every SSD path goes through: its output and final state against the naive scan
(`linmu_cli.ops.ssd.naive`, the recurrence of docs/design.md §3 token by token), on the same inputs."""

from __future__ import annotations

from collections.abc import Callable

import torch

from linmu_cli.ops.ssd import ssd_naive

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
               torch.Tensor | None]  # fmt: skip
# (x, dt, A, B, C, reset, initial_state) -> (y, final state)
Path = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def make_inputs(
    b: int, T: int, h: int, p: int, n: int, *, seed: int = 0, reset_prob: float = 0.0, with_init: bool = False,
    device: str = "cpu",
) -> Inputs:  # fmt: skip
    """Random scan inputs in float32 (A in mamba2's init range scaled down, dt after softplus)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, h, p, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, T, h, generator=g) - 1.0)
    A = -torch.exp(torch.empty(h).uniform_(0.0, 1.5, generator=g))
    B = torch.randn(b, T, h, n, generator=g) / n**0.5
    C = torch.randn(b, T, h, n, generator=g) / n**0.5
    reset = (torch.rand(b, T, generator=g) < reset_prob) if reset_prob > 0 else None
    init = torch.randn(b, h, p, n, generator=g) if with_init else None
    return tuple(t.to(device) if t is not None else None for t in (x, dt, A, B, C, reset, init))  # type: ignore[return-value]


def step_over_sequence(step: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """A one-token step (`ssd_step`, `ssd_step_naive`) as a scan: token by token, the state zeroed where a reset
    starts a new sequence (as the naive scan does), the initial state copied first (the step may write in place)."""

    def scan(x, dt, A, B, C, reset=None, initial_state=None):
        b, T, h, p = x.shape
        n = B.shape[-1]
        if initial_state is not None:
            state = initial_state.float().clone()
        else:
            state = torch.zeros(b, h, p, n, device=x.device)
        ys = []
        for t in range(T):
            if reset is not None:
                state = state * (~reset[:, t]).to(state.dtype)[:, None, None, None]
            y, state = step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1), state

    return scan


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ||a - b|| / ||b||."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_matches_naive(
    path: Path, inputs: Inputs, *, atol: float | None = None, rtol: float | None = None,
    max_rel: float | None = None, name: str = "path",
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Run `path` on `inputs` and check y and the final state against `ssd_naive` on the same values in float32:
    elementwise (`atol` / `rtol`, CPU float32) or by relative norm (`max_rel`, bf16 kernels). Returns (y, state)."""
    x, dt, A, B, C, reset, init = inputs
    y, state = path(x, dt, A, B, C, reset, init)
    as_f32 = [t.float() if t is not None else None for t in (x, dt, A, B, C)]
    y_ref, s_ref = ssd_naive(*as_f32, reset, init.float() if init is not None else None)
    assert y.shape == y_ref.shape and state.shape == s_ref.shape, name
    assert y.dtype == x.dtype and state.dtype == torch.float32, name
    if max_rel is None:
        torch.testing.assert_close(y.float(), y_ref, atol=atol, rtol=rtol, msg=lambda m: f"{name} y: {m}")
        torch.testing.assert_close(state, s_ref, atol=atol, rtol=rtol, msg=lambda m: f"{name} state: {m}")
    else:
        errs = {"y": rel(y.float(), y_ref), "state": rel(state, s_ref)}
        print(f"\n[ssd] {name}: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
        assert all(v < max_rel for v in errs.values()), (name, errs)
    return y, state
