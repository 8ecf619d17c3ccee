"""Profile the vision tower alone: transformers' SDPA tower vs `linmu_cli.vision.use_fast_vision` (eager and
compiled elementwise parts), both real tower shapes (Qwen2-VL-7B, Qwen2.5-VL-7B), random weights, bf16.

    python benchmarks/vision_profile.py --frames 512 --json vision.json

Per family: seconds per tower call (CUDA events, median of --repeats after a warm-up at --warm-frames), the
speed-up, the relative error of the merged output against transformers', the analytic matrix FLOPs and the
achieved rate against a measured matmul rate, and the top CUDA kernels of one call of each variant
(torch.profiler, at --profile-frames) so the next fusion target is visible.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from linmu_cli.archs import arch_config  # noqa: E402
from linmu_cli.vision import use_fast_vision  # noqa: E402


def tower_class(alias: str):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return (
        Qwen2_5_VisionTransformerPretrainedModel if "2.5" in alias else Qwen2VisionTransformerPretrainedModel
    )


def inputs(frames: int, res: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.tensor([[frames // 2, res // 14, res // 14]], device=dev)
    n = int(grid.prod())
    return torch.randn(n, 1176, device=dev).bfloat16(), grid


def timed(tower, x, grid, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        tower(x, grid_thw=grid)
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1000)
    return out


def top_kernels(tower, x, grid, n: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tower(x, grid_thw=grid)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0), reverse=True)[:n]
    return [
        {"kernel": e.key[:90], "ms": getattr(e, "device_time_total", 0) / 1000, "calls": e.count}
        for e in rows
    ]


def matmul_rate(dev) -> float:
    a = torch.randn(8192, 8192, device=dev).bfloat16()
    torch.matmul(a, a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        torch.matmul(a, a)
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t)


def tower_flops(tower, frames: int, res: int) -> float:
    from linmu_cli.bench import VideoPrompt, vision_flops

    grid = torch.tensor([[frames // 2, res // 14, res // 14]])

    class _M:  # vision_flops reads model.model.visual
        pass

    m = _M()
    m.model = _M()
    m.model.visual = tower
    return vision_flops(m, VideoPrompt(frames, res, 0, {"video_grid_thw": grid})).total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=448)
    ap.add_argument("--warm-frames", type=int, default=32)
    ap.add_argument("--profile-frames", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--families", default="qwen2-vl-7b,qwen2.5-vl-7b")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    peak = matmul_rate(dev)
    report = {"frames": args.frames, "resolution": args.resolution, "matmul_flops_per_s": peak,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(dev), "families": {}}  # fmt: skip
    for alias in args.families.split(","):
        torch.manual_seed(0)
        with torch.device(dev), torch.no_grad():
            base = tower_class(alias)._from_config(arch_config(alias).vision_config, attn_implementation="sdpa",
                                                   dtype=torch.bfloat16).eval()  # fmt: skip
        flops = tower_flops(base, args.frames, args.resolution)
        fam: dict = {"flops": flops, "variants": {}}
        x, grid = inputs(args.frames, args.resolution, dev)
        xw, gw = inputs(args.warm_frames, args.resolution, dev)
        xp, gp = inputs(args.profile_frames, args.resolution, dev)
        ref = None
        for variant in ("transformers", "fast", "fast+compile"):
            tower = base if variant == "transformers" else copy.deepcopy(base)
            info = None
            if variant != "transformers":
                info = use_fast_vision(tower, compile=variant == "fast+compile")
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    tower(xw, grid_thw=gw)  # warm-up (and compile)
                    torch.cuda.synchronize()
                    warm_s = time.perf_counter() - t0
                    runs = timed(tower, x, grid, args.repeats)
                    out = tower(x, grid_thw=grid).pooler_output.float()
                    kernels = top_kernels(tower, xp, gp)
            except torch.OutOfMemoryError:
                fam["variants"][variant] = {"status": "OOM"}
                continue
            if ref is None:
                ref = out
            err = ((out - ref).norm() / ref.norm()).item()
            sec = statistics.median(runs)
            fam["variants"][variant] = {"status": "ok", "seconds": sec, "runs_s": runs, "warm_s": warm_s,
                                        "rel_error_vs_transformers": err, "tflops": flops / sec / 1e12,
                                        "of_matmul_peak": flops / sec / peak, "top_kernels": kernels,
                                        "describe": info.describe() if info else "transformers SDPA tower",
                                        "paths": dict(info.paths) if info else None}  # fmt: skip
            print(f"{alias:14s} {variant:13s} {sec:7.3f} s  rel.err {err:.1e}  {flops / sec / 1e12:6.0f} TFLOP/s "
                  f"({100 * flops / sec / peak:.0f}% of {peak / 1e12:.0f})  warm-up {warm_s:.1f} s", flush=True)  # fmt: skip
            for k in kernels[:5]:
                print(f"      {k['ms']:8.2f} ms  x{k['calls']:<5d} {k['kernel']}")
            if tower is not base:
                del tower
            torch.cuda.empty_cache()
        base_s = fam["variants"].get("transformers", {}).get("seconds")
        for v in fam["variants"].values():
            if base_s and v.get("status") == "ok":
                v["speedup"] = base_s / v["seconds"]
        report["families"][alias] = fam
        del base, x, ref
        torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    for alias, fam in report["families"].items():
        print(alias, {k: round(v.get("speedup", 0), 2) for k, v in fam["variants"].items()})


if __name__ == "__main__":
    main()
