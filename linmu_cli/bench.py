"""`linmu bench`: time to first token, decode throughput and memory of a teacher VLM and its LinMU conversion.

Both models run the same synthetic video in one process, alternately, after a warm-up. The video has the real
processor's token layout (frames/2 x H/28 x W/28 LM tokens between vision_start / vision_end, chat-like text
around it) with random pixels: speed depends on shapes, not values, so `--arch` builds the published
architecture with random weights and no checkpoint is needed (docs/design.md §8-9 for the H200 context).

Per frame count it reports, for the teacher and for LinMU:

- TTFT = vision tower + LM prefill (to the first token's logits) + the first decode step, timed with CUDA
  events (perf_counter on CPU), median over `repeats` runs, with its split;
- the LinMU floor: the same LinMU model with its scans and window attention skipped (layers/floor.py), and
  LinMU TTFT as a multiple of it;
- decode throughput (tokens/s) at batch 1 (cache from the real prefill), at an equal batch for both (16) and at
  the largest batch that fits (doubling search until out of memory; at least the equal batch on CPU), the larger
  batches on caches filled with random values of the right shapes (decode cost does not depend on them; the
  output says so per entry);
- peak memory of prefill and of decoding, cache bytes per sequence; "OOM" where something does not fit.

Decoding (issue 12): the headline teacher is the teacher as it is served (`linmu_cli.teacher_decode`: static KV
cache, the fastest measured q_len=1 decode attention, one CUDA graph per step); `teacher_hf` is transformers'
forward with its DynamicCache (what `generate()` does). LinMU runs its fixed-buffer step
(`linmu_cli.fast_decode`), captured in a CUDA graph on CUDA, and also, at batch 1, through transformers' forward
(`batch_1_hf`) for a same-harness comparison. Both models run the same vision tower (`linmu_cli.vision`, unless
`fast_vision=False`). Roofline fields compare each TTFT with the device's measured matrix rate and each decode
step with its measured copy bandwidth (`measure_ceilings`). Schema `linmu-bench/2` (docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linmu_cli.errors import LinmuError

SCHEMA = "linmu-bench/2"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
PREFIX_TOKENS, SUFFIX_TOKENS = (
    20,
    15,
)  # chat template + system prompt before the video; question + header after
Progress = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------- inputs
@dataclass
class VideoPrompt:
    frames: int
    resolution: int
    video_tokens: int
    inputs: dict[str, torch.Tensor]

    @property
    def lm_tokens(self) -> int:
        return self.inputs["input_ids"].shape[1]


def synthetic_video(config, frames: int, resolution: int, device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> VideoPrompt:  # fmt: skip
    """One chat-like prompt around a video of `frames` random frames of resolution x resolution.

    Shapes are the processor's: `pixel_values_videos` (frames/2 * (H/14) * (W/14), 3 * 2 * 14 * 14),
    `video_grid_thw` [[frames/2, H/14, W/14]], frames/2 * (H/28) * (W/28) video tokens in `input_ids`, plus
    `mm_token_type_ids` and `attention_mask`.
    """
    vc = config.vision_config
    patch, merge, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
    grid = (frames // tp, resolution // patch, resolution // patch)
    video_tokens = grid[0] * (grid[1] // merge) * (grid[2] // merge)
    gen = torch.Generator(device=device).manual_seed(seed)
    specials = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
                config.vision_end_token_id]  # fmt: skip
    vocab = config.get_text_config(decoder=True).vocab_size
    text_hi = min(min(specials), vocab)  # ordinary (BPE) ids sit below the special ones in Qwen vocabularies

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, text_hi, (n,), generator=gen, device=device)

    ids = torch.cat([
        text(PREFIX_TOKENS),
        torch.tensor([config.vision_start_token_id], device=device),
        torch.full((video_tokens,), config.video_token_id, device=device),
        torch.tensor([config.vision_end_token_id], device=device),
        text(SUFFIX_TOKENS),
    ])[None]  # fmt: skip
    pixels = torch.randn(grid[0] * grid[1] * grid[2], channels * tp * patch * patch, generator=gen,
                         device=device).to(dtype)  # fmt: skip
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == config.video_token_id).long() * 2,
        "pixel_values_videos": pixels,
        "video_grid_thw": torch.tensor([grid], device=device),
    }
    return VideoPrompt(frames, resolution, video_tokens, inputs)


# ----------------------------------------------------------------------------------------------------- models
def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LinmuError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _cache_kw(model: nn.Module) -> str:
    from linmu_cli.models.modeling_linmu import _cache_arg

    cls = model.family.model_class if hasattr(model, "family") else type(model)
    return _cache_arg(cls)


def _share(dst: nn.Module, name: str, tensor: torch.Tensor) -> None:
    from linmu_cli.models.modeling_linmu import _set_tensor

    _set_tensor(dst, name, tensor)


def teacher_from_student(student: nn.Module) -> nn.Module:
    """The source-family model a LinMU checkpoint came from, sharing every tensor with it: non-attention
    weights as they are, attention weights from Local-Swin's copies (Flex-MA's when Local-Swin is off)."""
    family = student.family
    data = student.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "mate"):
        data.pop(key, None)
    config = family.config_class(**data)
    with torch.device("meta"):
        teacher = family.model_class._from_config(config, attn_implementation="sdpa")
    for name, tensor in [*student.named_parameters(remove_duplicate=False),
                         *student.named_buffers(remove_duplicate=False)]:  # fmt: skip
        if ".self_attn." not in name:
            _share(teacher, name, tensor)
    for s_layer, t_layer in zip(family.decoder_layers(student), family.decoder_layers(teacher), strict=True):
        src = s_layer.self_attn.swin if hasattr(s_layer.self_attn, "swin") else s_layer.self_attn.flex
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for attr in ("weight", "bias"):
                t = getattr(getattr(src, proj), attr, None)
                if t is not None and getattr(getattr(t_layer.self_attn, proj), attr, None) is not None:
                    getattr(t_layer.self_attn, proj)._parameters[attr] = t
    leftover = [n for n, t in [*teacher.named_parameters(), *teacher.named_buffers()] if t.is_meta]
    if leftover:
        raise LinmuError(
            f"cannot rebuild the teacher of this LinMU checkpoint: {leftover[:3]} have no source"
        )
    return teacher.eval()


def _set_ssd_backend(student: nn.Module, backend: str) -> None:
    from linmu_cli.layers.mate import MateAttention

    mate = student.mate_config.replace(ssd_backend=backend)
    student.config.mate = mate.to_dict()
    for module in student.modules():
        if isinstance(module, MateAttention):
            for part in (module, getattr(module, "flex", None), getattr(module, "swin", None)):
                if part is not None:
                    part.mate = mate


def _prefill_backend(device: torch.device, requested: str | None) -> str:
    """Inference needs no backward: on CUDA prefer fla's forward (2.5x mamba-ssm's at 64k tokens, docs/design.md §9)."""
    if requested:
        return requested
    if device.type == "cuda":
        from linmu_cli.ops.ssd import _backend_import_error

        if _backend_import_error("fla") is None:
            return "fla"
    return "auto"


def build_models(model: str | None, arch: str | None, dtype: torch.dtype, device: torch.device,
                 mate_fields: dict[str, Any]) -> tuple[nn.Module, nn.Module, str]:  # fmt: skip
    """(teacher, LinMU student sharing its weights, description of where they came from)."""
    from linmu_cli.config import MateConfig
    from linmu_cli.models import convert_model

    if arch is not None:
        from linmu_cli.archs import build_random_model

        teacher = build_random_model(arch, dtype, device)
        source = f"--arch {arch} (random weights)"
    else:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise LinmuError(
                f"--model {model}: no config.json there; pass a checkpoint directory or use --arch"
            )
        from linmu_cli.sources import read_model_type

        model_type, _ = read_model_type(path)
        if model_type.startswith("linmu_"):
            from transformers import AutoModelForImageTextToText

            import linmu_cli  # noqa: F401  (registers the LinMU classes)

            student = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
            if mate_fields:
                raise LinmuError("--set / --ssd-backend change a conversion; --model is already converted "
                                 "(its M-MATE fields are in its config.json)")  # fmt: skip
            _set_ssd_backend(student, _prefill_backend(device, None))
            return teacher_from_student(student), student, f"--model {path} (LinMU checkpoint)"
        from linmu_cli.sources import load_teacher

        name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
        teacher = load_teacher(str(path), dtype=name, device=str(device)).model
        source = f"--model {path}"
    fields = dict(mate_fields)
    fields["ssd_backend"] = _prefill_backend(device, fields.get("ssd_backend"))
    mate = MateConfig.from_dict(fields)
    with torch.device(device):  # new M-MATE parameters are created where they run
        student = convert_model(teacher, mate)
    return teacher, student, source


# ----------------------------------------------------------------------------------------------------- timing
class Clock:
    """Marks on the GPU stream (CUDA events) or the host clock (CPU); `seconds(a, b)` after `sync()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a


class Memory:
    """Peak bytes allocated during a block, above what was allocated when it started (None on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = self.peak = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        return False


_OOM_TEXTS = ("out of memory", "ALLOC_FAILED", "can't allocate memory", "not enough memory", "bad_alloc")


def _is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate")."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(t in text for t in _OOM_TEXTS)


def _free() -> None:
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
            {"status": "OOM"}
            if _is_oom(exc)
            else {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        )
    _free()
    return result


def _next_positions(model: nn.Module, prompt_len: int, batch: int, device: torch.device) -> torch.Tensor:
    """(3, batch, 1) M-RoPE position of the first generated token: prompt length + the prompt's rope delta."""
    pos = torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)
    delta = getattr(getattr(model, "model", None), "rope_deltas", None)
    if isinstance(delta, torch.Tensor):
        pos = pos + delta.to(device=device, dtype=torch.long).reshape(-1, 1)[:1]
    return pos.view(1, batch, 1).expand(3, batch, 1).contiguous()


def _cache_of(out) -> Any:
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def measure_ttft(model: nn.Module, prompt: VideoPrompt, device: torch.device) -> tuple[dict, Any]:
    """One TTFT run: (timings, (cache, next token, next positions)) for decoding on from it."""
    clock, marks = Clock(device), {}

    def marker(key: str):
        def hook(*_args) -> None:  # returns None: a hook's return value would replace the inputs / outputs
            marks.setdefault(key, clock.mark())

        return hook

    visual = model.model.visual
    hooks = [visual.register_forward_pre_hook(marker("v0")), visual.register_forward_hook(marker("v1"))]
    kw = _cache_kw(model)
    try:
        with Memory(device) as mem, torch.no_grad():
            clock.sync()
            m0 = clock.mark()
            out = model(**prompt.inputs, use_cache=True, logits_to_keep=1)
            m1 = clock.mark()
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = _cache_of(out)
            pos = _next_positions(model, prompt.lm_tokens, 1, device)
            out = model(input_ids=token, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            m2 = clock.mark()
            clock.sync()
    finally:
        for h in hooks:
            h.remove()
    vision = clock.seconds(marks["v0"], marks["v1"]) if "v1" in marks else 0.0
    total = clock.seconds(m0, m2)
    timings = {"total_s": total, "vision_s": vision, "prefill_s": clock.seconds(m0, m1) - vision,
               "first_step_s": clock.seconds(m1, m2), "peak_bytes": mem.peak}  # fmt: skip
    return timings, (cache, token, pos + 1)


def _summarize_ttft(runs: list[dict]) -> dict:
    """Median over the runs: the middle run, or for an even count the mean of the two middle runs (every part
    averaged over the same runs, so the split still sums to the total)."""
    ordered = sorted(runs, key=lambda r: r["total_s"])
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    keys = ("total_s", "vision_s", "prefill_s", "first_step_s")
    best = {k: sum(r[k] for r in middle) / len(middle) for k in keys}
    return {"status": "ok", **best,
            "runs_s": [r["total_s"] for r in runs],
            "prefill_peak_bytes": max((r["peak_bytes"] for r in runs if r["peak_bytes"] is not None),
                                      default=None)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- decoding
def _kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def storage_bytes(cache) -> int:
    """Bytes of the distinct storages a cache's tensors live in: what it really keeps alive (a view of a
    prompt-length tensor counts in full)."""
    tensors = []
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "tensors"):  # LinMU's MateLayerState
            tensors += [t for _, t in layer.tensors()]
        else:
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                        if isinstance(t, torch.Tensor)]  # fmt: skip
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def random_kv_cache(model: nn.Module, batch: int, length: int, seed: int = 0):
    """A transformers DynamicCache of `length` tokens per sequence filled with random keys / values."""
    from transformers import DynamicCache

    tc = model.config.get_text_config(decoder=True)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    ref = model.lm_head.weight
    gen = torch.Generator(device=ref.device).manual_seed(seed)
    cache = DynamicCache()
    shape = (batch, tc.num_key_value_heads, length, head_dim)
    for i in range(tc.num_hidden_layers):
        k = (torch.randn(shape, generator=gen, device=ref.device) * 0.5).to(ref.dtype)
        v = (torch.randn(shape, generator=gen, device=ref.device) * 0.5).to(ref.dtype)
        cache.update(k, v, i)
        del k, v
    return cache


def _n_steps(step_s: float, budget_s: float, cap: int, floor: int) -> int:
    return max(floor, min(cap, int(budget_s / max(step_s, 1e-6))))


class Decoding:
    """Decode-throughput measurements with shared settings."""

    def __init__(self, device: torch.device, new_tokens: int, seconds: float, use_graph: bool,
                 teacher_kernel: str = "auto"):  # fmt: skip
        self.device, self.new_tokens, self.seconds, self.use_graph = device, new_tokens, seconds, use_graph
        self.teacher_kernel = teacher_kernel
        self.clock = Clock(device)
        self._weights: dict[int, int] = {}

    def _time(self, step: Callable[[], Any]) -> tuple[int, float]:
        """Time `step` after the caller's warm-up: a 2-step probe picks how many steps fit the time budget."""
        c = self.clock
        c.sync()
        a = c.mark()
        for _ in range(2):
            step()
        b = c.mark()
        c.sync()
        steps = _n_steps(c.seconds(a, b) / 2, self.seconds, self.new_tokens, 4 if c.cuda else 2)
        a = c.mark()
        for _ in range(steps):
            step()
        b = c.mark()
        c.sync()
        return steps, c.seconds(a, b)

    def teacher(
        self, model: nn.Module, batch: int, prompt_len: int, start=None, check_only: bool = False
    ) -> dict:
        """The served teacher (`teacher_decode`): static KV cache, q_len=1 decode kernel, one CUDA graph."""
        from linmu_cli.teacher_decode import ServedTeacherDecoder

        extra = self.new_tokens + 16  # the timed steps, the probe, the warm-up and graph-capture steps
        with Memory(self.device) as mem, torch.no_grad():
            if start is not None:
                cache, token, pos = start
                dec = ServedTeacherDecoder.from_cache(
                    model, cache, token, pos, extra, kernel=self.teacher_kernel
                )
                fill = "prefill"
            else:
                kernel = "sdpa_masked" if check_only else self.teacher_kernel
                dec = ServedTeacherDecoder.random(model, batch, prompt_len + 1, extra, kernel=kernel)
                fill = "random"
            if check_only:
                dec.step()
                self.clock.sync()
                return {"status": "ok", "batch": batch}
            loop = "eager"
            if self.use_graph:
                dec.capture()  # no fallback: a failed capture is this entry's error
                loop = "CUDA graph"
            else:
                dec.step()
            steps, seconds = self._time(dec.step)
            cache_bytes, read = dec.nbytes(), dec.read_bytes()
            choice = dec.choice
            dec.release()
        mode = f"{loop} (static KV cache, {choice.name} decode attention)"
        entry = self._entry(batch, steps, seconds, fill, mode, cache_bytes, mem,
                            step_bytes=self.weight_bytes(model) + read)  # fmt: skip
        entry["attention_kernel"] = {
            "name": choice.name,
            "split_chunks": choice.chunks,
            "trials_ms": choice.trials,
        }
        return entry

    def weight_bytes(self, model: nn.Module) -> int:
        """Bytes of weights one decode step reads: decoder layers, final norm, LM head (once per model)."""
        key = id(model)
        if key not in self._weights:
            text = model.family.text_model(model) if hasattr(model, "family") else model.model.language_model
            self._weights[key] = _bytes(nn.ModuleList([text.layers, text.norm, model.lm_head]))
        return self._weights[key]

    def teacher_hf(
        self, model: nn.Module, batch: int, prompt_len: int, start=None, check_only: bool = False
    ) -> dict:
        """transformers forward with a DynamicCache (what `generate()` runs): the real prefill cache (`start`)
        or a random one."""
        kw = _cache_kw(model)
        with Memory(self.device) as mem, torch.no_grad():
            if start is not None:
                cache, token, pos = start
                fill = "prefill"
            else:
                cache = random_kv_cache(model, batch, prompt_len + 1)
                token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
                pos = _next_positions(model, prompt_len + 1, batch, self.device)
                fill = "random"
            cache_bytes = _kv_bytes(cache)
            state = {"token": token, "pos": pos}

            def step():
                out = model(input_ids=state["token"], position_ids=state["pos"], use_cache=True, logits_to_keep=1,
                            **{kw: cache})  # fmt: skip
                state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)
                state["pos"] = state["pos"] + 1

            step()  # warm-up
            if check_only:
                self.clock.sync()
                return {"status": "ok", "batch": batch}
            steps, seconds = self._time(step)
        entry = self._entry(batch, steps, seconds, fill, "transformers eager, DynamicCache", cache_bytes, mem,
                            prefill_held=cache_bytes if start is not None else 0,
                            step_bytes=self.weight_bytes(model) + cache_bytes)  # fmt: skip
        if start is not None:
            entry["prefill_cache_storage_bytes"] = storage_bytes(start[0])
        return entry

    def linmu(
        self, model: nn.Module, batch: int, prompt_len: int, start=None, check_only: bool = False
    ) -> dict:
        """The fixed-buffer decode step (`fast_decode`), as one CUDA graph when enabled."""
        from linmu_cli.fast_decode import StaticDecoder

        held = None
        with Memory(self.device) as mem, torch.no_grad():
            if start is not None:
                cache, token, pos = start
                held = storage_bytes(cache)  # what generate() would keep: the prefill's LinMUCache
                dec = StaticDecoder.from_cache(model, cache, token, pos)
                fill = "prefill"
            else:
                dec = StaticDecoder.random(model, batch, position=prompt_len + 1)
                fill = "random"
            mode = "eager (fixed buffers)"
            if check_only:
                dec.step()
                self.clock.sync()
                return {"status": "ok", "batch": batch}
            if self.use_graph:
                try:
                    dec.capture()
                    mode = "CUDA graph (fixed buffers)"
                except Exception as exc:  # noqa: BLE001 - fall back, and say so
                    if _is_oom(exc):
                        raise
                    dec.graph = None
                    mode = f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"
            else:
                dec.step()  # warm-up
            steps, seconds = self._time(dec.step)
            state_bytes = dec.nbytes()
            written = sum(
                t.numel() * t.element_size() for st in dec.states for t in (st.ssm, st.conv) if t is not None
            )  # fmt: skip  (SSM state and conv tail: read and written back)
            dec.release()
        entry = self._entry(batch, steps, seconds, fill, mode, state_bytes, mem,
                            step_bytes=self.weight_bytes(model) + state_bytes + written)  # fmt: skip
        if held is not None:
            entry["prefill_cache_storage_bytes"] = held
        return entry

    def linmu_hf(self, model: nn.Module, start) -> dict:
        """LinMU at batch 1 through the same transformers forward and cache the teacher uses."""
        kw = _cache_kw(model)
        cache, token, pos = start
        with Memory(self.device) as mem, torch.no_grad():
            state = {"token": token, "pos": pos}

            def step():
                out = model(input_ids=state["token"], position_ids=state["pos"], use_cache=True, logits_to_keep=1,
                            **{kw: cache})  # fmt: skip
                state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)
                state["pos"] = state["pos"] + 1

            step()
            steps, seconds = self._time(step)
        return self._entry(1, steps, seconds, "prefill", "transformers eager, LinMUCache", cache.nbytes(), mem,
                           prefill_held=cache.nbytes())  # fmt: skip

    @staticmethod
    def _entry(batch, steps, seconds, fill, mode, cache_bytes, mem: Memory, prefill_held: int = 0,
               step_bytes: int | None = None) -> dict:  # fmt: skip
        peak = None if mem.peak is None else mem.peak + prefill_held
        entry = {"status": "ok", "batch": batch, "tokens_per_s": batch * steps / seconds,
                 "step_ms": 1000 * seconds / steps, "steps": steps, "cache_fill": fill, "mode": mode,
                 "cache_bytes": cache_bytes, "cache_bytes_per_seq": cache_bytes / batch, "peak_bytes": peak}  # fmt: skip
        if step_bytes is not None:  # roofline: bytes one step must move (weights + cache / state) per second
            entry["bytes_per_step"] = step_bytes
            entry["achieved_bytes_per_s"] = step_bytes * steps / seconds
        return entry


def search_batch(fits: Callable[[int], dict], cap: int) -> dict:
    """Double the batch from 1 while `fits(b)` succeeds (an OOM ends the search), up to `cap`."""
    tried, best, first_oom = [], None, None
    b = 1
    while b <= cap:
        res = guarded(lambda b=b: fits(b))
        tried.append(b)
        if res.get("status") != "ok":
            if res.get("status") == "OOM":
                first_oom = b
            else:
                return {"largest_fit": best, "first_oom": None, "tried": tried, "error": res.get("error")}
            break
        best = b
        b *= 2
    return {"largest_fit": best, "first_oom": first_oom, "tried": tried, "capped": first_oom is None}


# ----------------------------------------------------------------------------------------------------- run
def _ratio(num: dict | None, den: dict | None, key: str) -> float | None:
    if not num or not den or num.get("status") != "ok" or den.get("status") != "ok":
        return None
    a, b = num.get(key), den.get(key)
    return a / b if a and b else None


def crossover(results: list[dict]) -> dict:
    """Smallest frame count where LinMU's TTFT drops below the teacher's (log-frames interpolation)."""
    pts = [(r["frames"], r["ratios"]["ttft"]) for r in results if r["ratios"].get("ttft")]
    if not pts:
        return {"frames": None, "text": "not measured"}
    for i, (f, ratio) in enumerate(pts):
        if ratio >= 1.0:
            if i == 0:
                return {"frames": None, "bracket": [None, f], "text": f"LinMU is faster at every measured count "
                        f"(crossover at or below {f} frames)"}  # fmt: skip
            f0, r0 = pts[i - 1]
            x = math.log2(f0) + (1.0 - r0) / (ratio - r0) * (math.log2(f) - math.log2(f0))
            value = round(2**x)
            return {"frames": value, "bracket": [f0, f],
                    "text": f"~{value} frames (TTFT ratio {r0:.2f} at {f0}, {ratio:.2f} at {f})"}  # fmt: skip
    return {"frames": None, "bracket": [pts[-1][0], None], "text": f"not reached up to {pts[-1][0]} frames"}


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    env = {"device": device.type, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": _version("transformers"), "triton": _version("triton"), "fla-core": _version("fla-core"),
           "mamba-ssm": _version("mamba-ssm"), "linmu": _version("linmu"), "dtype": str(dtype).replace("torch.", ""),
           "host": platform.node(), "cpu_threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
    return env


def _bytes(model: nn.Module, skip: set[int] | None = None) -> int:
    seen = set(skip or ())
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def parse_frames(values: list[str] | str) -> list[int]:
    items = [values] if isinstance(values, str) else list(values)
    out: list[int] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise LinmuError(f"--frames {item!r}: give frame counts like 64 or 64,128,256") from None
            if n < 2 or n % 2:
                raise LinmuError(f"--frames {n}: needs an even count >= 2 (Qwen2-VL merges pairs of frames)")
            out.append(n)
    if not out:
        raise LinmuError("--frames: give at least one frame count, e.g. --frames 64,128")
    return sorted(set(out))


def _check_args(model, arch, resolution, batch, new_tokens, repeats, device_name, plot_path, equal_batch):
    if (model is None) == (arch is None):
        raise LinmuError("give exactly one of --model DIR or --arch ALIAS (e.g. --arch qwen2-vl-7b)")
    if arch is not None:
        from linmu_cli.archs import ARCHS, TINY_ARCHS, known_archs

        if arch not in ARCHS and arch not in TINY_ARCHS:
            raise LinmuError(f"unknown --arch {arch!r}; known: {', '.join(known_archs())}")
    if resolution < 28 or resolution % 28:
        raise LinmuError(f"--resolution {resolution}: needs a multiple of 28 (patch 14 x spatial merge 2)")
    if batch != "auto" and (not isinstance(batch, int) or batch < 1):
        raise LinmuError(f"--batch {batch!r}: give 'auto' or a positive integer")
    if new_tokens < 1:
        raise LinmuError("--new-tokens must be at least 1")
    if repeats < 1:
        raise LinmuError("--repeats must be at least 1")
    if equal_batch < 1:
        raise LinmuError("--equal-batch must be at least 1")
    if device_name not in ("cuda", "cpu") and not device_name.startswith("cuda:"):
        raise LinmuError(f"--device {device_name!r}: choose cuda or cpu")
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise LinmuError(
            "--device cuda: no CUDA GPU is visible here; use --device cpu (e.g. with --arch tiny-qwen2-vl)"
        )
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise LinmuError(
                "--plot needs matplotlib: pip install 'linmu[bench]' (or pip install matplotlib)"
            ) from None


def parse_batch(value: str | int) -> str | int:
    if isinstance(value, int):
        return value
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise LinmuError(f"--batch {value!r}: give 'auto' or a positive integer") from None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


SKIPPED = {"status": "skipped", "reason": "time budget"}


class _Runner:
    """One benchmark session: the two models, the decode settings and the time budget."""

    def __init__(self, teacher, student, dev, decoding: Decoding, repeats: int, equal_batch: int, batch, cap: int,
                 deadline: float | None, say: Progress):  # fmt: skip
        self.teacher, self.student, self.dev, self.dec = teacher, student, dev, decoding
        self.repeats, self.equal_batch, self.batch, self.cap = repeats, equal_batch, batch, cap
        self.deadline, self.say = deadline, say
        self.one_run_above_s = (
            3.0  # a teacher TTFT above this: one repeat (512+ frames at 7B shape on an H200)
        )

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "linmu": self.student}

    def warm_up(self, prompt: VideoPrompt) -> None:
        """Every kernel path once (Triton compiles, cuBLAS heuristics, allocator growth); not recorded.

        Failures are reported and left to the measurements, which record them per entry."""
        from linmu_cli.layers.floor import skip_mixers

        for name, m in self.models().items():
            held: dict[str, Any] = {}

            def prefill(m=m, held=held):
                held["start"] = measure_ttft(m, prompt, self.dev)[1]
                return {"status": "ok"}

            res = guarded(prefill)
            if res["status"] == "ok":
                fns = [self.dec.linmu] if name == "linmu" else [self.dec.teacher, self.dec.teacher_hf]
                start = held.pop("start")
                for fn in fns:
                    res = guarded(lambda fn=fn, m=m, start=start: fn(m, 1, prompt.lm_tokens, start))
                    if res.get("status") != "ok":
                        break
                del start
            if res.get("status") != "ok":
                self.say(f"warning: warm-up of the {name} model: {res}")
            elif "failed" in res.get("mode", ""):
                self.say(f"warning: {res['mode']}")
            held.clear()
        with skip_mixers():
            res = guarded(lambda: {"status": "ok", **measure_ttft(self.student, prompt, self.dev)[0]})
        if res["status"] != "ok":
            self.say(f"warning: warm-up of the LinMU floor: {res}")
        _free()

    def ttft(self, prompt: VideoPrompt) -> tuple[dict[str, dict], dict[str, Any]]:
        """TTFT of teacher, LinMU and the LinMU floor, alternating, `repeats` times (once for long runs).

        Returns the summaries and, per model, the state after its last run (to decode on from at batch 1)."""
        from linmu_cli.layers.floor import skip_mixers

        runs: dict[str, list] = {"teacher": [], "linmu": [], "floor": []}
        failed: dict[str, dict] = {}
        starts: dict[str, Any] = {}
        for rep in range(self.repeats):
            for name in runs:
                if name in failed:
                    continue
                if self.out_of_time():
                    failed[name] = SKIPPED
                    continue
                m = self.student if name != "teacher" else self.teacher
                starts.pop(name, None)  # one prefill cache per model in memory at a time
                holder: dict[str, Any] = {}

                def one(name=name, m=m, holder=holder):
                    with skip_mixers(name == "floor"):
                        timings, start = measure_ttft(m, prompt, self.dev)
                    if name != "floor":
                        holder["start"] = start
                    return {"status": "ok", **timings}

                res = guarded(one)
                if res["status"] != "ok":
                    failed[name] = res
                    self.say(f"  TTFT {name:8s}: {res['status']} {res.get('error', '')}")
                    continue
                runs[name].append(res)
                if "start" in holder:
                    starts[name] = holder.pop("start")
                self.say(f"  TTFT {name:8s} run {rep + 1}: {res['total_s']:.3f} s (vision {res['vision_s']:.3f}, "
                         f"prefill {res['prefill_s']:.3f}, first step {res['first_step_s']:.3f})")  # fmt: skip
            if runs["teacher"] and runs["teacher"][0]["total_s"] > self.one_run_above_s:
                break  # long runs (seconds of GPU work): one is plenty
        summary = {n: failed.get(n) or (_summarize_ttft(r) if r else SKIPPED) for n, r in runs.items()}
        return summary, starts

    def decode(self, prompt: VideoPrompt, starts: dict[str, Any]) -> dict[str, dict]:
        """Batch 1 from the real prefill, then the equal batch and the largest batch on random caches.

        `teacher` is the served teacher (static KV cache + CUDA graph), `teacher_hf` transformers' generate()
        path (batch 1 and the equal batch; its largest batch is not searched), `linmu` the fixed-buffer step."""
        p_len = prompt.lm_tokens
        out: dict[str, dict] = {"teacher": {}, "teacher_hf": {}, "linmu": {}}
        runs = {"teacher": (self.teacher, self.dec.teacher), "teacher_hf": (self.teacher, self.dec.teacher_hf),
                "linmu": (self.student, self.dec.linmu)}  # fmt: skip

        def measure(name: str, key: str, fn: Callable[[], dict]) -> None:
            out[name][key] = SKIPPED if self.out_of_time() else guarded(fn)

        held = {"teacher": starts.pop("teacher", None), "linmu": starts.pop("linmu", None)}
        plan = [
            ("teacher", "batch_1", "teacher"),
            ("teacher_hf", "batch_1", "teacher"),  # served copy first:
            ("linmu", "batch_1", "linmu"),
            ("linmu", "batch_1_hf", "linmu"),
        ]  # fmt: skip  (HF grows the cache)
        for name, key, source in plan:
            m, fn = runs[name]
            if held[source] is None:
                out[name][key] = {"status": "skipped", "reason": "no prefill to decode from"}
            elif key == "batch_1_hf":
                measure(name, key, lambda source=source: self.dec.linmu_hf(self.student, held[source]))
            else:
                measure(name, key, lambda fn=fn, m=m, source=source: fn(m, 1, p_len, held[source]))
            if name == "teacher_hf" or key == "batch_1_hf":  # the last user of that prefill cache
                held[source] = None
            _free()
        held.clear()
        eq = self.equal_batch
        for name, (m, fn) in runs.items():
            measure(name, "equal_batch", lambda fn=fn, m=m: fn(m, eq, p_len))
            if name != "teacher_hf":
                out[name]["max_batch"] = SKIPPED if self.out_of_time() else self._largest(fn, m, p_len)
        for name, target in out.items():
            for key in ("batch_1", "batch_1_hf", "equal_batch", "max_batch"):
                e = target.get(key)
                if e is None:
                    continue
                if e.get("status") == "ok":
                    self.say(f"  decode {name:10s} {key:11s} batch {e['batch']:5d}: {e['tokens_per_s']:10.1f} tok/s "
                             f"({e['step_ms']:.2f} ms/step, {e['cache_fill']} cache, {e['mode']})")  # fmt: skip
                else:
                    self.say(f"  decode {name:10s} {key:11s}: {e.get('status')} {e.get('error', '')}")
        return out

    def _largest(self, fn, m: nn.Module, p_len: int) -> dict:
        if self.batch == "auto":
            search = search_batch(lambda b: fn(m, b, p_len, check_only=True), self.cap)
            best = search["largest_fit"]
        else:
            search, best = {"requested": self.batch}, self.batch
        entry = {"status": "OOM"} if best is None else guarded(lambda: fn(m, best, p_len))
        while entry.get("status") == "OOM" and self.batch == "auto" and best and best > 1:
            best //= 2  # the timed run (CUDA graph pool) can need a little more than the check
            entry = guarded(lambda best=best: fn(m, best, p_len))
        entry["search"] = search
        return entry


# ----------------------------------------------------------------------------------------------------- roofline
def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
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
    _free()
    return {"matmul_flops_per_s": matmul, "matmul": f"{n}x{n}x{n} {str(mdt).replace('torch.', '')} x{reps}",
            "copy_bytes_per_s": copy, "copy": f"{numel * 2 / 2**20:.0f} MiB bf16 copy_ x{reps}, read + write"}  # fmt: skip


def _linear_flops(module: nn.Module, tokens: int) -> int:
    return sum(
        2 * m.in_features * m.out_features * tokens for m in module.modules() if isinstance(m, nn.Linear)
    )


def vision_flops(model: nn.Module, prompt: VideoPrompt) -> dict:
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
    return {"linear": linear, "attention": attn}


def prefill_flops(model: nn.Module, prompt: VideoPrompt, kind: str) -> dict:
    """Matrix FLOPs of one TTFT run (analytic from shapes; `kind` teacher | linmu | floor): every nn.Linear of
    the decoder layers on every LM token, the LM head on one, the vision tower, and softmax attention (the
    teacher's causal attention; LinMU's 3D windows and text window; none in the floor). LinMU's scans are
    not matrix work and are not counted (docs/design.md §3)."""
    vis = vision_flops(model, prompt)
    text = model.family.text_model(model) if hasattr(model, "family") else model.model.language_model
    tc = model.config.get_text_config(decoder=True)
    n = prompt.lm_tokens
    linear = vis["linear"] + _linear_flops(text.layers, n) + 2 * model.lm_head.weight.numel()
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
    return {"linear": linear, "attention": vis["attention"] + lm_attn}


def _add_roofline(entry: dict | None, flops: dict | None, ceilings: dict) -> None:
    """Achieved TFLOP/s (TTFT entries) or bytes/s (decode entries) against the measured ceilings, in place."""
    if not entry or entry.get("status") != "ok":
        return
    if flops is not None:
        total = flops["linear"] + flops["attention"]
        entry["flops"] = flops
        entry["achieved_tflops"] = total / entry["total_s"] / 1e12
        entry["of_matmul_peak"] = total / entry["total_s"] / ceilings["matmul_flops_per_s"]
    elif "achieved_bytes_per_s" in entry:
        entry["of_copy_bandwidth"] = entry["achieved_bytes_per_s"] / ceilings["copy_bytes_per_s"]


# ----------------------------------------------------------------------------------------------------- preflight
def _check_writable(path: Path | None, option: str) -> None:
    """Fail before the bench, not after it (issue 14): the output's folder, or the nearest folder above it that
    exists, must take a new file. Nothing is left behind (the probe file is removed, no folder is created)."""
    if path is None:
        return
    if path.is_dir():
        raise LinmuError(f"{option} {path}: is a directory; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, f"{folder} is not a directory")
        probe = folder / f".linmu-bench-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LinmuError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


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


def estimate_bytes(config, frames: int, resolution: int, dtype: torch.dtype, weights: int) -> dict:
    """Peak memory of one bench run at `frames` (the prefill dominates): weights + the random pixels + the
    larger of the vision phase and the LM phase (hidden states, MLP intermediates, the teacher's KV cache).
    At 512 frames, 7B shape, it gives 17.2 GiB against the measured 12.7 GiB prefill peak + 1.7 GiB of pixels
    (docs/benchmarks.md): on the safe side, not by much (tests/test_bench.py)."""
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
    return {"total": total, "weights": weights, "pixels": pixels, "vision": vision, "lm": lm, "kv_cache": kv}


def _preflight_memory(config, frame_list: list[int], resolution: int, dtype: torch.dtype, weights: int,
                      dev: torch.device, have: int | None = None) -> dict:  # fmt: skip
    """Refuse a run that cannot fit before allocating anything big (issue 14: 8,000 frames on a CPU)."""
    have = available_bytes(dev) if have is None else have
    top = max(frame_list)
    est = estimate_bytes(config, top, resolution, dtype, weights)
    if est["total"] > have:
        per_frame = max(1, (est["total"] - 1.1 * weights) / top)
        fit = int((0.95 * have - 1.1 * weights) / per_frame) // 2 * 2
        gib = lambda v: f"{v / 2**30:.1f} GiB"  # noqa: E731
        hint = f"up to ~{fit} frames fit" if fit >= 2 else "not even 2 frames fit"
        raise LinmuError(f"--frames {top} at {resolution}px needs about {gib(est['total'])} on {dev.type} (weights "
                         f"{gib(weights)}, pixels {gib(est['pixels'])}, prefill {gib(max(est['vision'], est['lm']))}); "
                         f"{gib(have)} available: {hint}, or lower --resolution")  # fmt: skip
    return {"estimate_bytes": est["total"], "available_bytes": have, "frames": top}


def _config_and_weights(model: str | None, arch: str | None, dtype: torch.dtype) -> tuple[Any, int]:
    """The model config and its weight bytes in `dtype`, without building it (meta device)."""
    from linmu_cli.archs import build_random_model

    if arch is not None:
        meta = (
            build_random_model(arch, dtype, "meta")
            if arch not in ("tiny-qwen2-vl", "tiny-qwen2.5-vl")
            else None
        )
        if meta is None:
            tiny = build_random_model(arch, dtype, "cpu")
            return tiny.config, _bytes(tiny)
        size = torch.tensor([], dtype=dtype).element_size()
        return meta.config, sum(p.numel() for p in meta.parameters()) * size
    from transformers import AutoConfig

    import linmu_cli.models  # noqa: F401  (registers the LinMU config classes)

    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise LinmuError(f"--model {model}: no config.json there; pass a checkpoint directory or use --arch")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise LinmuError(
            f"--model {model}: cannot read its config.json ({type(exc).__name__}: {exc})"
        ) from None
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return config, weights


def run_bench(
    *,
    model: str | None = None,
    arch: str | None = None,
    frames: list[int] | list[str] | str = (64,),
    resolution: int = 448,
    batch: str | int = "auto",
    new_tokens: int = 128,
    dtype: str = "bf16",
    device: str = "cuda",
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    repeats: int = 2,
    equal_batch: int = 16,
    max_batch: int | None = None,
    mate: dict[str, Any] | None = None,
    graphs: bool = True,
    time_budget: float | None = None,
    decode_seconds: float | None = None,
    fast_vision: bool = True,
    vision_compile: bool | str = "auto",
    teacher_kernel: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """Run the benchmark and return its result dict (the JSON written to `json_path`, schema `linmu-bench/2`).

    `frames` are frame counts (ints or "64,128" strings); `batch` "auto" searches the largest decode batch by
    doubling until out of memory (up to `max_batch`: 4096 on CUDA, max(16, equal batch) on CPU); `mate`
    overrides M-MATE fields of the conversion; `time_budget` (s) turns measurements past it into "skipped";
    `decode_seconds` is the timing budget of one decode measurement (1.0 on CUDA); `fast_vision` runs both
    models' vision towers through `linmu_cli.vision` (`vision_compile` as in `use_fast_vision`);
    `teacher_kernel` is the served teacher's decode attention (auto: the fastest measured). Output files are
    checked for writability and the run's memory is estimated before anything big is built; the JSON is
    rewritten after every frame count.
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    frame_list = parse_frames(frames if isinstance(frames, str) else [str(f) for f in frames])
    batch = parse_batch(batch)
    _check_args(model, arch, resolution, batch, new_tokens, repeats, device, plot_path, equal_batch)
    torch_dtype = _dtype(dtype)
    json_path = Path(json_path) if json_path else None
    plot_path = Path(plot_path) if plot_path else None
    _check_writable(json_path, "--json")
    _check_writable(plot_path, "--plot")
    if vision_compile not in ("auto", True, False):
        raise LinmuError(f"--vision-compile {vision_compile!r}: choose auto, on or off")
    if teacher_kernel != "auto":
        from linmu_cli.teacher_decode import KERNELS

        if teacher_kernel not in KERNELS:
            raise LinmuError(f"--teacher-kernel {teacher_kernel!r}: choose auto or {', '.join(KERNELS)}")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cap = max_batch or (4096 if dev.type == "cuda" else max(16, equal_batch))
    decode_seconds = decode_seconds if decode_seconds is not None else (1.0 if dev.type == "cuda" else 0.05)
    config, weights = _config_and_weights(model, arch, torch_dtype)
    memory_check = _preflight_memory(config, frame_list, resolution, torch_dtype, weights, dev)

    say(f"building models ({arch or model}, {str(torch_dtype).replace('torch.', '')}, {dev}) ...")
    torch.manual_seed(0)
    try:
        teacher, student, source = build_models(model, arch, torch_dtype, dev, dict(mate or {}))
    except Exception as exc:
        if _is_oom(exc):
            raise LinmuError(
                f"out of memory building the models on {dev} ({_gb(weights)} of weights)"
            ) from None
        raise
    vision = "transformers (SDPA, one call per frame / window)"
    if fast_vision:
        from linmu_cli.vision import use_fast_vision

        infos = [use_fast_vision(m, compile=vision_compile) for m in (teacher, student)]
        vision = infos[0].describe() + " (both models)"
    say("ceilings: measuring this device's matmul rate and copy bandwidth ...")
    ceilings = measure_ceilings(dev, torch_dtype)
    use_graph = graphs and dev.type == "cuda"
    decoding = Decoding(dev, new_tokens, decode_seconds, use_graph, teacher_kernel)
    runner = _Runner(teacher, student, dev, decoding, repeats, equal_batch, batch, cap,
                     started + time_budget if time_budget else None, say)  # fmt: skip
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "environment": environment(dev, torch_dtype),
        "config": {
            "source": source,
            "model": model,
            "arch": arch,
            "frames": frame_list,
            "resolution": resolution,
            "batch": batch,
            "equal_batch": equal_batch,
            "max_batch_cap": cap,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "decode_seconds": decode_seconds,
            "time_budget_s": time_budget,
            "fast_vision": fast_vision,
            "teacher_kernel": teacher_kernel,
            "mate": student.mate_config.to_dict(),
            "text_tokens": PREFIX_TOKENS + SUFFIX_TOKENS + 2,
            "memory_check": memory_check,
        },  # fmt: skip
        "weights_bytes": {
            "teacher": _bytes(teacher),
            "linmu_own": _bytes(student, {t.data_ptr() for t in [*teacher.parameters(), *teacher.buffers()]}),
        },  # fmt: skip
        "results": [],
        "notes": NOTES,
    }
    result["environment"]["ceilings"] = ceilings
    say(f"ceilings: matmul {ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s, copy "
        f"{ceilings['copy_bytes_per_s'] / 1e12:.3g} TB/s (read + write)")  # fmt: skip

    warm = synthetic_video(teacher.config, frame_list[0], resolution, dev, torch_dtype)
    say(f"warm-up at {frame_list[0]} frames ({warm.lm_tokens} LM tokens) ...")
    runner.warm_up(warm)
    del warm
    from linmu_cli.ops import last_ssd_backend
    from linmu_cli.ops.ssd_step import last_ssd_step_backend

    loop = "cuda_graph" if use_graph else "eager"
    kernels = {"flex_ma_prefill": last_ssd_backend(), "flex_ma_decode": last_ssd_step_backend(),
               "local_swin": "torch SDPA: batched 3D windows + text-query blocks of the sliding window",
               "linmu_decode_loop": loop, "vision": vision,
               "teacher_attention": getattr(teacher.config, "_attn_implementation", None),
               "teacher_decode_loop": f"{loop}, static KV cache (linmu_cli.teacher_decode)",
               "teacher_decode_attention": f"{teacher_kernel} (per entry: decode.*.attention_kernel)",
               "teacher_hf_decode_loop": "transformers eager, DynamicCache"}  # fmt: skip
    result["environment"]["kernels"] = kernels
    say(f"kernels: {kernels['flex_ma_prefill']} scans, {kernels['flex_ma_decode']} decode step, {loop} decode "
        f"loops; vision: {vision}; warm-up done at {time.perf_counter() - started:.0f} s")  # fmt: skip

    for n_frames in frame_list:
        try:
            prompt = synthetic_video(teacher.config, n_frames, resolution, dev, torch_dtype)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            say(f"{n_frames} frames: OOM building the synthetic video")
            result["results"].append({"frames": n_frames, "status": "OOM", "ratios": {}})
            _free()
            continue
        say(
            f"{n_frames} frames: {prompt.lm_tokens} LM tokens ({time.perf_counter() - started:.0f} s elapsed)"
        )
        ttft, starts = runner.ttft(prompt)
        for name, kind in (("teacher", "teacher"), ("linmu", "linmu"), ("floor", "floor")):
            _add_roofline(ttft[name], prefill_flops(student if kind != "teacher" else teacher, prompt, kind),
                          ceilings)  # fmt: skip
        decode = runner.decode(prompt, starts)
        for entries in decode.values():
            for entry in entries.values():
                _add_roofline(entry, None, ceilings)
        td, hd, ld = decode["teacher"], decode["teacher_hf"], decode["linmu"]
        result["results"].append({
            "frames": n_frames, "resolution": resolution, "video_tokens": prompt.video_tokens,
            "lm_tokens": prompt.lm_tokens,
            "teacher": {"ttft": ttft["teacher"], "decode": td},
            "teacher_hf": {"decode": hd},
            "linmu": {"ttft": ttft["linmu"], "floor": ttft["floor"],
                      "ttft_over_floor": _ratio(ttft["linmu"], ttft["floor"], "total_s"), "decode": ld},
            "ratios": {
                "ttft": _ratio(ttft["teacher"], ttft["linmu"], "total_s"),
                "decode_batch_1": _ratio(ld.get("batch_1"), td.get("batch_1"), "tokens_per_s"),
                "decode_equal_batch": _ratio(ld.get("equal_batch"), td.get("equal_batch"), "tokens_per_s"),
                "decode_max_batch": _ratio(ld.get("max_batch"), td.get("max_batch"), "tokens_per_s"),
                "decode_batch_1_vs_teacher_hf": _ratio(ld.get("batch_1"), hd.get("batch_1"), "tokens_per_s"),
                "decode_equal_batch_vs_teacher_hf": _ratio(ld.get("equal_batch"), hd.get("equal_batch"),
                                                           "tokens_per_s"),
                "decode_batch_1_same_harness": _ratio(ld.get("batch_1_hf"), hd.get("batch_1"), "tokens_per_s"),
                "teacher_served_over_hf_batch_1": _ratio(td.get("batch_1"), hd.get("batch_1"), "tokens_per_s"),
            },
        })  # fmt: skip
        result["crossover"] = crossover(result["results"])
        result["elapsed_s"] = time.perf_counter() - started
        if json_path:
            _write_json(json_path, result)
        del prompt, starts
        _free()

    result["crossover"] = crossover(result["results"])
    result["elapsed_s"] = time.perf_counter() - started
    if json_path:
        _write_json(json_path, result)
    if plot_path:
        save_plot(result, plot_path)
        result["plot"] = str(plot_path)
    return result


NOTES = [
    "TTFT = vision tower + LM prefill (to the first token's logits) + the first decode step; median of the "
    "repeats. The floor is LinMU with its scans and window attention skipped (projections, gates, norms, MLPs "
    "and the vision tower still run).",
    "Decode: teacher = the served teacher (static KV cache pre-allocated to prompt + new tokens, q_len=1 decode "
    "attention chosen by timing, one CUDA graph on CUDA: linmu_cli.teacher_decode); teacher_hf = transformers "
    "forward + DynamicCache (what generate() runs); LinMU = fixed-buffer step (one CUDA graph on CUDA); "
    "'batch_1_hf' = LinMU through transformers' harness. cache_fill 'random' = caches of the real shapes filled "
    "with random values instead of prefilling every sequence (decode cost does not depend on the values).",
    "Roofline: TTFT achieved_tflops = analytic matrix FLOPs (linears, patch embedding, softmax attention; not "
    "LinMU's scans) / TTFT, of_matmul_peak against the measured matmul rate; decode achieved_bytes_per_s = "
    "bytes a step must move (decoder weights + LM head + KV cache read, or LinMU's state read and written) / "
    "step time, of_copy_bandwidth against the measured copy bandwidth (environment.ceilings).",
    "Vision: both models run the same vision tower code (environment.kernels.vision).",
    "Memory figures are bytes above what was allocated before the measurement (weights excluded).",
]


# ----------------------------------------------------------------------------------------------------- output
def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


PLOT_CURVES = {
    "ttft": [("teacher (served)", ("teacher", "ttft", "total_s"), "o", "-", "tab:blue"),
             ("LinMU", ("linmu", "ttft", "total_s"), "s", "-", "tab:orange"),
             ("LinMU floor (no scans / window attention)", ("linmu", "floor", "total_s"), "^", "--", "tab:gray")],
    "decode": [("teacher (served), largest batch", ("teacher", "decode", "max_batch", "tokens_per_s"), "o", "-",
                "tab:blue"),
               ("teacher (served), batch {eq}", ("teacher", "decode", "equal_batch", "tokens_per_s"), "o", "--",
                "tab:blue"),
               ("teacher (served), batch 1", ("teacher", "decode", "batch_1", "tokens_per_s"), "o", ":", "tab:blue"),
               ("LinMU, largest batch", ("linmu", "decode", "max_batch", "tokens_per_s"), "s", "-", "tab:orange"),
               ("LinMU, batch {eq}", ("linmu", "decode", "equal_batch", "tokens_per_s"), "s", "--", "tab:orange"),
               ("LinMU, batch 1", ("linmu", "decode", "batch_1", "tokens_per_s"), "s", ":", "tab:orange"),
               ("teacher (transformers generate), batch {eq}",
                ("teacher_hf", "decode", "equal_batch", "tokens_per_s"), "x", ":", "tab:gray")],
}  # fmt: skip


def make_figure(result: dict):
    """The bench figure: TTFT (teacher, LinMU, floor; crossover marked) and decode tokens/s at batch 1, the
    equal batch and the largest batch for both, against frames. Every curve has its own marker / line style,
    every y axis readable tick labels; a single frame count gets labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatterSciNotation, NullLocator

    rows = [r for r in result["results"] if r.get("status") != "OOM"]
    eq = result["config"]["equal_batch"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.4))
    frames = sorted({r["frames"] for r in rows})
    single = len(frames) == 1
    for ax, key in ((ax1, "ttft"), (ax2, "decode")):
        for label, keys, marker, style, color in PLOT_CURVES[key]:
            pts = [(r["frames"], _get(r, *keys)) for r in rows]
            pts = [(f, v) for f, v in pts if isinstance(v, int | float)]
            if not pts:
                continue
            x, y = zip(*pts, strict=True)
            if result.get("schema") == "linmu-bench/1":  # measured against transformers' eager decode
                label = label.replace("(served)", "(eager)")
            ax.plot(
                x, y, marker=marker, linestyle=style, color=color, label=label.format(eq=eq), markersize=6
            )
            if single:
                text = f"{y[0]:,.0f}" if y[0] >= 100 else f"{y[0]:.3g}"
                ax.annotate(text, (x[0], y[0]), textcoords="offset points", xytext=(8, 0), fontsize=7, va="center",
                            color=color)  # fmt: skip
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        if single:
            ax.set_xticks(frames, [str(f) for f in frames])
            ax.set_xlim(frames[0] * 0.8, frames[0] * 1.3)
        else:
            ax.set_xscale("log", base=2)
            ax.set_xticks(frames, [str(f) for f in frames])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="both", alpha=0.25)
    cross = result.get("crossover", {})
    if cross.get("frames"):
        ax1.axvline(cross["frames"], color="tab:green", linestyle="-.", linewidth=1)
        ax1.text(cross["frames"], ax1.get_ylim()[1], f" TTFT crossover ~{cross['frames']} frames", fontsize=7,
                 color="tab:green", va="top")  # fmt: skip
    ax1.set(xlabel="frames", ylabel="TTFT (s)", title="Time to first token (lower is better)")
    ax2.set(xlabel="frames", ylabel="tokens / s", title="Decode throughput (higher is better)")
    for ax in (ax1, ax2):
        if ax.get_lines():
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        else:
            ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center", color="tab:gray")
    env = result["environment"]
    fig.suptitle(f"{result['config']['source']} - {env.get('gpu', env['device'])}, {env['dtype']}, "
                 f"{result['config']['resolution']}px frames; vision: "
                 f"{'linmu fast tower' if result['config'].get('fast_vision') else 'transformers'} (both)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    return fig


def save_plot(result: dict, path: Path) -> None:
    """Write `make_figure(result)` as a PNG."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise LinmuError("--plot needs matplotlib: pip install 'linmu[bench]'") from None
    fig = make_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v, spec=".3f", unit="") -> str:
    return f"{v:{spec}}{unit}" if isinstance(v, int | float) else "-"


def _cell(entry: dict | None, key: str, spec: str) -> str:
    if not entry:
        return "-"
    if entry.get("status") != "ok":
        return str(entry.get("status"))
    return _fmt(entry.get(key), spec)


def _gb(v) -> str:
    if not isinstance(v, int | float):
        return "-"
    return f"{v / 2**30:.1f} GiB" if v >= 2**30 else f"{v / 2**20:.1f} MiB"


def _per_seq(decode: dict):
    return _get(decode, "equal_batch", "cache_bytes_per_seq") or _get(
        decode, "batch_1", "cache_bytes_per_seq"
    )


def tables(result: dict) -> list:
    """rich Tables for the terminal, each narrow enough for 80 columns: TTFT, its split and roofline, decode
    against the served teacher, largest batches, the transformers teacher, memory (all numbers are in the JSON)."""
    from rich.table import Table

    def table(title: str, cols: list[str]) -> Table:
        t = Table(title=title, title_justify="left")
        for col in cols:
            t.add_column(col, justify="right", no_wrap=True)
        return t

    def mx(e):
        return (
            f"{_cell(e, 'tokens_per_s', '.0f')} ({e['batch']})"
            if e and e.get("status") == "ok"
            else _cell(e, "", "")
        )

    def pct(e, key):
        return _fmt(100 * e[key], ".0f", "%") if e and e.get("status") == "ok" and key in e else "-"

    eq = result["config"]["equal_batch"]
    t1 = table("TTFT in s (vision + prefill + first step)", ["frames", "tokens", "teacher", "LinMU", "floor", "T/L",
                                                              "L/floor"])  # fmt: skip
    t2 = table("TTFT split (s)", ["frames", "T vision", "L vision", "T prefill", "L prefill"])
    t2b = table("TTFT matrix rate: TFLOP/s (of the measured peak)", ["frames", "teacher", "LinMU", "floor"])
    who = (
        "the eager teacher (linmu-bench/1)"
        if result.get("schema") == "linmu-bench/1"
        else "the served teacher"
    )
    t3 = table(f"Decode tok/s: LinMU vs {who}", ["frames", "T b=1", "L b=1", "x", f"T b={eq}", f"L b={eq}",
                                                              "x"])  # fmt: skip
    t4 = table(
        "Decode at the largest batch (b) and of copy bandwidth",
        ["frames", "T (b)", "L (b)", "x", "T BW", "L BW"],
    )
    t5 = table("transformers teacher (generate() path) tok/s", ["frames", "HF b=1", f"HF b={eq}", "L/HF b=1",
                                                                  f"L/HF b={eq}", "served/HF"])  # fmt: skip
    t6 = table("Memory (above weights)", ["frames", "T prefill", "L prefill", "T dec b=1", "L dec b=1", "T /seq",
                                          "L /seq"])  # fmt: skip
    for r in result["results"]:
        f = str(r["frames"])
        if r.get("status") == "OOM":
            for t in (t1, t2, t2b, t3, t4, t5, t6):
                t.add_row(f, *["OOM"] * (len(t.columns) - 1))
            continue
        t, lm, fl, ra = r["teacher"]["ttft"], r["linmu"]["ttft"], r["linmu"]["floor"], r["ratios"]
        td, ld, hd = r["teacher"]["decode"], r["linmu"]["decode"], _get(r, "teacher_hf", "decode", default={})
        t1.add_row(f, f"{r['lm_tokens']:,}", _cell(t, "total_s", ".3f"), _cell(lm, "total_s", ".3f"),
                   _cell(fl, "total_s", ".3f"), _fmt(ra.get("ttft"), ".2f", "x"),
                   _fmt(r["linmu"]["ttft_over_floor"], ".2f", "x"))  # fmt: skip
        rate = lambda e: f"{_cell(e, 'achieved_tflops', '.3g')} ({pct(e, 'of_matmul_peak')})"  # noqa: E731
        t2.add_row(f, _cell(t, "vision_s", ".3f"), _cell(lm, "vision_s", ".3f"), _cell(t, "prefill_s", ".3f"),
                   _cell(lm, "prefill_s", ".3f"))  # fmt: skip
        t2b.add_row(f, rate(t), rate(lm), rate(fl))
        t3.add_row(f, _cell(td.get("batch_1"), "tokens_per_s", ".1f"), _cell(ld.get("batch_1"), "tokens_per_s", ".1f"),
                   _fmt(ra.get("decode_batch_1"), ".1f", "x"), _cell(td.get("equal_batch"), "tokens_per_s", ".0f"),
                   _cell(ld.get("equal_batch"), "tokens_per_s", ".0f"), _fmt(ra.get("decode_equal_batch"), ".1f", "x"))  # fmt: skip
        t4.add_row(f, mx(td.get("max_batch")), mx(ld.get("max_batch")), _fmt(ra.get("decode_max_batch"), ".1f", "x"),
                   pct(td.get("max_batch"), "of_copy_bandwidth"), pct(ld.get("max_batch"), "of_copy_bandwidth"))  # fmt: skip
        t5.add_row(f, _cell(hd.get("batch_1"), "tokens_per_s", ".1f"), _cell(hd.get("equal_batch"), "tokens_per_s", ".0f"),
                   _fmt(ra.get("decode_batch_1_vs_teacher_hf"), ".1f", "x"),
                   _fmt(ra.get("decode_equal_batch_vs_teacher_hf"), ".1f", "x"),
                   _fmt(ra.get("teacher_served_over_hf_batch_1"), ".1f", "x"))  # fmt: skip
        t6.add_row(f, _gb(_get(t, "prefill_peak_bytes")), _gb(_get(lm, "prefill_peak_bytes")),
                   _gb(_get(td, "batch_1", "peak_bytes")), _gb(_get(ld, "batch_1", "peak_bytes")),
                   _gb(_per_seq(td)), _gb(_per_seq(ld)))  # fmt: skip
    return [t1, t2, t2b, t3, t4, t5, t6]


__all__ = ["SCHEMA", "VideoPrompt", "crossover", "estimate_bytes", "make_figure", "measure_ceilings", "parse_frames",
           "run_bench", "save_plot", "synthetic_video",
           "tables", "teacher_from_student"]  # fmt: skip
