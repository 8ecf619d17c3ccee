"""Where one M-MATE layer spends its prefill time, against the teacher's attention layer (GPU).

One decoder attention layer at Qwen2-VL-7B shape (hidden 3584, 28 heads / 4 KV heads of 128), bf16, random
weights, a prompt of one video segment (T x 16 x 16 merged tokens, i.e. 448x448 frames) between 20 + 17 text
tokens. Timed with CUDA events (median of --repeats after a warm-up):

- teacher: transformers' Qwen2-VL attention (SDPA, causal);
- M-MATE layer, full; the same layer in floor mode (scans and attention skipped, layers/floor.py);
- M-MATE pieces: the forward SSD scan (with its scan-order gathers), the backward scan (segment-confined),
  Local-Swin's window attention, its text sliding window;
- the decode step of the layer at batch 1, 16 and 256 (a LinMUCache's fixed buffers, as generate() and
  linmu_cli.fast_decode run it).

Then a torch.profiler table of the CUDA kernels of one full layer forward (top 25 by time). Usage:

    python benchmarks/mate_layer_profile.py --tokens 65536 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linmu_cli.config import MateConfig  # noqa: E402
from linmu_cli.layers.cache import LinMUCache  # noqa: E402
from linmu_cli.layers.floor import skip_mixers  # noqa: E402
from linmu_cli.layers.layout import Segment, TokenLayout  # noqa: E402
from linmu_cli.layers.mate import MateAttention  # noqa: E402
from linmu_cli.ops import last_ssd_backend  # noqa: E402
from linmu_cli.ops.fused_linear import fused_linear  # noqa: E402
from linmu_cli.ops.gated_norm import last_norm_backend  # noqa: E402
from linmu_cli.ops.short_conv import last_conv_backend  # noqa: E402
from linmu_cli.ops.ssd import last_ssd_step_backend  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def kernel_table(fn: Callable[[], object], rows: int) -> str:
    """torch.profiler's table of one `fn()` call, by CUDA time, printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    print(table)
    return table


def write_json(path: Path | None, res: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tokens", type=int, default=65536, help="video tokens (multiple of 256: 16x16 per frame pair)"
    )
    ap.add_argument("--ssd-backend", default=None, help="fla | mamba | torch [default: fla when it imports]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "2026-12-01" / "layer_profile.json"
    )
    ap.add_argument("--no-decode", action="store_true", help="skip the decode-step timings")
    ap.add_argument("--forward-only", action="store_true",
                    help="only the teacher's and the M-MATE layer's forwards, and whether the layer's output is finite "
                         "(a long-context check, e.g. --tokens 262144 for 2048 frames)")  # fmt: skip
    ap.add_argument("--fwd-bwd-only", action="store_true",
                    help="only the forwards, forward + backward of both layers and the fwd+bwd kernel table")  # fmt: skip
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention

    from linmu_cli.bench import _prefill_backend

    dev, dt = torch.device("cuda"), torch.bfloat16
    backend = _prefill_backend(dev, args.ssd_backend)
    cfg = Qwen2VLTextConfig(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                            num_hidden_layers=2, vocab_size=1000)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    mate = MateConfig(ssd_backend=backend)

    def make(m: MateConfig) -> MateAttention:
        torch.manual_seed(0)
        with torch.device(dev):
            blk = MateAttention(cfg, m, layer_idx=1).to(dt)  # odd layer: shifted windows, "twh" scan order
            for p in blk.parameters():
                torch.nn.init.normal_(p, 0, 0.02)
            blk.flex.init_new_parameters(0.02)
        return blk

    block = make(mate)
    shared_block = make(mate.replace(shared_projections=True))
    train_block = make(mate.replace(ssd_backend="auto"))  # training kernel (mamba-ssm on Hopper, design §8)
    with torch.device(dev):
        teacher = Qwen2VLAttention(cfg, layer_idx=0).to(dt)
    t = args.tokens // 256
    pre, post = 20, 17
    length = pre + t * 256 + post
    layout = TokenLayout.text_only(1, length, dev)
    layout.segments = [[Segment(pre, t, 16, 16)]]
    u = torch.randn(1, length, 3584, device=dev, dtype=dt)
    angles = torch.randn(1, length, 64, device=dev)
    rope = (torch.cat([angles, angles], -1).cos().to(dt), torch.cat([angles, angles], -1).sin().to(dt))
    r = args.repeats
    res: dict = {"tokens": length, "video_tokens": t * 256, "ssd_backend": backend, "gpu": torch.cuda.get_device_name(0),
                 "torch": torch.__version__}  # fmt: skip

    class Loud(dict):
        """Prints each timing as it lands and rewrites the JSON, so a run cut short still leaves its numbers."""

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            print(f"{key:34s} {value:9.3f} ms", flush=True)
            write_json(args.json, res)

    ms = res["ms"] = Loud()
    print(f"one layer, {length} tokens ({t} frame pairs of 16x16), {backend} scans", flush=True)

    with torch.no_grad():
        ms["teacher_attention"] = timed(lambda: teacher(u, attention_mask=None, position_embeddings=rope), r)
        ms["mate_layer"] = timed(lambda: block(u, position_embeddings=rope, linmu_layout=layout), r)
        res["ssd_backend_ran"] = last_ssd_backend()
        res["conv_backend_ran"], res["norm_backend_ran"] = last_conv_backend(), last_norm_backend()
        if args.forward_only:
            out = block(u, position_embeddings=rope, linmu_layout=layout)[0]
            res["mate_layer_finite"] = bool(torch.isfinite(out).all())
            print(f"M-MATE layer output finite: {res['mate_layer_finite']}", flush=True)
            write_json(args.json, res)
            return
    if not args.fwd_bwd_only:
        with torch.no_grad():
            with skip_mixers():
                ms["mate_layer_floor"] = timed(
                    lambda: block(u, position_embeddings=rope, linmu_layout=layout), r
                )
            ms["mate_layer_shared"] = timed(
                lambda: shared_block(u, position_embeddings=rope, linmu_layout=layout), r
            )
            with skip_mixers():
                ms["mate_layer_shared_floor"] = timed(
                    lambda: shared_block(u, position_embeddings=rope, linmu_layout=layout), r
                )
            # the dense work alone: the block's one input GEMM and its output GEMMs, and the teacher's
            parts = [
                *block.flex.projection_parts(layout),
                *block.swin.projection_parts(),
                (block.fuse.weight, block.fuse.bias),
            ]
            n_in = sum(w.shape[0] for w, _ in parts)
            hd = 28 * 128
            y_heads = torch.randn(1, length, hd, device=dev, dtype=dt)

            def dense() -> None:
                fused_linear(u, parts)
                out = block.flex.o_proj(y_heads)
                torch.addmm(out.view(-1, 3584), y_heads.view(-1, hd), block.swin.o_proj.weight.t())

            ms["mate_dense_gemms"] = timed(dense, r)
            t_parts = [(teacher.q_proj.weight, teacher.q_proj.bias), (teacher.k_proj.weight, teacher.k_proj.bias),
                       (teacher.v_proj.weight, teacher.v_proj.bias)]  # fmt: skip
            ms["teacher_dense_gemms"] = timed(lambda: (fused_linear(u, t_parts), teacher.o_proj(y_heads)), r)
            flops = 2 * length * 3584 * (n_in + 2 * hd)
            t_flops = 2 * length * 3584 * (4608 + hd)
            res["dense_tflop"] = {"mate_layer": flops / 1e12, "teacher_attention": t_flops / 1e12}
            res["tflops_per_s"] = {
                "mate_dense_gemms": flops / ms["mate_dense_gemms"] / 1e9,
                "mate_layer_floor": flops / ms["mate_layer_floor"] / 1e9,
                "teacher_dense_gemms": t_flops / ms["teacher_dense_gemms"] / 1e9,
            }
    # forward + backward (training: distillation runs it) with the training kernel
    grad_out = torch.randn(1, length, 3584, device=dev, dtype=dt) * 1e-3
    ub = u.detach().requires_grad_(True)

    def fwd_bwd(blk) -> None:
        out = blk(ub, position_embeddings=rope, linmu_layout=layout)[0]
        out.backward(grad_out)

    with torch.no_grad():
        ms["mate_layer_fwd_train_backend"] = timed(
            lambda: train_block(u, position_embeddings=rope, linmu_layout=layout), r
        )
    ms["mate_layer_fwd_bwd"] = timed(lambda: fwd_bwd(train_block), r)
    res["train_ssd_backend_ran"] = last_ssd_backend()
    from linmu_cli.ops import fla_backward_supported

    fla_ok, res["fla_backward"] = fla_backward_supported(dev, key_dim=128)
    if (
        fla_ok and mate.ssd_backend == "fla"
    ):  # fla's own backward (its #640 guard lifted at K = 128 on Hopper)
        ms["mate_layer_fwd_bwd_fla"] = timed(lambda: fwd_bwd(block), r)
        block.zero_grad(set_to_none=True)
    ms["teacher_attention_fwd_bwd"] = timed(
        lambda: teacher(ub, attention_mask=None, position_embeddings=rope)[0].backward(grad_out), r
    )
    train_block.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)
    if args.fwd_bwd_only:
        res["profile_fwd_bwd_top"] = kernel_table(lambda: fwd_bwd(train_block), 20)
        write_json(args.json, res)
        return
    with torch.no_grad():
        flex, swin = block.flex, block.swin
        ms["flex_ma"] = timed(lambda: flex(u, layout, 1, None), r)
        with skip_mixers():
            ms["flex_ma_floor"] = timed(lambda: flex(u, layout, 1, None), r)
        ms["local_swin"] = timed(lambda: swin(u, rope, layout, 1, None), r)
        with skip_mixers():
            ms["local_swin_floor"] = timed(lambda: swin(u, rope, layout, 1, None), r)
        # the scans alone, on the projected inputs
        h, d = 28, 128
        dtv = torch.rand(1, length, h, device=dev) * 0.05
        a = -torch.rand(h, device=dev) - 0.5
        xbc = torch.randn(1, length, 4608, device=dev, dtype=dt) * 0.1
        ms["scans_fwd_plus_bwd"] = timed(lambda: flex._scan(xbc, dtv, a, dtv, layout, 1, None, False), r)
        q, k, v = swin._qkv(u, rope)
        from linmu_cli.ops.window_attention import sliding_block, sliding_window_attention, window_attention

        plan = layout.window_plan(mate.vision_window, True)
        ms["window_attention"] = timed(lambda: window_attention(q, k, v, plan, d**-0.5), r)
        blocks = layout.text_blocks(sliding_block(mate.text_window, length))
        kt, vt, qt = k.transpose(1, 2), v.transpose(1, 2), q.transpose(1, 2)
        ms["text_sliding_window"] = timed(
            lambda: sliding_window_attention(qt, kt, vt, layout.valid, mate.text_window, d**-0.5, blocks), r
        )
        ms["text_sliding_window_all_blocks"] = timed(
            lambda: sliding_window_attention(qt, kt, vt, layout.valid, mate.text_window, d**-0.5), r
        )
        # Flex-MA's output: the skip add then the gated norm (the fast path) against the one fused kernel
        from linmu_cli.ops.gated_norm import gated_rmsnorm
        from linmu_cli.ops.skip_add import skip_add, skip_gated_norm

        ys = torch.randn(2, 1, length, h, d, device=dev, dtype=dt).unbind(0)
        keep = torch.rand(1, length, device=dev) < 0.9
        gate = torch.randn(1, length, 12864, device=dev, dtype=dt)[..., 4608 : 4608 + h * d]
        xs, dskip, w = (
            xbc[..., :512].view(1, length, 4, d),
            torch.randn(h, device=dev),
            flex.norm_weight.to(dt),
        )

        def unfused() -> torch.Tensor:
            return gated_rmsnorm(
                skip_add(ys[0], ys[1], keep, xs, dskip).view(1, length, h, d), gate, w, flex.eps
            )

        def fused() -> torch.Tensor:
            return skip_gated_norm(ys[0], ys[1], keep, xs, dskip, gate, w, flex.eps)

        ms["skip_add_then_gated_norm"] = timed(unfused, r)
        ms["skip_gated_norm"] = timed(fused, r)
        res["skip_gated_norm_rel_err"] = (
            (fused().float() - unfused().float()).norm() / unfused().float().norm()
        ).item()
        # decode step of this layer on a LinMUCache's fixed buffers (what generate() and fast_decode step)
        for batch in () if args.no_decode else (1, 16, 256):
            cache = LinMUCache(block.layer_idx + 1, mate.text_window)
            state = cache.layer(block.layer_idx)
            ring = (batch, 4, mate.text_window, d)
            state.set_ring(torch.randn(ring, device=dev, dtype=dt), torch.randn(ring, device=dev, dtype=dt),
                           torch.ones(batch, mate.text_window, dtype=torch.bool, device=dev))  # fmt: skip
            state.ssm = torch.randn(batch, h, d, d, device=dev) * 0.01
            state.conv = torch.randn(batch, 4608, 3, device=dev, dtype=dt)
            ut = torch.randn(batch, 1, 3584, device=dev, dtype=dt)
            rt = (rope[0][:, :1].expand(batch, 1, 128), rope[1][:, :1].expand(batch, 1, 128))
            lt = TokenLayout.text_only(batch, 1, dev)
            ms[f"decode_step_batch_{batch}"] = timed(
                lambda c=cache, ut=ut, rt=rt, lt=lt: block(
                    ut, position_embeddings=rt, linmu_layout=lt, cache=c
                ),
                r,
            )
        res["ssd_step_backend"] = last_ssd_step_backend()

        for key, value in ms.items():
            print(f"{key:34s} {value:9.3f} ms", flush=True)
        floor = ms["mate_layer_floor"]
        print(f"M-MATE layer / its floor: {ms['mate_layer'] / floor:.2f}x; over the floor: "
              f"{ms['mate_layer'] - floor:.2f} ms per layer ({28 * (ms['mate_layer'] - floor):.0f} ms for 28 layers)")  # fmt: skip

        res["profile_top"] = kernel_table(lambda: block(u, position_embeddings=rope, linmu_layout=layout), 25)
        with skip_mixers():
            res["profile_floor_top"] = kernel_table(
                lambda: block(u, position_embeddings=rope, linmu_layout=layout), 15
            )
    res["profile_fwd_bwd_top"] = kernel_table(lambda: fwd_bwd(train_block), 20)
    if "mate_layer_fwd_bwd_fla" in ms:
        res["profile_fwd_bwd_fla_top"] = kernel_table(lambda: fwd_bwd(block), 20)
    write_json(args.json, res)


if __name__ == "__main__":
    main()
