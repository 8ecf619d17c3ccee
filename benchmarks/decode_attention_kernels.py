"""The served teacher's decode attention kernels alone, against the bandwidth floor (issue #12).

    python benchmarks/decode_attention_kernels.py --json decode_attention.json

At Qwen2-VL-7B's decode shape (4 kv heads x 7 query heads, head_dim 128, bf16) with a static cache of
--context + --new-tokens slots of which --context + 1 are valid (teacher_decode's layout), for each batch: every
kernel of `linmu_cli.teacher_decode.KERNELS` (what `choose_kernel` picks among), then a sweep of the Triton
split-KV kernel's compile-time blocks, warps, pipeline stages and split counts. Each is timed as the served step
runs it (`teacher_decode.graph_ms`: a CUDA graph of 10 calls replayed, each call on another of --buffers
layer-sized caches so nothing is timed from L2) and reported as ms per layer call, bytes/s (the valid keys +
values it must read / time) and the fraction of the copy bandwidth measured in the same process (the bench's
ceiling); its output is checked against the float32 reference (`decode_attention_naive`). The
`floor_ms` of an entry is its bytes / copy bandwidth. `--device cpu` is a smoke run of the script (eager timing,
no Triton unless TRITON_INTERPRET=1; CPU numbers mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from linmu_cli.bench.timing import measure_ceilings  # noqa: E402
from linmu_cli.ops.decode_attention import decode_attention_naive  # noqa: E402
from linmu_cli.teacher_decode import KERNELS, DecodeShape, graph_ms, split_chunks  # noqa: E402


def time_ms(fn: Callable[[int], object], device: torch.device) -> float:
    """ms per call: CUDA-graph replays on CUDA (as served), a plain loop elsewhere."""
    if device.type == "cuda":
        return graph_ms(fn)
    fn(0)
    t0 = time.perf_counter()
    for i in range(3):
        fn(i)
    return (time.perf_counter() - t0) / 3 * 1e3


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def measure(name: str, fn: Callable[[int], torch.Tensor], ref: torch.Tensor, nbytes: int, copy_bw: float,
            device: torch.device, **extra) -> dict:  # fmt: skip
    """One candidate: error against the reference (buffer 0), then ms / bytes/s; an error is recorded, not raised."""
    entry: dict = {"kernel": name, **extra}
    try:
        entry["rel_err"] = rel_err(fn(0), ref)
        if not entry["rel_err"] < 2e-2:
            entry["status"] = "wrong"
            return entry
        ms = time_ms(fn, device)
    except Exception as exc:  # noqa: BLE001 - a config that does not compile / fit is a result too
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        entry.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        return entry
    entry.update(
        status="ok", ms=ms, bytes_per_s=nbytes / (ms / 1e3), of_copy_bandwidth=nbytes / (ms / 1e3) / copy_bw
    )
    return entry


def sweep_configs(quick: bool) -> list[dict]:
    """Triton compile-time choices to try (the default first)."""
    from linmu_cli.ops.decode_attention import triton as tri

    default = {
        "block_n": tri.DEFAULT_BLOCK_N,
        "num_warps": tri.DEFAULT_NUM_WARPS,
        "num_stages": tri.DEFAULT_NUM_STAGES,
    }
    grid = [{"block_n": n, "num_warps": w, "num_stages": s}
            for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))]  # fmt: skip
    if quick:
        grid = [
            {"block_n": n, "num_warps": 4, "num_stages": s}
            for n, s in itertools.product((32, 64, 128), (2, 3))
        ]
    return [default] + [c for c in grid if c != default]


def run_batch(batch: int, args: argparse.Namespace, copy_bw: float, device: torch.device) -> dict:
    hkv, g, d, dtype = args.kv_heads, args.group, args.head_dim, torch.bfloat16
    cap, length = args.context + args.new_tokens, args.context  # teacher_decode: valid slots <= length
    gen = torch.Generator(device=device).manual_seed(0)
    ks = [
        torch.randn(batch, hkv, cap, d, device=device, generator=gen).to(dtype) for _ in range(args.buffers)
    ]
    vs = [
        torch.randn(batch, hkv, cap, d, device=device, generator=gen).to(dtype) for _ in range(args.buffers)
    ]
    q = torch.randn(batch, hkv, g, d, device=device, generator=gen).to(dtype)
    shape = DecodeShape(torch.tensor([length], device=device), args.context, split_chunks(batch, hkv, args.context, device),
                        d**-0.5)  # fmt: skip
    valid = length + 1
    ref = decode_attention_naive(q.reshape(batch, hkv * g, 1, d).float(), ks[0].float(), vs[0].float(), valid)
    ref = ref.reshape(batch, hkv, g, d)
    nbytes = 2 * batch * hkv * valid * d * 2
    out: dict = {"batch": batch, "capacity": cap, "valid_slots": valid, "bytes_per_call": nbytes,
                 "floor_ms": nbytes / copy_bw * 1e3, "split_kv_chunks": shape.chunks, "kernels": [], "triton_sweep": []}  # fmt: skip
    triton_ok = device.type == "cuda"
    if not triton_ok:
        from linmu_cli.ops.decode_attention import triton as tri

        triton_ok = tri.INTERPRET
    for name, fn in KERNELS.items():
        if name == "triton_split_kv" and not triton_ok:
            out["kernels"].append(
                {"kernel": name, "status": "skipped", "error": "no CUDA (set TRITON_INTERPRET=1)"}
            )
            print(f"b={batch:3d} {name:16s} skipped: no CUDA", flush=True)
            continue
        call = lambda i, fn=fn: fn(q, ks[i % args.buffers], vs[i % args.buffers], shape)  # noqa: E731
        out["kernels"].append(measure(name, call, ref, nbytes, copy_bw, device))
        print(f"b={batch:3d} {name:16s} {fmt(out['kernels'][-1])}", flush=True)
    if not triton_ok or args.no_sweep:
        return out
    from linmu_cli.ops.decode_attention import triton as tri

    rows = batch * hkv
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    configs = sweep_configs(args.quick)
    for cfg in configs:
        base = tri.choose_num_splits(rows, cap, sms, cfg["block_n"])
        # the default config also at half and twice the heuristic's splits: is the split count right?
        for splits in sorted({base, max(1, base // 2), base * 2} if cfg is configs[0] else {base}):
            call = lambda i, cfg=cfg, splits=splits: tri.split_kv_decode(  # noqa: E731
                q, ks[i % args.buffers], vs[i % args.buffers], shape.length, len_offset=1, scale=d**-0.5,
                num_splits=splits, **cfg)  # fmt: skip
            chunk = math.ceil(math.ceil(cap / splits) / cfg["block_n"]) * cfg["block_n"]
            entry = measure("triton_split_kv", call, ref, nbytes, copy_bw, device, **cfg, num_splits=math.ceil(cap / chunk),
                            heuristic_splits=splits == base)  # fmt: skip
            out["triton_sweep"].append(entry)
            print(f"b={batch:3d} triton {cfg} splits={entry['num_splits']:4d} {fmt(entry)}", flush=True)
    return out


def fmt(entry: dict) -> str:
    if entry.get("status") != "ok":
        return f"{entry.get('status')}: {entry.get('error', entry.get('rel_err'))}"
    return (f"{entry['ms']:.4f} ms  {entry['bytes_per_s'] / 1e12:.2f} TB/s  {100 * entry['of_copy_bandwidth']:.0f}% "
            f"of copy  rel.err {entry['rel_err']:.1e}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--context", type=int, default=65_573, help="prompt tokens (65,573: 512 frames at 448x448)"
    )
    ap.add_argument(
        "--new-tokens", type=int, default=144, help="extra cache slots (the bench allocates new + 16)"
    )
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--group", type=int, default=7, help="query heads per kv head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--buffers", type=int, default=4, help="layer-sized caches cycled through (defeats L2)")
    ap.add_argument("--quick", action="store_true", help="6 Triton configs instead of 18")
    ap.add_argument("--no-sweep", action="store_true", help="only the registered kernels")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    ceilings = measure_ceilings(device, torch.bfloat16)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "copy_bytes_per_s": ceilings.copy_bytes_per_s, "copy": ceilings.copy,
           "config": vars(args) | {"json": str(args.json)}, "results": []}  # fmt: skip
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    print(f"copy bandwidth {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (read + write)", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        res["results"].append(run_batch(batch, args, ceilings.copy_bytes_per_s, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # this batch's caches
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
    for row in res["results"]:
        best = min((e for e in row["kernels"] + row["triton_sweep"] if e.get("status") == "ok"),
                   key=lambda e: e["ms"], default=None)  # fmt: skip
        if best:
            print(f"b={row['batch']}: fastest {best['kernel']} {fmt(best)}; floor {row['floor_ms']:.4f} ms")


if __name__ == "__main__":
    main()
