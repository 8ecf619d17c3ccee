"""The bench's run loop: check the arguments, build both models, warm up, then per frame count the TTFT of
teacher, LinMU and the LinMU floor (alternating, median of the repeats) and the decode measurements, assembled
into the result dict (schema `linmu-bench/2`) and rewritten to the JSON after every frame count.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linmu_cli.bench.decode import DecodeStart, Decoding, search_batch
from linmu_cli.bench.inputs import PREFIX_TOKENS, SUFFIX_TOKENS, VideoPrompt, parse_dtype, synthetic_video
from linmu_cli.bench.models import (
    build_models,
    cache_kw,
    cache_of,
    config_and_weights,
    model_bytes,
    next_positions,
)
from linmu_cli.bench.report import NOTES, SCHEMA, crossover, human_bytes, save_plot, write_json
from linmu_cli.bench.timing import (
    Ceilings,
    Clock,
    Memory,
    add_roofline,
    free,
    guarded,
    is_oom,
    measure_ceilings,
    prefill_flops,
    preflight_memory,
)
from linmu_cli.errors import LinmuError
from linmu_cli.layers.floor import skip_mixers  # the floor: LinMU with its scans and attention skipped
from linmu_cli.versions import package_version

Progress = Callable[[str], None]


@dataclass
class TTFTRun:
    """One timed TTFT run (seconds; peak bytes None on CPU) and the state to decode on from."""

    total_s: float
    vision_s: float
    prefill_s: float
    first_step_s: float
    peak_bytes: int | None
    start: DecodeStart

    def timings(self) -> dict:
        """The run's JSON fields, in the order the summaries read them."""
        return {"total_s": self.total_s, "vision_s": self.vision_s, "prefill_s": self.prefill_s,
                "first_step_s": self.first_step_s, "peak_bytes": self.peak_bytes}  # fmt: skip


@dataclass
class TTFTResults:
    """TTFT summaries per model (JSON entries) and, per model, the state after its last run."""

    summary: dict[str, dict]
    starts: dict[str, DecodeStart] = field(default_factory=dict)
    vision_warmup_s: float | None = None  # the untimed tower pass before the runs (`warm_vision`)


def measure_ttft(model: nn.Module, prompt: VideoPrompt, device: torch.device) -> TTFTRun:
    """One TTFT run: its timings and the (cache, next token, next positions) to decode on from."""
    clock, marks = Clock(device), {}

    def marker(key: str) -> Callable[..., None]:
        def hook(
            *_args: Any,
        ) -> None:  # returns None: a hook's return value would replace the inputs / outputs
            marks.setdefault(key, clock.mark())

        return hook

    visual = model.model.visual
    hooks = [visual.register_forward_pre_hook(marker("v0")), visual.register_forward_hook(marker("v1"))]
    kw = cache_kw(model)
    try:
        with Memory(device) as mem, torch.no_grad():
            clock.sync()
            m0 = clock.mark()
            out = model(**prompt.inputs, use_cache=True, logits_to_keep=1)
            m1 = clock.mark()
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = cache_of(out)
            pos = next_positions(model, prompt.lm_tokens, 1, device)
            out = model(input_ids=token, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            m2 = clock.mark()
            clock.sync()
    finally:
        for h in hooks:
            h.remove()
    vision = clock.seconds(marks["v0"], marks["v1"]) if "v1" in marks else 0.0
    total = clock.seconds(m0, m2)
    return TTFTRun(total, vision, clock.seconds(m0, m1) - vision, clock.seconds(m1, m2), mem.peak,
                   DecodeStart(cache, token, pos + 1))  # fmt: skip


def warm_vision(model: nn.Module, prompt: VideoPrompt, device: torch.device) -> float:
    """One untimed pass of `model`'s vision tower over `prompt`'s video; returns its seconds.

    Why: from 512 frames on each model's TTFT is one run, teacher first, and both models run the same tower code, so
    a new frame count's one-time costs (cuDNN plans and compiled kernels for the new shape, the allocator's first
    blocks of that size) landed in the teacher's timed run only: at 2048 frames its tower took 5.98 s against
    LinMU's 3.77 s (2026-12-02). Paid here, they are in neither."""
    if "pixel_values_videos" not in prompt.inputs:
        return 0.0
    clock = Clock(device)
    with torch.no_grad():
        clock.sync()
        start = clock.mark()
        model.model.get_video_features(prompt.inputs["pixel_values_videos"], prompt.inputs["video_grid_thw"])
        end = clock.mark()
        clock.sync()
    return clock.seconds(start, end)


def summarize_ttft(runs: list[dict]) -> dict:
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


def _ratio(num: dict | None, den: dict | None, key: str) -> float | None:
    """num[key] / den[key] of two ok entries, else None (a failed or skipped side has no ratio)."""
    if not num or not den or num.get("status") != "ok" or den.get("status") != "ok":
        return None
    a, b = num.get(key), den.get(key)
    return a / b if a and b else None


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Versions, host and device of this run (the JSON's `environment`, before ceilings and kernels)."""
    env = {"device": device.type, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": package_version("transformers"), "triton": package_version("triton"), "fla-core": package_version("fla-core"),
           "mamba-ssm": package_version("mamba-ssm"), "linmu": package_version("linmu"), "dtype": str(dtype).replace("torch.", ""),
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


def parse_frames(values: list[str] | str) -> list[int]:
    """Sorted distinct even frame counts from "64,128" strings (or a list of them)."""
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


def _check_args(model: str | None, arch: str | None, resolution: int, batch: str | int, new_tokens: int,
                repeats: int, device_name: str, plot_path: Path | None, equal_batch: int) -> None:  # fmt: skip
    """Every argument error as one clear line, before anything is built."""
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
    """`--batch`: "auto" (search the largest batch) or a batch size."""
    if isinstance(value, int):
        return value
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise LinmuError(f"--batch {value!r}: give 'auto' or a positive integer") from None


SKIPPED = {"status": "skipped", "reason": "time budget"}


@dataclass
class Session:
    """One benchmark session: the two models, the decode settings and the time budget."""

    teacher: nn.Module
    student: nn.Module
    dev: torch.device
    dec: Decoding
    repeats: int
    equal_batch: int
    batch: str | int  # "auto" or the largest batch to time
    cap: int  # of the batch search
    deadline: float | None  # perf_counter() after which measurements are skipped
    say: Progress
    one_run_above_s: float = 3.0  # a teacher TTFT above this: one repeat (512+ frames at 7B shape on an H200)

    def out_of_time(self) -> bool:
        """Past the time budget: later measurements are recorded as skipped."""
        return self.deadline is not None and time.perf_counter() > self.deadline

    def models(self) -> dict[str, nn.Module]:
        """The two models by their JSON names."""
        return {"teacher": self.teacher, "linmu": self.student}

    def warm_up(self, prompt: VideoPrompt) -> None:
        """Every kernel path once (Triton compiles, cuBLAS heuristics, allocator growth); not recorded.

        Failures are reported and left to the measurements, which record them per entry."""
        for name, m in self.models().items():
            held: dict[str, Any] = {}

            def prefill(m: nn.Module = m, held: dict[str, Any] = held) -> dict:
                held["start"] = measure_ttft(m, prompt, self.dev).start
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
            res = guarded(lambda: {"status": "ok", **measure_ttft(self.student, prompt, self.dev).timings()})
        if res["status"] != "ok":
            self.say(f"warning: warm-up of the LinMU floor: {res}")
        free()

    def ttft(self, prompt: VideoPrompt) -> TTFTResults:
        """TTFT of teacher, LinMU and the LinMU floor, alternating, `repeats` times (once for long runs).

        Returns the summaries and, per model, the state after its last run (to decode on from at batch 1)."""
        runs: dict[str, list] = {"teacher": [], "linmu": [], "floor": []}
        failed: dict[str, dict] = {}
        starts: dict[str, DecodeStart] = {}
        warm = None
        if not self.out_of_time():
            res = guarded(lambda: {"status": "ok", "s": warm_vision(self.teacher, prompt, self.dev)})
            warm = res.get("s")
            if res["status"] != "ok":
                self.say(f"  vision warm-up: {res['status']} {res.get('error', '')}")
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

                def one(name: str = name, m: nn.Module = m, holder: dict[str, Any] = holder) -> dict:
                    with skip_mixers(name == "floor"):
                        run = measure_ttft(m, prompt, self.dev)
                    if name != "floor":
                        holder["start"] = run.start
                    return {"status": "ok", **run.timings()}

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
        summary = {n: failed.get(n) or (summarize_ttft(r) if r else SKIPPED) for n, r in runs.items()}
        return TTFTResults(summary, starts, warm)

    def decode(self, prompt: VideoPrompt, starts: dict[str, DecodeStart]) -> dict[str, dict]:
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
            free()
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

    def _largest(self, fn: Callable[..., dict], m: nn.Module, p_len: int) -> dict:
        """The largest batch that fits (searched, or the requested one), timed; halved while the timed run
        runs out of memory."""
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


def _check_writable(path: Path | None, option: str) -> None:
    """Fail before the bench, not after it (an hour of measurements lost to a typo): the output's folder, or the nearest folder above it that
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


def _row(prompt: VideoPrompt, ttft: dict[str, dict], decode: dict[str, dict], teacher: nn.Module,
         student: nn.Module, ceilings: Ceilings) -> dict:  # fmt: skip
    """One frame count's JSON row: TTFT and decode entries with their roofline fields, and the ratios."""
    for kind in ("teacher", "linmu", "floor"):
        add_roofline(
            ttft[kind], prefill_flops(teacher if kind == "teacher" else student, prompt, kind), ceilings
        )
    for entries in decode.values():
        for entry in entries.values():
            add_roofline(entry, None, ceilings)
    td, hd, ld = decode["teacher"], decode["teacher_hf"], decode["linmu"]
    return {
        "frames": prompt.frames, "resolution": prompt.resolution, "video_tokens": prompt.video_tokens,
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
    }  # fmt: skip


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
    torch_dtype = parse_dtype(dtype)
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
    config, weights = config_and_weights(model, arch, torch_dtype)
    memory_check = preflight_memory(config, frame_list, resolution, torch_dtype, weights, dev)

    say(f"building models ({arch or model}, {str(torch_dtype).replace('torch.', '')}, {dev}) ...")
    torch.manual_seed(0)
    try:
        teacher, student, source = build_models(model, arch, torch_dtype, dev, dict(mate or {}))
    except Exception as exc:
        if is_oom(exc):
            raise LinmuError(
                f"out of memory building the models on {dev} ({human_bytes(weights)} of weights)"
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
    session = Session(teacher, student, dev, decoding, repeats, equal_batch, batch, cap,
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
            "teacher": model_bytes(teacher),
            "linmu_own": model_bytes(
                student, {t.data_ptr() for t in [*teacher.parameters(), *teacher.buffers()]}
            ),
        },  # fmt: skip
        "results": [],
        "notes": NOTES,
    }
    result["environment"]["ceilings"] = ceilings.to_json()
    say(f"ceilings: matmul {ceilings.matmul_flops_per_s / 1e12:.3g} TFLOP/s, copy "
        f"{ceilings.copy_bytes_per_s / 1e12:.3g} TB/s (read + write)")  # fmt: skip

    warm = synthetic_video(teacher.config, frame_list[0], resolution, dev, torch_dtype)
    say(f"warm-up at {frame_list[0]} frames ({warm.lm_tokens} LM tokens) ...")
    session.warm_up(warm)
    del warm
    from linmu_cli.decode_layer import norm_mlp_paths
    from linmu_cli.ops import last_ssd_backend
    from linmu_cli.ops.ssd import last_ssd_step_backend

    loop = "cuda_graph" if use_graph else "eager"
    ran = ", ".join(f"{op} {path}" for op, path in norm_mlp_paths().items())
    kernels = {"flex_ma_prefill": last_ssd_backend(), "flex_ma_decode": last_ssd_step_backend(),
               "local_swin": "torch SDPA: batched 3D windows + text-query blocks of the sliding window",
               "linmu_decode_loop": loop, "vision": vision,
               "teacher_attention": getattr(teacher.config, "_attn_implementation", None),
               "teacher_decode_loop": f"{loop}, static KV cache (linmu_cli.teacher_decode)",
               "teacher_decode_attention": f"{teacher_kernel} (per entry: decode.*.attention_kernel)",
               "decode_norm_mlp": f"{ran} (linmu_cli.decode_layer, served teacher and LinMU alike, as the "
                                  "warm-up ran them; per entry: decode.*.norm_mlp_kernels)",
               "teacher_hf_decode_loop": "transformers eager, DynamicCache"}  # fmt: skip
    result["environment"]["kernels"] = kernels
    say(f"kernels: {kernels['flex_ma_prefill']} scans, {kernels['flex_ma_decode']} decode step, {loop} decode "
        f"loops; vision: {vision}; warm-up done at {time.perf_counter() - started:.0f} s")  # fmt: skip

    for n_frames in frame_list:
        try:
            prompt = synthetic_video(teacher.config, n_frames, resolution, dev, torch_dtype)
        except Exception as exc:
            if not is_oom(exc):
                raise
            say(f"{n_frames} frames: OOM building the synthetic video")
            result["results"].append({"frames": n_frames, "status": "OOM", "ratios": {}})
            free()
            continue
        say(
            f"{n_frames} frames: {prompt.lm_tokens} LM tokens ({time.perf_counter() - started:.0f} s elapsed)"
        )
        measured = session.ttft(prompt)
        decode = session.decode(prompt, measured.starts)
        row = _row(prompt, measured.summary, decode, teacher, student, ceilings)
        row["vision_warmup_s"] = measured.vision_warmup_s  # the untimed tower pass at this frame count
        result["results"].append(row)
        result["crossover"] = crossover(result["results"])
        result["elapsed_s"] = time.perf_counter() - started
        if json_path:
            write_json(json_path, result)
        del prompt, measured
        free()

    result["crossover"] = crossover(result["results"])
    result["elapsed_s"] = time.perf_counter() - started
    if json_path:
        write_json(json_path, result)
    if plot_path:
        save_plot(result, plot_path)
        result["plot"] = str(plot_path)
    return result


__all__ = ["Session", "TTFTResults", "TTFTRun", "environment", "measure_ttft", "parse_batch", "parse_frames",
           "run_bench", "summarize_ttft", "warm_vision"]  # fmt: skip
