"""What one decode step of LinMU and of the served teacher launches, how long it takes, and how far from the
bandwidth floor it is (GPU; `--device cpu` is a smoke run with CPU numbers that mean nothing).

Why: both decode runners are launch-bound at batch 1 (LinMU's CUDA-graph step took 10.7 ms at Qwen2-VL-7B shape
against ~4 ms for reading its bf16 weights once, the served teacher's 10.1 ms); this counts the kernels a step
is made of and where the time goes, the numbers a fusion has to move.

At `--arch` (random weights, `linmu_cli.archs`; the student converted in memory sharing the teacher's weights,
as `linmu bench` builds it), for each batch of `--batch` and each runner (`linmu`: `StaticDecoder.random` over a
LinMUCache at position --prompt + 1; `teacher`: `ServedTeacherDecoder.random` with --prompt cached tokens and
its decode attention from `choose_kernel`):

- `kernels_per_step`: the CUDA kernels (and, apart, memcpy / memset) torch.profiler records in one eager step,
  after a first step compiled everything; `aten_ops_per_step` / `_per_layer`: the top-level aten ops of that
  step (what Python dispatches; the only count on CPU);
- `top_kernels`: the CUDA kernels of that step by total time (name, calls, us, share); `kernel_calls`: every
  kernel name with its launches;
- `step_ms`: one step replayed from the runner's own CUDA graph (`capture()`), mean over --steps replays (an
  eager step on CPU);
- `bytes_per_step` (decode weights + LinMU's state moved / the teacher's valid keys and values, as
  `linmu bench` counts them), `achieved_bytes_per_s` and `of_copy_bandwidth` against the copy bandwidth measured
  here (`linmu_cli.bench.timing.measure_ceilings`);
- `norm_mlp_kernels` (`linmu_cli.decode_layer`'s path), `attention_kernel` (the teacher's choice and trials).

Each entry is measured once per `--norm-mlp` variant (`res[runner]["batch_B"][variant]`): `auto` (the fused
Triton kernels on CUDA) and `torch` (the references: the kernels the HF modules launch), the A/B of the fusion.

    python benchmarks/decode_step_profile.py --arch qwen2-vl-7b --batch 1,16 --json decode_step.json  # < 2 min
    python benchmarks/decode_step_profile.py --arch tiny-qwen2-vl --device cpu                          # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from linmu_cli.archs import TINY_ARCHS  # noqa: E402
from linmu_cli.bench.decode import decode_weight_bytes, linmu_state_step_bytes  # noqa: E402
from linmu_cli.bench.inputs import DTYPES  # noqa: E402
from linmu_cli.bench.models import build_models  # noqa: E402
from linmu_cli.bench.timing import Ceilings, Clock, add_roofline, free, measure_ceilings  # noqa: E402
from linmu_cli.decode_layer import norm_mlp_paths  # noqa: E402
from linmu_cli.fast_decode import StaticDecoder  # noqa: E402
from linmu_cli.ops.rms_norm import use_backend  # noqa: E402
from linmu_cli.teacher_decode import ServedTeacherDecoder  # noqa: E402

REAL_PROMPT = 65_573  # a 512-frame 448x448 video's LM tokens at 7B (docs/benchmarks.md's 512-frame row)
TINY_PROMPT = 256
TOP = 15


def profile_step(step: Callable[[], object], device: torch.device, layers: int, top: int = TOP) -> dict:
    """torch.profiler over one `step()`: CUDA kernels / memcpy+memset / top-level aten ops, top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    aten = sum(1 for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None
               and e.name.startswith("aten::"))  # fmt: skip
    res: dict[str, Any] = {"aten_ops_per_step": aten, "aten_ops_per_layer": aten / layers}
    if device.type != "cuda":
        return res
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    copies = [e for e in gpu if e.name.startswith(("Memcpy", "Memset"))]
    kernels = [e for e in gpu if not e.name.startswith(("Memcpy", "Memset"))]
    calls, us = Counter(), Counter()
    for e in kernels:
        calls[e.name] += 1
        us[e.name] += e.time_range.elapsed_us()
    total = sum(us.values()) or 1.0
    res |= {"kernels_per_step": len(kernels), "kernels_per_layer": len(kernels) / layers,
            "memcpy_memset_per_step": len(copies), "kernel_us_per_step": total,
            "top_kernels": [{"name": n[:120], "calls": calls[n], "us": t, "share": t / total}
                            for n, t in us.most_common(top)],
            "kernel_calls": {n[:120]: c for n, c in calls.most_common()}}  # fmt: skip
    return res


def step_ms(dec: StaticDecoder | ServedTeacherDecoder, device: torch.device, steps: int) -> tuple[float, str]:
    """ms per step from the runner's own CUDA graph (`capture()`, then `steps` replays) on CUDA; eager elsewhere."""
    clock = Clock(device)
    timing = "eager steps"
    if device.type == "cuda":
        dec.capture()
        timing = "CUDA-graph replays (the runner's own capture)"
    dec.step()
    clock.sync()
    a = clock.mark()
    for _ in range(steps):
        dec.step()
    b = clock.mark()
    clock.sync()
    return 1e3 * clock.seconds(a, b) / steps, f"{timing}, mean of {steps}"


def measure(dec: StaticDecoder | ServedTeacherDecoder, model: nn.Module, device: torch.device, layers: int,
            ceilings: Ceilings, steps: int) -> dict:  # fmt: skip
    """One runner at one batch: profile an eager step (after one that compiles), then time graph replays."""
    with torch.no_grad():
        dec.step()  # Triton compiles, cuBLAS picks its kernels: not profiled
        entry: dict[str, Any] = {"status": "ok", "batch": dec.tokens.shape[0]}
        entry |= profile_step(dec.step, device, layers)
        entry["norm_mlp_kernels"] = norm_mlp_paths()  # what this runner's step just ran
        state = dec.read_bytes() if isinstance(dec, ServedTeacherDecoder) else linmu_state_step_bytes(dec)
        entry["step_ms"], entry["timing"] = step_ms(dec, device, steps)
    weights = decode_weight_bytes(model)
    entry |= {"weight_bytes": weights, "state_bytes": state, "bytes_per_step": weights + state,
              "achieved_bytes_per_s": (weights + state) / (entry["step_ms"] / 1e3)}  # fmt: skip
    add_roofline(entry, None, ceilings)  # of_copy_bandwidth
    entry["floor_ms"] = 1e3 * (weights + state) / ceilings.copy_bytes_per_s
    return entry


def write_json(path: Path | None, res: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2, default=str) + "\n")


def say(line: str) -> None:
    print(line, flush=True)


def run(arch: str, device: torch.device, batches: list[int], prompt: int, steps: int, teacher_kernel: str,
        variants: list[str], json_path: Path | None = None,
        runners: tuple[str, ...] = ("linmu", "teacher"), ssm_dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """Every (runner, batch, norm / MLP variant) entry, one runner at a time (one cache or state in memory);
    the JSON is rewritten after each, so a run cut short keeps what it measured."""
    started = time.perf_counter()
    dtype = DTYPES["bf16" if device.type == "cuda" else "fp32"]
    teacher, student, source = build_models(None, arch, dtype, device, {})
    layers = teacher.config.get_text_config(decoder=True).num_hidden_layers
    ceilings = measure_ceilings(device, dtype)
    say(f"{source}, {str(dtype).replace('torch.', '')} on {device}: copy ceiling "
        f"{ceilings.copy_bytes_per_s / 1e12:.3g} TB/s (read + write); {time.perf_counter() - started:.0f} s")  # fmt: skip
    res: dict[str, Any] = {"arch": arch, "source": source, "device": str(device), "dtype": str(dtype), "prompt": prompt,
                           "layers": layers, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                           "torch": torch.__version__, "ceilings": ceilings.to_json(), "norm_mlp_variants": variants,
                           "linmu_ssm_dtype": str(ssm_dtype).replace("torch.", ""),
                           "linmu": {}, "teacher": {}}  # fmt: skip
    for batch in batches:
        for name in runners:
            kernel = teacher_kernel
            per_batch = res[name][f"batch_{batch}"] = {}
            for variant in variants:
                with torch.no_grad(), use_backend(variant):
                    if name == "linmu":
                        dec = StaticDecoder.random(student, batch, position=prompt + 1, ssm_dtype=ssm_dtype)
                    else:  # the second variant reuses the first one's attention kernel: no second trial
                        dec = ServedTeacherDecoder.random(teacher, batch, prompt=prompt, new_tokens=steps + 16,
                                                          kernel=kernel)  # fmt: skip
                        choice, kernel = dec.choice, dec.choice.name
                    entry = measure(
                        dec, student if name == "linmu" else teacher, device, layers, ceilings, steps
                    )
                if name == "teacher":
                    entry["attention_kernel"] = {"name": choice.name, "trials_ms": choice.trials}
                dec.release()
                del dec
                free()
                per_batch[variant] = entry
                res["elapsed_s"] = time.perf_counter() - started
                write_json(json_path, res)
                say(f"{name:7s} batch {batch:3d} norm/MLP {variant:5s}: {entry['step_ms']:7.3f} ms/step "
                    f"({entry['timing']}), {entry.get('kernels_per_step', '-')} kernels, "
                    f"{entry['aten_ops_per_layer']:.0f} aten ops/layer, {entry['of_copy_bandwidth']:.0%} of copy "
                    f"bandwidth (floor {entry['floor_ms']:.2f} ms); {time.perf_counter() - started:.0f} s")  # fmt: skip
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--arch", default="qwen2-vl-7b", help="an --arch of `linmu bench` (tiny-qwen2-vl for CPU)"
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt", type=int, default=None,
                    help=f"cached tokens [default: {REAL_PROMPT}, {TINY_PROMPT} for a tiny arch]")  # fmt: skip
    ap.add_argument("--steps", type=int, default=20, help="timed steps (graph replays on CUDA)")
    ap.add_argument("--teacher-kernel", default="auto", help="the served teacher's decode attention [auto]")
    ap.add_argument("--norm-mlp", default="auto,torch",
                    help="decode_layer's norm / MLP paths to measure, each in turn: auto (Triton on CUDA) and / or "
                         "torch (the references, what the HF modules compute) [auto,torch]")  # fmt: skip
    ap.add_argument("--runners", default="linmu,teacher",
                    help="which runners, comma-separated: linmu and / or teacher (a large --batch fits only "
                         "LinMU's constant state: --runners linmu --batch 1024) [linmu,teacher]")  # fmt: skip
    ap.add_argument("--ssm-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="LinMU's SSM state dtype (LinMUCache ssm_dtype: bfloat16 halves the state a step moves; "
                         "updated in float32, stored rounded) [float32]")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    runners = tuple(args.runners.split(","))
    if not runners or any(r not in ("linmu", "teacher") for r in runners):
        sys.exit(f"--runners {args.runners!r}: name linmu and / or teacher, comma-separated")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: pass --device cpu (a smoke run)")
    prompt = args.prompt or (TINY_PROMPT if args.arch in TINY_ARCHS else REAL_PROMPT)
    batches = [int(b) for b in args.batch.split(",")]
    variants = args.norm_mlp.split(",")
    ssm_dtype = getattr(torch, args.ssm_dtype)
    res = run(args.arch, device, batches, prompt, args.steps, args.teacher_kernel, variants, args.json,
              runners=runners, ssm_dtype=ssm_dtype)  # fmt: skip
    for name in runners:
        for key, per_batch in res[name].items():
            for variant, entry in per_batch.items():
                for k in entry.get("top_kernels", [])[:8]:
                    say(f"{name:7s} {key:9s} {variant:5s} {k['share']:6.1%} {k['calls']:5d}x {k['us']:9.1f} us  "
                        f"{k['name'][:70]}")  # fmt: skip
    return res


if __name__ == "__main__":
    main()
