"""How the bench measures: a clock on the GPU stream, peak memory, an out-of-memory guard, the memory check
before a run, and the device's own ceilings with the analytic FLOPs the roofline columns divide by them.

A benchmark reports, it does not crash: every measurement runs under `guarded`, which turns an out-of-memory
into {"status": "OOM"} and any other error into {"status": "error", ...} in the JSON.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from linmu_cli.bench.inputs import PREFIX_TOKENS, SUFFIX_TOKENS, VideoPrompt
from linmu_cli.bench.models import text_model
from linmu_cli.errors import LinmuError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Clock:
    """Marks on the GPU stream (CUDA events) or the host clock (CPU); `seconds(a, b)` after `sync()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        """A CUDA event recorded on the current stream, or perf_counter() on CPU."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        """Wait for the GPU, so marks recorded so far can be read."""
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, a: Any, b: Any) -> float:
        """Seconds from mark `a` to mark `b`."""
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a


class Memory:
    """Peak bytes allocated during a block, above what was allocated when it started (None on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = self.peak = None

    def __enter__(self) -> Memory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> bool:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        return False


_OOM_TEXTS = ("out of memory", "ALLOC_FAILED", "can't allocate memory", "not enough memory", "bad_alloc")


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate")."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(t in text for t in _OOM_TEXTS)


def free() -> None:
    """Give back what the last measurement left: Python garbage, then the CUDA caching allocator's blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(fn: Callable[[], dict]) -> dict:
    """Run one measurement; an out-of-memory becomes {"status": "OOM"}, any other error is recorded."""
    result = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash
        result = (
            {"status": "OOM"} if is_oom(exc) else {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        )
    free()
    return result


def available_bytes(device: torch.device) -> int:
    """Memory a run can still take: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class MemoryEstimate:
    """Bytes one bench run needs at its largest frame count, and the parts the refusal message names."""

    total: int
    weights: int
    pixels: int
    vision: int
    lm: int
    kv_cache: int


def estimate_bytes(config: PretrainedConfig, frames: int, resolution: int, dtype: torch.dtype,
                   weights: int) -> MemoryEstimate:  # fmt: skip
    """Peak memory of one bench run at `frames` (the prefill dominates): weights + the random pixels + the
    larger of the vision phase and the LM phase (hidden states, MLP intermediates, the teacher's KV cache).
    At 512 frames, 7B shape, it gives 17.2 GiB against the measured 12.7 GiB prefill peak + 1.7 GiB of pixels
    (docs/benchmarks.md): on the safe side, not by much (tests/bench/test_bench.py)."""
    vc, tc = config.vision_config, config.get_text_config(decoder=True)
    b = torch.tensor([], dtype=dtype).element_size()
    grid = (frames // vc.temporal_patch_size, resolution // vc.patch_size, resolution // vc.patch_size)
    patches = grid[0] * grid[1] * grid[2]
    tokens = patches // vc.spatial_merge_size**2 + PREFIX_TOKENS + SUFFIX_TOKENS + 2
    channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
    pixels = patches * channels * vc.temporal_patch_size * vc.patch_size**2 * (4 + b)  # float32 randn + cast
    embed = getattr(vc, "embed_dim", None) or vc.hidden_size
    hidden_mlp = getattr(vc, "intermediate_size", None) or embed * getattr(vc, "mlp_ratio", 4)
    vision = patches * (embed * 6 + hidden_mlp * 2) * b + patches * embed * 4 * 2  # + float32 rotary q, k
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv = tokens * tc.num_hidden_layers * 2 * tc.num_key_value_heads * head_dim * b
    lm = tokens * (tc.hidden_size * 8 + tc.intermediate_size * 3) * b + kv + tokens * 3 * 8 * 4
    total = int(1.1 * (weights + pixels + max(vision, lm)))
    return MemoryEstimate(total, weights, pixels, vision, lm, kv)


def preflight_memory(config: PretrainedConfig, frame_list: list[int], resolution: int, dtype: torch.dtype,
                     weights: int, dev: torch.device, have: int | None = None) -> dict:  # fmt: skip
    """Refuse a run that cannot fit before allocating anything big (8,000 frames on a CPU would swap for
    minutes, then die); the JSON's `config.memory_check` otherwise."""
    have = available_bytes(dev) if have is None else have
    top = max(frame_list)
    est = estimate_bytes(config, top, resolution, dtype, weights)
    if est.total > have:
        per_frame = max(1, (est.total - 1.1 * weights) / top)
        fit = int((0.95 * have - 1.1 * weights) / per_frame) // 2 * 2
        gib = lambda v: f"{v / 2**30:.1f} GiB"  # noqa: E731
        hint = f"up to ~{fit} frames fit" if fit >= 2 else "not even 2 frames fit"
        raise LinmuError(f"--frames {top} at {resolution}px needs about {gib(est.total)} on {dev.type} (weights "
                         f"{gib(weights)}, pixels {gib(est.pixels)}, prefill {gib(max(est.vision, est.lm))}); "
                         f"{gib(have)} available: {hint}, or lower --resolution")  # fmt: skip
    return {"estimate_bytes": est.total, "available_bytes": have, "frames": top}


@dataclass
class Ceilings:
    """The device's measured limits (the JSON's `environment.ceilings`): matmul rate and copy bandwidth."""

    matmul_flops_per_s: float
    matmul: str  # what was timed
    copy_bytes_per_s: float  # bytes read + written per second
    copy: str

    def to_json(self) -> dict:
        """The JSON object, keys in field order."""
        return asdict(self)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """The device's own limits, measured here in a few hundred ms: dense matmul rate in `dtype` and
    device-to-device copy bandwidth (bytes read + written per second). The roofline columns divide by them."""
    clock = Clock(device)
    n = 8192 if device.type == "cuda" else 512
    mdt = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device).to(mdt)
    b = torch.randn(n, n, device=device).to(mdt)
    reps = 20 if device.type == "cuda" else 3
    torch.matmul(a, b)
    clock.sync()
    t0 = clock.mark()
    for _ in range(reps):
        torch.matmul(a, b)
    t1 = clock.mark()
    clock.sync()
    matmul = 2 * n**3 * reps / clock.seconds(t0, t1)
    del a, b
    numel = (1 << 29) if device.type == "cuda" else (1 << 23)  # 1 GiB / 16 MiB of bf16
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    clock.sync()
    t0 = clock.mark()
    for _ in range(reps):
        dst.copy_(src)
    t1 = clock.mark()
    clock.sync()
    copy = 2 * src.numel() * src.element_size() * reps / clock.seconds(t0, t1)
    del src, dst
    free()
    return Ceilings(matmul, f"{n}x{n}x{n} {str(mdt).replace('torch.', '')} x{reps}",
                    copy, f"{numel * 2 / 2**20:.0f} MiB bf16 copy_ x{reps}, read + write")  # fmt: skip


@dataclass
class Flops:
    """Matrix FLOPs of one run, analytic from shapes: linear layers and softmax attention."""

    linear: int
    attention: int

    @property
    def total(self) -> int:
        """Every counted FLOP."""
        return self.linear + self.attention


def _linear_flops(module: nn.Module, tokens: int) -> int:
    return sum(
        2 * m.in_features * m.out_features * tokens for m in module.modules() if isinstance(m, nn.Linear)
    )


def vision_flops(model: nn.Module, prompt: VideoPrompt) -> Flops:
    """Matrix FLOPs of the vision tower on `prompt` (analytic from shapes): linears, patch embedding, attention
    (Qwen2-VL per frame; Qwen2.5-VL per frame on its full-attention blocks, per window elsewhere)."""
    tower = model.model.visual
    vc = tower.config
    t, h, w = (int(x) for x in prompt.inputs["video_grid_thw"][0].tolist())
    patches, per_frame = t * h * w, h * w
    merge = vc.spatial_merge_size**2
    linear = _linear_flops(tower.blocks, patches) + _linear_flops(tower.merger, patches // merge)
    linear += 2 * tower.patch_embed.proj.weight.numel() * patches
    dim = tower.blocks[0].attn.qkv.in_features
    full = set(getattr(vc, "fullatt_block_indexes", None) or range(len(tower.blocks)))
    win = (getattr(vc, "window_size", 0) // vc.patch_size) ** 2 or per_frame
    attn = sum(
        4 * dim * patches * (per_frame if i in full else min(win, per_frame))
        for i in range(len(tower.blocks))
    )
    return Flops(linear, attn)


def prefill_flops(model: nn.Module, prompt: VideoPrompt, kind: str) -> Flops:
    """Matrix FLOPs of one TTFT run (analytic from shapes; `kind` teacher | linmu | floor): every nn.Linear of
    the decoder layers on every LM token, the LM head on one, the vision tower, and softmax attention (the
    teacher's causal attention; LinMU's 3D windows and text window; none in the floor). LinMU's scans are
    not matrix work and are not counted (docs/design.md §3)."""
    vis = vision_flops(model, prompt)
    text = text_model(model)
    tc = model.config.get_text_config(decoder=True)
    n = prompt.lm_tokens
    linear = vis.linear + _linear_flops(text.layers, n) + 2 * model.lm_head.weight.numel()
    width, layers = tc.num_attention_heads * (tc.hidden_size // tc.num_attention_heads), tc.num_hidden_layers
    if kind == "teacher":
        lm_attn = layers * 4 * width * n * (n + 1) // 2
    elif kind == "linmu":
        mate = model.mate_config
        window = math.prod(mate.vision_window)
        text_tokens = n - prompt.video_tokens
        lm_attn = layers * 4 * width * (prompt.video_tokens * window + text_tokens * min(mate.text_window, n))
    else:
        lm_attn = 0
    return Flops(linear, vis.attention + lm_attn)


def add_roofline(entry: dict | None, flops: Flops | None, ceilings: Ceilings) -> None:
    """Achieved TFLOP/s (TTFT entries) or bytes/s (decode entries) against the measured ceilings, in place."""
    if not entry or entry.get("status") != "ok":
        return
    if flops is not None:
        entry["flops"] = asdict(flops)
        entry["achieved_tflops"] = flops.total / entry["total_s"] / 1e12
        entry["of_matmul_peak"] = flops.total / entry["total_s"] / ceilings.matmul_flops_per_s
    elif "achieved_bytes_per_s" in entry:
        entry["of_copy_bandwidth"] = entry["achieved_bytes_per_s"] / ceilings.copy_bytes_per_s
        kernel = entry.get("attention_kernel") or {}
        if kernel.get("trials_bytes_per_s"):  # the served teacher's decode attention candidates, one by one
            kernel["trials_of_copy_bandwidth"] = {
                n: r / ceilings.copy_bytes_per_s for n, r in kernel["trials_bytes_per_s"].items()
            }


__all__ = ["Ceilings", "Clock", "Flops", "Memory", "MemoryEstimate", "add_roofline", "available_bytes",
           "estimate_bytes", "free", "guarded", "is_oom", "measure_ceilings", "preflight_memory",
           "prefill_flops", "vision_flops"]  # fmt: skip
