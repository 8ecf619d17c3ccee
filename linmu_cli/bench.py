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
  the largest batch that fits (doubling search until out of memory), the larger batches on caches filled with
  random values of the right shapes (decode cost does not depend on them; the output says so per entry);
- peak memory of prefill and of decoding, cache bytes per sequence; "OOM" where something does not fit.

Decoding: the teacher runs transformers' forward with its DynamicCache (what `generate()` does); LinMU runs its
fixed-buffer step (`linmu_cli.fast_decode`), captured in a CUDA graph on CUDA, and also, at batch 1, through
the same transformers forward as the teacher (`batch_1_hf`) for a same-harness comparison.
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

SCHEMA = "linmu-bench/1"
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


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


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
    best = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]  # the median run, split kept consistent
    return {"status": "ok", **{k: best[k] for k in ("total_s", "vision_s", "prefill_s", "first_step_s")},
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

    def __init__(self, device: torch.device, new_tokens: int, seconds: float, use_graph: bool):
        self.device, self.new_tokens, self.seconds, self.use_graph = device, new_tokens, seconds, use_graph
        self.clock = Clock(device)

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
        """transformers forward with a DynamicCache: the real prefill cache (`start`) or a random one."""
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
                            prefill_held=cache_bytes if start is not None else 0)  # fmt: skip
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
            dec.release()
        entry = self._entry(batch, steps, seconds, fill, mode, state_bytes, mem)
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
    def _entry(batch, steps, seconds, fill, mode, cache_bytes, mem: Memory, prefill_held: int = 0) -> dict:
        peak = None if mem.peak is None else mem.peak + prefill_held
        return {"status": "ok", "batch": batch, "tokens_per_s": batch * steps / seconds,
                "step_ms": 1000 * seconds / steps, "steps": steps, "cache_fill": fill, "mode": mode,
                "cache_bytes": cache_bytes, "cache_bytes_per_seq": cache_bytes / batch, "peak_bytes": peak}  # fmt: skip


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
                fn = self.dec.linmu if name == "linmu" else self.dec.teacher
                res = guarded(lambda fn=fn, m=m, start=held.pop("start"): fn(m, 1, prompt.lm_tokens, start))
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
            if runs["teacher"] and runs["teacher"][0]["total_s"] > 8:
                break  # long runs (seconds of GPU work): one is plenty
        summary = {n: failed.get(n) or (_summarize_ttft(r) if r else SKIPPED) for n, r in runs.items()}
        return summary, starts

    def decode(self, prompt: VideoPrompt, starts: dict[str, Any]) -> dict[str, dict]:
        """Batch 1 from the real prefill, then the equal batch and the largest batch on random caches."""
        p_len = prompt.lm_tokens
        out: dict[str, dict] = {"teacher": {}, "linmu": {}}
        for name, m in self.models().items():
            fn = self.dec.linmu if name == "linmu" else self.dec.teacher
            start = starts.pop(name, None)
            if self.out_of_time():
                out[name]["batch_1"] = SKIPPED
            elif start is None:
                out[name]["batch_1"] = {"status": "skipped", "reason": "no prefill to decode from"}
            else:
                out[name]["batch_1"] = guarded(lambda fn=fn, m=m, start=start: fn(m, 1, p_len, start))
                if name == "linmu" and not self.out_of_time():
                    out[name]["batch_1_hf"] = guarded(
                        lambda start=start: self.dec.linmu_hf(self.student, start)
                    )
            del start
            _free()
        for name, m in self.models().items():
            fn = self.dec.linmu if name == "linmu" else self.dec.teacher
            target = out[name]
            eq = self.equal_batch
            target["equal_batch"] = (
                SKIPPED if self.out_of_time() else guarded(lambda fn=fn, m=m, eq=eq: fn(m, eq, p_len))
            )
            target["max_batch"] = SKIPPED if self.out_of_time() else self._largest(fn, m, p_len)
            for key in ("batch_1", "batch_1_hf", "equal_batch", "max_batch"):
                e = target.get(key)
                if e is None:
                    continue
                if e.get("status") == "ok":
                    self.say(f"  decode {name:8s} {key:11s} batch {e['batch']:5d}: {e['tokens_per_s']:10.1f} tok/s "
                             f"({e['step_ms']:.2f} ms/step, {e['cache_fill']} cache, {e['mode']})")  # fmt: skip
                else:
                    self.say(f"  decode {name:8s} {key:11s}: {e.get('status')} {e.get('error', '')}")
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
    progress: Progress | None = None,
) -> dict:
    """Run the benchmark and return its result dict (the JSON written to `json_path`, schema `linmu-bench/1`).

    `frames` are frame counts (ints or "64,128" strings); `batch` "auto" searches the largest decode batch by
    doubling until out of memory (up to `max_batch`: 4096 on CUDA, 4 on CPU); `mate` overrides M-MATE fields
    of the conversion; `time_budget` (s) turns measurements past it into "skipped"; `decode_seconds` is the
    timing budget of one decode measurement (1.0 on CUDA). The JSON is rewritten after every frame count.
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    frame_list = parse_frames(frames if isinstance(frames, str) else [str(f) for f in frames])
    batch = parse_batch(batch)
    _check_args(model, arch, resolution, batch, new_tokens, repeats, device, plot_path, equal_batch)
    torch_dtype = _dtype(dtype)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cap = max_batch or (4096 if dev.type == "cuda" else 4)
    decode_seconds = decode_seconds if decode_seconds is not None else (1.0 if dev.type == "cuda" else 0.05)
    json_path = Path(json_path) if json_path else None

    say(f"building models ({arch or model}, {str(torch_dtype).replace('torch.', '')}, {dev}) ...")
    torch.manual_seed(0)
    teacher, student, source = build_models(model, arch, torch_dtype, dev, dict(mate or {}))
    use_graph = graphs and dev.type == "cuda"
    runner = _Runner(teacher, student, dev, Decoding(dev, new_tokens, decode_seconds, use_graph), repeats,
                     equal_batch, batch, cap, started + time_budget if time_budget else None, say)  # fmt: skip
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
            "mate": student.mate_config.to_dict(),
            "text_tokens": PREFIX_TOKENS + SUFFIX_TOKENS + 2,
        },  # fmt: skip
        "weights_bytes": {
            "teacher": _bytes(teacher),
            "linmu_own": _bytes(student, {t.data_ptr() for t in [*teacher.parameters(), *teacher.buffers()]}),
        },  # fmt: skip
        "results": [],
        "notes": NOTES,
    }

    warm = synthetic_video(teacher.config, frame_list[0], resolution, dev, torch_dtype)
    say(f"warm-up at {frame_list[0]} frames ({warm.lm_tokens} LM tokens) ...")
    runner.warm_up(warm)
    del warm
    from linmu_cli.ops import last_ssd_backend
    from linmu_cli.ops.ssd_step import last_ssd_step_backend

    kernels = {"flex_ma_prefill": last_ssd_backend(), "flex_ma_decode": last_ssd_step_backend(),
               "local_swin": "torch SDPA: batched 3D windows + text-query blocks of the sliding window",
               "linmu_decode_loop": "cuda_graph" if use_graph else "eager",
               "teacher_attention": getattr(teacher.config, "_attn_implementation", None),
               "teacher_decode_loop": "transformers eager, DynamicCache"}  # fmt: skip
    result["environment"]["kernels"] = kernels
    say(
        f"kernels: {kernels['flex_ma_prefill']} scans, {kernels['flex_ma_decode']} decode step, "
        f"{kernels['linmu_decode_loop']} decode loop; warm-up done at {time.perf_counter() - started:.0f} s"
    )

    for n_frames in frame_list:
        prompt = synthetic_video(teacher.config, n_frames, resolution, dev, torch_dtype)
        say(
            f"{n_frames} frames: {prompt.lm_tokens} LM tokens ({time.perf_counter() - started:.0f} s elapsed)"
        )
        ttft, starts = runner.ttft(prompt)
        decode = runner.decode(prompt, starts)
        td, ld = decode["teacher"], decode["linmu"]
        result["results"].append({
            "frames": n_frames, "resolution": resolution, "video_tokens": prompt.video_tokens,
            "lm_tokens": prompt.lm_tokens,
            "teacher": {"ttft": ttft["teacher"], "decode": td},
            "linmu": {"ttft": ttft["linmu"], "floor": ttft["floor"],
                      "ttft_over_floor": _ratio(ttft["linmu"], ttft["floor"], "total_s"), "decode": ld},
            "ratios": {
                "ttft": _ratio(ttft["teacher"], ttft["linmu"], "total_s"),
                "decode_batch_1": _ratio(ld.get("batch_1"), td.get("batch_1"), "tokens_per_s"),
                "decode_batch_1_same_harness": _ratio(ld.get("batch_1_hf"), td.get("batch_1"), "tokens_per_s"),
                "decode_equal_batch": _ratio(ld.get("equal_batch"), td.get("equal_batch"), "tokens_per_s"),
                "decode_max_batch": _ratio(ld.get("max_batch"), td.get("max_batch"), "tokens_per_s"),
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
        save_plot(result, Path(plot_path))
        result["plot"] = str(plot_path)
    return result


NOTES = [
    "TTFT = vision tower + LM prefill (to the first token's logits) + the first decode step; median of the "
    "repeats. The floor is LinMU with its scans and window attention skipped (projections, gates, norms, MLPs "
    "and the vision tower still run).",
    "Decode: teacher = transformers forward + DynamicCache; LinMU = fixed-buffer step (one CUDA graph on CUDA); "
    "'batch_1_hf' = LinMU through the teacher's harness. cache_fill 'random' = caches of the real shapes filled "
    "with random values instead of prefilling every sequence (decode cost does not depend on the values).",
    "Memory figures are bytes above what was allocated before the measurement (weights excluded).",
]


# ----------------------------------------------------------------------------------------------------- output
def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def save_plot(result: dict, path: Path) -> None:
    """TTFT and decode throughput against frames, teacher and LinMU (plus the floor and batch-1 curves)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LinmuError("--plot needs matplotlib: pip install 'linmu[bench]'") from None
    rows = result["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))

    def series(*keys):
        pts = [(r["frames"], _get(r, *keys)) for r in rows]
        return [f for f, v in pts if isinstance(v, int | float)], [
            v for _, v in pts if isinstance(v, int | float)
        ]

    teacher_c, linmu_c = "tab:blue", "tab:orange"
    curves = {
        ax1: [("teacher", ("teacher", "ttft", "total_s"), "o-", teacher_c),
              ("LinMU", ("linmu", "ttft", "total_s"), "s-", linmu_c),
              ("LinMU floor (no scans / window attention)", ("linmu", "floor", "total_s"), "s:", linmu_c)],
        ax2: [("teacher, largest batch", ("teacher", "decode", "max_batch", "tokens_per_s"), "o-", teacher_c),
              ("LinMU, largest batch", ("linmu", "decode", "max_batch", "tokens_per_s"), "s-", linmu_c),
              ("teacher, batch 1", ("teacher", "decode", "batch_1", "tokens_per_s"), "o:", teacher_c),
              ("LinMU, batch 1", ("linmu", "decode", "batch_1", "tokens_per_s"), "s:", linmu_c)],
    }  # fmt: skip
    for ax, lines in curves.items():
        for label, keys, style, color in lines:
            x, y = series(*keys)
            if x:
                ax.plot(x, y, style, label=label, color=color)
    ax1.set(yscale="log", xlabel="frames", ylabel="TTFT (s)", title="Time to first token")
    ax2.set(yscale="log", xlabel="frames", ylabel="tokens / s", title="Decode throughput")
    env = result["environment"]
    fig.suptitle(f"{result['config']['source']} - {env.get('gpu', env['device'])}, {env['dtype']}, "
                 f"{result['config']['resolution']}px frames", fontsize=9)  # fmt: skip
    frames = [r["frames"] for r in rows]
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(frames, [str(f) for f in frames])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
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
    """rich Tables for the terminal: TTFT, decode throughput, memory (every number is also in the JSON)."""
    from rich.table import Table

    def table(title: str, cols: list[str]) -> Table:
        t = Table(title=title, title_justify="left")
        for col in cols:
            t.add_column(col, justify="right")
        return t

    def mx(e):
        return (
            f"{_cell(e, 'tokens_per_s', '.0f')} (b={e['batch']})"
            if e and e.get("status") == "ok"
            else _cell(e, "", "")
        )

    eq = result["config"]["equal_batch"]
    t1 = table(
        "TTFT in s (vision + prefill + first step)",
        ["frames", "tokens", "teacher", "LinMU", "floor", "T/L", "L/floor", "T vision", "L prefill"],
    )
    t2 = table(
        "Decode tokens/s (ratio = LinMU / teacher)",
        ["frames", "T b=1", "L b=1", "x", f"T b={eq}", f"L b={eq}", "x", "T largest", "L largest", "x"],
    )
    t3 = table(
        "Memory (above weights)",
        ["frames", "T prefill", "L prefill", "T decode b=1", "L decode b=1", "T cache/seq", "L state/seq"],
    )
    for r in result["results"]:
        t, lm, ra = r["teacher"]["ttft"], r["linmu"]["ttft"], r["ratios"]
        td, ld = r["teacher"]["decode"], r["linmu"]["decode"]
        t1.add_row(str(r["frames"]), f"{r['lm_tokens']:,}", _cell(t, "total_s", ".3f"), _cell(lm, "total_s", ".3f"),
                   _cell(r["linmu"]["floor"], "total_s", ".3f"), _fmt(ra["ttft"], ".2f", "x"),
                   _fmt(r["linmu"]["ttft_over_floor"], ".2f", "x"), _cell(t, "vision_s", ".3f"),
                   _cell(lm, "prefill_s", ".3f"))  # fmt: skip
        t2.add_row(str(r["frames"]), _cell(td.get("batch_1"), "tokens_per_s", ".1f"),
                   _cell(ld.get("batch_1"), "tokens_per_s", ".1f"), _fmt(ra["decode_batch_1"], ".1f", "x"),
                   _cell(td.get("equal_batch"), "tokens_per_s", ".0f"), _cell(ld.get("equal_batch"), "tokens_per_s", ".0f"),
                   _fmt(ra["decode_equal_batch"], ".1f", "x"), mx(td.get("max_batch")), mx(ld.get("max_batch")),
                   _fmt(ra["decode_max_batch"], ".1f", "x"))  # fmt: skip
        t3.add_row(str(r["frames"]), _gb(_get(t, "prefill_peak_bytes")), _gb(_get(lm, "prefill_peak_bytes")),
                   _gb(_get(td, "batch_1", "peak_bytes")), _gb(_get(ld, "batch_1", "peak_bytes")),
                   _gb(_per_seq(td)), _gb(_per_seq(ld)))  # fmt: skip
    return [t1, t2, t3]


__all__ = ["SCHEMA", "VideoPrompt", "crossover", "parse_frames", "run_bench", "save_plot", "synthetic_video",
           "tables", "teacher_from_student"]  # fmt: skip
