"""generate() against the bench's decode step, one process, one model (issue 13's "within 10%" target).

LinMU's decode cost does not depend on the prompt (a fixed-size state), so a short text prompt is enough. For each
batch this times, on the same converted model:
  - `bench_step`: `StaticDecoder` over a prefilled LinMUCache, captured in a CUDA graph (what `linmu bench`
    reports as LinMU's decode), steps per second after a warm-up;
  - `generate_static`: `model.generate(..., cache_implementation="static")` (greedy; on CUDA linmu's decoding loop,
    `linmu_cli.models.decode_loop`, named in the JSON) at two lengths; the
    difference of the two wall times over the difference of the new tokens is the steady per-token cost, so the
    prefill, the capture and generate()'s set-up cancel out;
  - `generate_default`: the same for plain `generate()` (eager steps on the same LinMUCache).

    python benchmarks/generate_speed.py --arch qwen2-vl-7b --batches 1,16 --json generate_speed.json

On CPU (`--arch tiny-qwen2-vl --device cpu`) it runs too (eager only), as a dry run of the script.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _generate_seconds(model, ids: torch.Tensor, new_tokens: int, **kw) -> float:
    _sync(ids.device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, **kw)  # fmt: skip
    _sync(ids.device)
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return time.perf_counter() - t0


def per_token_ms(model, ids: torch.Tensor, short: int, long: int, repeats: int, **kw) -> dict:
    """Steady per-step milliseconds of generate(): (t(long) - t(short)) / (long - short), medians of `repeats`."""
    _generate_seconds(model, ids, short, **kw)  # warm-up (kernels, autotuning, allocator)
    t_short = sorted(_generate_seconds(model, ids, short, **kw) for _ in range(repeats))[repeats // 2]
    t_long = sorted(_generate_seconds(model, ids, long, **kw) for _ in range(repeats))[repeats // 2]
    step_ms = 1000 * (t_long - t_short) / (long - short)
    return {"step_ms": step_ms, "tokens_per_s": ids.shape[0] * 1000 / step_ms, "seconds": [t_short, t_long],
            "new_tokens": [short, long]}  # fmt: skip


def bench_step_ms(model, ids: torch.Tensor, steps: int) -> dict:
    """The bench's LinMU decode: StaticDecoder from the prompt's prefilled cache, a CUDA graph on CUDA."""
    from linmu_cli.bench import decode_start
    from linmu_cli.fast_decode import StaticDecoder

    cache, token, pos = decode_start(model, {"input_ids": ids})
    with torch.no_grad():
        dec = StaticDecoder.from_cache(model, cache, token, pos)
        mode = "eager"
        if ids.device.type == "cuda":
            dec.capture()
            mode = "cuda_graph"
        for _ in range(3):
            dec.step()
        _sync(ids.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.step()
        _sync(ids.device)
        seconds = time.perf_counter() - t0
        dec.release()
    step_ms = 1000 * seconds / steps
    return {"step_ms": step_ms, "tokens_per_s": ids.shape[0] * 1000 / step_ms, "steps": steps, "mode": mode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2-vl-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--short", type=int, default=32, help="new tokens of the short generate() run")
    ap.add_argument("--long", type=int, default=160, help="new tokens of the long generate() run")
    ap.add_argument("--steps", type=int, default=200, help="timed StaticDecoder steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--default-tokens", default="4,20",
                    help="short,long new tokens for plain generate() (eager: ~10x slower per step at 7B shape)")  # fmt: skip
    ap.add_argument("--skip-default", action="store_true", help="skip plain (eager) generate()")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from linmu_cli.archs import build_random_model
    from linmu_cli.config import MateConfig
    from linmu_cli.models import convert_model, decode_loop

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = convert_model(build_random_model(args.arch, dtype, dev), MateConfig()).eval()
    res: dict = {"arch": args.arch, "device": str(dev), "dtype": str(dtype), "prompt_tokens": args.prompt_tokens,
                 "torch": torch.__version__, "batches": {}}  # fmt: skip
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
    gen = torch.Generator().manual_seed(0)
    vocab = min(model.config.get_text_config().vocab_size, 1000)
    special = [
        getattr(model.config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id")
    ]
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(10, vocab, (batch, args.prompt_tokens), generator=gen)
        ids[torch.isin(ids, torch.tensor([t for t in special if t is not None]))] = 10  # text only
        ids = ids.to(dev)
        row = res["batches"][str(batch)] = {"bench_step": bench_step_ms(model, ids, args.steps)}
        impl = "static" if dev.type == "cuda" else None
        row["generate_static"] = per_token_ms(model, ids, args.short, args.long, args.repeats,
                                              **({"cache_implementation": impl} if impl else {}))  # fmt: skip
        row["generate_static"]["loop"] = (
            decode_loop.last_decode_loop()
        )  # linmu_static on CUDA, else transformers
        if not args.skip_default:
            short, long = (int(n) for n in args.default_tokens.split(","))
            row["generate_default"] = per_token_ms(model, ids, short, long, 1)
        row["generate_static_over_bench"] = row["generate_static"]["step_ms"] / row["bench_step"]["step_ms"]
        print(f"batch {batch}: " + ", ".join(f"{k} {v['step_ms']:.2f} ms ({v['tokens_per_s']:.0f} tok/s)"
                                             for k, v in row.items() if isinstance(v, dict)), flush=True)  # fmt: skip
        print(f"  generate(static) / bench step = {row['generate_static_over_bench']:.3f}", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
