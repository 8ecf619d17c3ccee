"""A faster vision tower for Qwen2-VL and Qwen2.5-VL (teacher or LinMU student): `use_fast_vision(model)`.

transformers' SDPA path of the vision attention splits q / k / v at every `cu_seqlens` boundary and runs one
SDPA call per frame (Qwen2.5-VL: per 8x8-patch window on its window layers: 16 calls per frame at 448x448),
then concatenates; the rotary embedding runs as ~8 separate float32 passes over q and k. At 512 frames that is
256 frames x 32 layers of small kernels plus the float32 traffic (docs/design.md §9: the tower is ~30% of
both models' TTFT, and the same for both, so it dilutes every TTFT ratio).

The fast attention keeps the module's weights and its numerics (rotary in float32, cast back, SDPA with the
module's scale) but:

- attends all sequences of equal length in one SDPA call: consecutive equal-length `cu_seqlens` runs are a
  contiguous slice reshaped to (count, heads, length, head_dim), no copies; irregular lists (images of
  different sizes, Qwen2.5-VL's partial border windows) are gathered into one padded batch with a key mask;
- the sequence plan is computed once per `cu_seqlens` tensor and reused by all 32 blocks (one host sync
  per distinct tensor, not per block);
- on CUDA, the rotary embedding and the MLP activation run as one fused kernel each (`torch.compile` of those
  elementwise functions, `dynamic=True`, rounding every intermediate as eager does: `EAGER_ROUNDING`; pass
  `compile=False` to keep them eager), with Triton's own cache directory kept for every other Triton kernel of
  the process (`_keep_triton_cache_dir`).

`use_fast_vision(model)` patches the vision attention modules (and, when compiling, the MLP activations) of
any model linmu loads that has a Qwen2-VL / Qwen2.5-VL tower; `fast_vision_info(model)` says what runs.
tests/test_vision.py checks equality with transformers' tower (float32, CPU, both families, several images /
frames per batch); tests/bench/test_bench_gpu.py checks it in bf16 on a GPU.
"""

from __future__ import annotations

import os
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from linmu_cli.errors import LinmuError

_ATTENTION_CLASSES = ("VisionAttention", "Qwen2_5_VLVisionAttention")
_INDEX_LIMIT = 2**31 - 1  # elements one compiled elementwise call may see
_PAD_ABOVE_RUNS = 8  # more equal-length runs than this: one padded, masked batch instead of one call per run
# Inductor keeps a fused kernel's intermediates in float32, where eager rounds every bf16 op's result: QuickGELU's
# 1.702 x and sigmoid, rounded once instead of three times, moved the 7B tower's output by 1.6e-2 relative and
# stage 1's loss curve past its noise (docs/benchmarks.md, 2026-12-04). Emulating eager's casts gives the eager
# tower's numbers (bit for bit on the CPU, tests/test_vision.py) in the same one kernel.
EAGER_ROUNDING = {"emulate_precision_casts": True}


# ------------------------------------------------------------------------------------------- elementwise parts
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_eager(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb_vision`: float32 math, cast back (q, k: (L, H, d); cos/sin (L, d))."""
    dtype = q.dtype
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    return (qf * cos + _rotate_half(qf) * sin).to(dtype), (kf * cos + _rotate_half(kf) * sin).to(dtype)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL vision MLP with act(gate) * up as one fused kernel (same math as transformers'); with padded
    weights (`_padded_mlp`) the intermediate width is a multiple of 64."""
    act = getattr(self, "_linmu_silu_mul", None) or _silu_mul
    pad = getattr(self, "_linmu_pad", None)
    if pad is None:
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))
    gw, gb, uw, ub, dw = pad
    return F.linear(act(F.linear(x, gw, gb), F.linear(x, uw, ub)), dw, self.down_proj.bias)


# id(gate weight) -> padded copies, dropped with the weight (shared by a teacher and its LinMU student, whose
# towers hold the same tensor objects)
_PADDED: dict[int, tuple] = {}


def _padded_mlp(module: nn.Module, multiple: int = 64) -> tuple[int, int] | None:
    """Zero-pad a gated MLP's intermediate width to a multiple of `multiple` (Qwen2.5-VL: 3420 -> 3456).

    On the H200 cuBLAS runs the 3420-wide GEMMs with an sm80 kernel at ~30% of the matrix rate (profile:
    benchmarks/results/2026-12-01/issue12/vision.log); the padded rows of gate / up are zero, silu(0) * 0 = 0,
    and the padded columns of down are zero: the same result (tests/test_vision.py). Inference only: the padded
    copies do not follow later updates of the weights."""
    width = module.gate_proj.out_features
    if width % multiple == 0:
        return None
    wide = -(-width // multiple) * multiple
    key = id(module.gate_proj.weight)
    if key not in _PADDED:

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = t.new_zeros((wide, *t.shape[1:]))
            out[:width] = t
            return out

        with torch.no_grad():
            down = module.down_proj.weight.new_zeros(module.down_proj.out_features, wide)
            down[:, :width] = module.down_proj.weight
            _PADDED[key] = (rows(module.gate_proj.weight), rows(module.gate_proj.bias), rows(module.up_proj.weight),
                            rows(module.up_proj.bias), down)  # fmt: skip
        weakref.finalize(module.gate_proj.weight, _PADDED.pop, key, None)
    module._linmu_pad = _PADDED[key]
    return width, wide


@dataclass
class FastVisionInfo:
    """What `use_fast_vision` changed: attention modules patched, compiled parts, plans used so far."""

    attention_modules: int = 0
    compiled: list[str] = field(default_factory=list)
    compile_error: str | None = None
    mlp_padded: tuple[int, int] | None = None  # (width, padded width) of the gated MLPs
    paths: dict[str, int] = field(default_factory=dict)  # "runs" / "padded" -> calls

    def describe(self) -> str:
        comp = f"compiled {'+'.join(self.compiled)}" if self.compiled else "eager elementwise"
        if self.compile_error:
            comp += f" (compile failed, eager: {self.compile_error})"
        if self.mlp_padded:
            comp += f", MLP width padded {self.mlp_padded[0]} -> {self.mlp_padded[1]}"
        return (f"linmu fast vision: one SDPA call per run of equal-length sequences "
                f"({self.attention_modules} attention modules), float32 rotary, {comp}")  # fmt: skip


def _keep_triton_cache_dir() -> None:
    """Pin TRITON_CACHE_DIR, when unset, to Triton's own cache (~/.triton/cache) before inductor compiles.

    Inductor's first CUDA kernel sets the variable, process-wide, to its own directory
    (/tmp/torchinductor_$USER/triton/N; `CachingAutotuner.__init__`); every Triton kernel compiled after that (the
    student's, mamba_ssm's, fla's) misses the warm cache and compiles cold. Session 15 on the H200: the tiny
    recipe's step 1 took 79 s (the first, cold run's 79 s; 14 s warm) and the run missed its 150 s limit."""
    if os.environ.get("TRITON_CACHE_DIR") is None:
        try:
            from triton import knobs
        except ImportError:  # no Triton (CPU-only torch) or one before knobs (3.3): nothing to keep
            return
        os.environ["TRITON_CACHE_DIR"] = knobs.cache.dir


class _Compiled:
    """torch.compile of one elementwise function, compiled on first use; a failure is recorded, then eager."""

    def __init__(self, name: str, fn, info: FastVisionInfo, enabled: bool):
        self.name, self.fn, self.info = name, fn, info
        self.compiled = torch.compile(fn, dynamic=True, options=EAGER_ROUNDING) if enabled else None
        if enabled:
            _keep_triton_cache_dir()
            info.compiled.append(name)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self._chunked(*args)
            except Exception as exc:  # noqa: BLE001 - recorded in fast_vision_info, printed by the bench
                self.compiled = None
                self.info.compile_error = f"{self.name}: {type(exc).__name__}: {str(exc)[:160]}"
                if self.name in self.info.compiled:
                    self.info.compiled.remove(self.name)
        return self.fn(*args)

    def _chunked(self, *args):
        """Inputs over 2^31 elements (the MLP activation at 2,048 frames: 1M patches x 5120) in row chunks, so a
        kernel compiled on small shapes never meets 32-bit index overflow; results written into one output."""
        rows = args[0].shape[0]
        per_row = max(1, max(a.numel() for a in args) // max(rows, 1))
        step = max(1, _INDEX_LIMIT // per_row)
        if rows <= step:
            return self.compiled(*args)
        parts = [self.compiled(*(a[i : i + step] for a in args)) for i in range(0, rows, step)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat([p[j] for p in parts]) for j in range(len(parts[0])))
        return torch.cat(parts)


# ------------------------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class SeqPlan:
    """How to attend the sequences of one `cu_seqlens`: runs of equal length, or one padded batch."""

    runs: tuple[tuple[int, int, int], ...]  # (start token, count, length)
    index: torch.Tensor | None = None  # padded: (n, max_len) token index (clamped)
    valid: torch.Tensor | None = None  # padded: (n, max_len) bool


def seq_plan(cu_seqlens: torch.Tensor) -> SeqPlan:
    """Group the sequences of `cu_seqlens` (one host read) into contiguous equal-length runs."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=False)]
    runs: list[list[int]] = []
    for start, n in zip(bounds[:-1], lengths, strict=False):
        if n == 0:
            continue
        if runs and runs[-1][2] == n:
            runs[-1][1] += 1
        else:
            runs.append([start, 1, n])
    if len(runs) <= _PAD_ABOVE_RUNS:
        return SeqPlan(tuple((a, c, n) for a, c, n in runs))
    starts = torch.tensor([s for s, n in zip(bounds[:-1], lengths, strict=False) if n], dtype=torch.long)
    lens = torch.tensor([n for n in lengths if n], dtype=torch.long)
    offs = torch.arange(int(lens.max()), dtype=torch.long)
    valid = offs[None] < lens[:, None]
    index = torch.where(valid, starts[:, None] + offs[None], starts[:, None])
    dev = cu_seqlens.device
    return SeqPlan((), index.to(dev, non_blocking=True), valid.to(dev, non_blocking=True))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SeqPlan, scale: float,
                      info: FastVisionInfo | None = None) -> torch.Tensor:  # fmt: skip
    """Bidirectional attention inside each sequence of `plan`; q, k, v, result: (L, H, d)."""
    if plan.index is not None:
        if info is not None:
            info.paths["padded"] = info.paths.get("padded", 0) + 1
        qi, ki, vi = (t[plan.index].transpose(1, 2) for t in (q, k, v))  # (n, H, max_len, d)
        mask = plan.valid[:, None, None, :]
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale).transpose(1, 2)
        out = q.new_empty(q.shape)
        out[plan.index[plan.valid]] = o[plan.valid]
        return out
    if info is not None:
        info.paths["runs"] = info.paths.get("runs", 0) + 1
    if len(plan.runs) == 1 and plan.runs[0][0] == 0 and plan.runs[0][1] * plan.runs[0][2] == q.shape[0]:
        _, count, n = plan.runs[0]
        shape = (count, n, *q.shape[1:])
        o = F.scaled_dot_product_attention(
            *(t.reshape(shape).transpose(1, 2) for t in (q, k, v)), scale=scale
        )
        return o.transpose(1, 2).reshape(q.shape)
    out = q.new_empty(q.shape)
    for start, count, n in plan.runs:
        sl = slice(start, start + count * n)
        shape = (count, n, *q.shape[1:])
        o = F.scaled_dot_product_attention(*(t[sl].reshape(shape).transpose(1, 2) for t in (q, k, v)),
                                           scale=scale)  # fmt: skip
        out[sl] = o.transpose(1, 2).reshape(count * n, *q.shape[1:])
    return out


class _PlanCache:
    """The plan of the last few `cu_seqlens` tensors (Qwen2.5-VL alternates two per forward)."""

    def __init__(self) -> None:
        self.entries: list[tuple[Any, SeqPlan]] = []

    def get(self, cu: torch.Tensor) -> SeqPlan:
        key = (cu.data_ptr(), cu.numel(), cu.device, cu._version)
        for k, plan in self.entries:
            if k == key:
                return plan
        plan = seq_plan(cu)
        self.entries = [*self.entries[-3:], (key, plan)]
        return plan


def _fast_attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                            rotary_pos_emb: torch.Tensor | None = None,
                            position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                            **_kwargs) -> torch.Tensor:  # fmt: skip
    """Replacement `forward` of a Qwen2-VL / Qwen2.5-VL vision attention module (same signature)."""
    fast = self._linmu_fast
    n = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).view(n, 3, self.num_heads, -1)
    q, k, v = qkv.unbind(1)
    if position_embeddings is None:  # older transformers: raw frequencies
        emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
        position_embeddings = (emb.cos(), emb.sin())
    cos, sin = position_embeddings
    q, k = fast["rotary"](q, k, cos, sin)
    out = segment_attention(q, k, v, fast["plans"].get(cu_seqlens), self.scaling, fast["info"])
    return self.proj(out.reshape(n, -1))


def _vision_tower(model: nn.Module) -> nn.Module:
    if hasattr(model, "blocks") and hasattr(model, "merger"):  # the tower itself
        return model
    for path in ("model.visual", "visual"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise LinmuError(f"{type(model).__name__} has no Qwen2-VL / Qwen2.5-VL vision tower (model.visual)")


def use_fast_vision(
    model: nn.Module, compile: bool | str = "auto", pad_mlp: bool | str = "auto"
) -> FastVisionInfo:
    """Switch the vision tower of `model` (a Qwen2-VL / Qwen2.5-VL teacher or LinMU model) to the fast path.

    Same weights, same outputs (float32: to rounding; bf16: to bf16 tolerance). `compile="auto"` fuses the
    rotary and the MLP activation with torch.compile on CUDA only (on CPU it would need a C++ toolchain and
    buys nothing); `pad_mlp="auto"` zero-pads Qwen2.5-VL's 3420-wide MLP to 3456 on CUDA (`_padded_mlp`; extra
    memory: ~0.85 GB at 7B, shared by a teacher and its student). Idempotent; returns what was changed (also
    `fast_vision_info(model)`)."""
    tower = _vision_tower(model)
    existing = getattr(tower, "_linmu_fast_info", None)
    if existing is not None:
        return existing
    device = next(tower.parameters()).device
    do_compile = device.type == "cuda" if compile == "auto" else bool(compile)
    do_pad = device.type == "cuda" if pad_mlp == "auto" else bool(pad_mlp)
    info = FastVisionInfo()
    rotary = _Compiled("rotary", rotary_eager, info, do_compile)
    plans = _PlanCache()
    for module in tower.modules():
        if type(module).__name__ in _ATTENTION_CLASSES:
            module._linmu_fast = {"rotary": rotary, "plans": plans, "info": info}
            module.forward = types.MethodType(_fast_attention_forward, module)
            info.attention_modules += 1
        gated = all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        if do_pad and gated and type(module.act_fn).__name__ in ("SiLUActivation", "SiLU"):
            info.mlp_padded = _padded_mlp(module) or info.mlp_padded
            module.forward = types.MethodType(_gated_mlp_forward, module)
        if not do_compile:
            continue
        act = getattr(module, "act", None) if hasattr(module, "fc1") else None
        if (
            act is not None and type(act).__name__ == "QuickGELUActivation"
        ):  # Qwen2-VL: fc2(quick_gelu(fc1 x))
            shared = getattr(tower, "_linmu_quick_gelu", None) or _Compiled(
                "quick_gelu", _quick_gelu, info, True
            )
            tower._linmu_quick_gelu = shared
            act.forward = shared
        gate_act = getattr(module, "act_fn", None) if hasattr(module, "gate_proj") else None
        if gate_act is not None and type(gate_act).__name__ in ("SiLUActivation", "SiLU"):  # Qwen2.5-VL
            shared = getattr(tower, "_linmu_silu_mul", None) or _Compiled("silu_mul", _silu_mul, info, True)
            tower._linmu_silu_mul = shared
            module._linmu_silu_mul = shared
            module.forward = types.MethodType(_gated_mlp_forward, module)
    if info.attention_modules == 0:
        raise LinmuError(
            f"{type(tower).__name__}: no Qwen2-VL / Qwen2.5-VL vision attention modules to speed up"
        )
    tower._linmu_fast_info = info
    return info


def fast_vision_info(model: nn.Module) -> FastVisionInfo | None:
    """What `use_fast_vision` did to this model's tower (None: transformers' own tower runs)."""
    return getattr(_vision_tower(model), "_linmu_fast_info", None)


__all__ = ["FastVisionInfo", "SeqPlan", "fast_vision_info", "rotary_eager", "segment_attention", "seq_plan",
           "use_fast_vision"]  # fmt: skip
