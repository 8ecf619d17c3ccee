"""q_len=1 decode attention over a static KV cache (`linmu_cli.ops.decode_attention`, issue #12): the split-KV
Triton kernel against the dense float32 reference, on CPU through Triton's interpreter (small shapes: several
batch sizes, GQA 1 and 7, lengths off the block size, length 1, empty splits, garbage past the valid slots) and
on the GPU at the Qwen2-VL-7B decode shape with a CUDA-graph capture / replay; and the served teacher stepping
with it (`teacher_decode`'s `triton_split_kv`) equal to transformers' decode path.

Run the GPU part with `python3 -m pytest -s -m gpu tests/ops/test_decode_attention.py`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from decode_attention_cases import (
    BYTE_LOAD,
    CASES,
    DTYPES,
    OFFSET_CASE,
    TEACHER_STEPS,
    case_id,
    compile_for_sm90,
    make_cache,
    run_interpreted,
    split_kv_values,
    teacher_prompt,
)
from helpers import rel_error

from linmu_cli.ops.decode_attention import decode_attention, decode_attention_naive

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """The Triton kernel's outputs on every case, computed by `decode_attention_cases.py` in a subprocess
    started with TRITON_INTERPRET=1 (it must be set before triton is imported; see that file); this process
    builds the same inputs from the same seeds and checks them against the reference."""
    return run_interpreted(
        HERE / "decode_attention_cases.py", tmp_path_factory.mktemp("decode_attention") / "interpreted.pt"
    )


def _tol(dtype: torch.dtype) -> dict:
    # bf16: the output's rounding (1 ulp at |x| ~ 1 is 2^-7, and the interpreter truncates instead of rounding)
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[case_id(c, "")[:-1] for c in CASES])
def test_triton_split_kv_equals_naive_under_the_interpreter(interpreted, case, dtype):
    b, hkv, g, cap, d, lens, _ = case
    q, k, v = make_cache(b, hkv, g, cap, d, DTYPES[dtype], garbage=lens)
    got = interpreted["kernel"][case_id(case, dtype)]
    ref = decode_attention_naive(q.float(), k.float(), v.float(), torch.tensor(lens))
    assert got.dtype == DTYPES[dtype] and got.shape == (b, hkv, g, d)
    assert torch.isfinite(got).all()  # NaN / inf past the valid slots never enter
    torch.testing.assert_close(got.float().reshape(b, hkv * g, 1, d), ref, **_tol(DTYPES[dtype]))


def test_triton_split_kv_teacher_length_convention_and_public_call(interpreted):
    """One (1,) length for every row read with len_offset=1 (teacher_decode's `length` is the current token's
    slot: valid slots <= length), 8 splits of one tile each; and the public `decode_attention(backend="triton")`
    with q (B, Hq, 1, d) and a custom scale."""
    b, hkv, g, cap, d, length, _ = OFFSET_CASE
    q, k, v = make_cache(b, hkv, g, cap, d, torch.float32, seed=3)
    ref = decode_attention_naive(q, k, v, length + 1)
    got = interpreted["kernel"]["offset"]
    torch.testing.assert_close(got.reshape(b, hkv * g, 1, d), ref, atol=1e-5, rtol=1e-5)
    ref = decode_attention_naive(q, k, v, length + 1, scale=0.3)
    torch.testing.assert_close(interpreted["kernel"]["public"], ref, atol=1e-5, rtol=1e-5)


def test_served_teacher_steps_with_the_triton_kernel_like_transformers(tiny, interpreted):
    """`teacher_decode`'s `triton_split_kv` (interpreted, in the subprocess) decodes what transformers' forward
    does here, step after step, on the same tiny teacher and prompt."""

    from linmu_cli import bench

    family, teacher, processor = tiny
    inputs = teacher_prompt(processor)
    served = interpreted["teacher"][family]
    assert len(served) == TEACHER_STEPS
    cache, token, pos = bench.decode_start(teacher, inputs)
    with torch.no_grad():
        for logits in served:
            ref = teacher(
                input_ids=token, position_ids=pos, use_cache=True, **{bench.cache_kw(teacher): cache}
            )
            ref = ref.logits[:, -1]
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
            token, pos = ref.argmax(-1, keepdim=True), pos + 1


def test_decode_attention_dispatch_on_cpu():
    q, k, v = make_cache(2, 2, 2, 20, 16, torch.float32)
    valid = torch.tensor([3, 20])
    torch.testing.assert_close(decode_attention(q, k, v, valid), decode_attention_naive(q, k, v, valid))
    # the reference itself: attention over the first valid_len slots only, GQA in repeat_kv order
    kf, vf = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    row1 = torch.softmax(q[1] @ kf[1, :, :3].transpose(-1, -2) / 4, -1) @ vf[1, :, :3]
    torch.testing.assert_close(decode_attention_naive(q[1:], k[1:], v[1:], torch.tensor([3]))[0], row1)
    with pytest.raises(ValueError, match="unknown decode attention backend"):
        decode_attention(q, k, v, valid, backend="flash")


def test_split_count_fills_an_h200_at_every_batch():
    """132 SMs (H200), 4 kv heads, a 65,573-token cache: every SM gets a CTA at batch 1 (the single CTA per
    (row, kv head) of masked SDPA uses 4 of them), and no split is left empty."""
    tri = pytest.importorskip("linmu_cli.ops.decode_attention.triton", reason="triton is not installed")
    cap = 65_573 + 144
    for batch in (1, 2, 16, 32, 64):
        rows = batch * 4
        s = tri.choose_num_splits(rows, cap, 132, 64)
        chunk = math.ceil(math.ceil(cap / s) / 64) * 64
        assert math.ceil(cap / chunk) == s, batch  # whole-tile chunks, none empty
        assert rows * s >= 132, (batch, s)
    assert tri.choose_num_splits(4, cap, 132, 64) >= 33
    assert tri.choose_num_splits(4, 100, 132, 64) == 2  # short caches: no more splits than tiles


def test_kernel_trials_report_bytes_per_second_against_the_copy_ceiling():
    """The bench JSON's per-candidate roofline: bytes one call must read / its time, then / copy bandwidth."""
    from linmu_cli.bench.timing import Ceilings, add_roofline
    from linmu_cli.teacher_decode import KernelChoice

    choice = KernelChoice("a", {"a": 2.0, "b": "error: no", "c": 0.5}, 1, bytes_per_call=4_000_000)
    assert choice.bytes_per_s() == {"a": 2e9, "c": 8e9}
    entry = {
        "status": "ok",
        "achieved_bytes_per_s": 1e9,
        "attention_kernel": {"trials_bytes_per_s": choice.bytes_per_s()},
    }
    add_roofline(entry, None, Ceilings(1e15, "-", 4e9, "-"))
    assert entry["of_copy_bandwidth"] == 0.25
    assert entry["attention_kernel"]["trials_of_copy_bandwidth"] == {"a": 0.5, "c": 2.0}


def test_triton_kernels_compile_for_the_h200_without_a_gpu():
    """The real (not interpreted) path, compiled for sm_90 as the JIT specializes it at the 7B shape: bf16
    tensor-core dots, 16-byte K / V loads (no scalar 2-byte ones), shared memory within an H200 SM's 227 KiB,
    and the merge kernel at 65 splits. Catches a kernel that only the interpreter accepts."""
    pytest.importorskip("triton", reason="triton is not installed")
    from linmu_cli.ops.decode_attention import triton as tri

    consts = {"BLOCK_G": 16, "BLOCK_N": tri.DEFAULT_BLOCK_N, "BLOCK_D": 128, "EVEN_D": True, "UPCAST": False,
              "PRECISION": "tf32", "HAS_VALID": False, "SPLIT": True}  # fmt: skip
    k = compile_for_sm90(tri._split_kv_kernel, split_kv_values("bf16", 65_717, 65, 1024), consts,
                         tri.DEFAULT_NUM_WARPS, tri.DEFAULT_NUM_STAGES)  # fmt: skip
    ptx = k.asm["ptx"]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    assert "ld.global.b16" not in ptx and ("ld.global.v4" in ptx or "cp.async" in ptx)
    assert not re.search(BYTE_LOAD, ptx)  # HAS_VALID false: no validity mask read, the loop as it was
    assert k.metadata.shared <= 227 * 1024, k.metadata.shared
    print(
        f"\nsplit-KV kernel: {k.metadata.shared} B shared, cp.async {ptx.count('cp.async')} (pipelined loads)"
    )
    merge_vals = {n: ("*fp32", 0) for n in ("PO", "PM", "PL")} | {"OUT": ("*bf16", 0)}
    names = (
        "stride_ob",
        "stride_oh",
        "stride_og",
        "stride_od",
        "kv_heads",
        "group",
        "head_dim",
        "num_splits",
    )
    merge_vals |= {n: ("i32", x) for n, x in zip(names, (3584, 896, 128, 1, 4, 7, 128, 65), strict=True)}
    compile_for_sm90(tri._merge_kernel, merge_vals, {"BLOCK_S": 128, "BLOCK_D": 128}, 8, 1)


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_split_kv_at_the_7b_shape_on_gpu(batch):
    """Qwen2-VL-7B decode attention (4 kv heads x 7 queries, d=128, bf16) on a 65,573-token prompt in a cache
    of 144 more slots (NaN past the valid ones), against the float32 reference; float32 on a shorter cache."""
    from linmu_cli.ops.decode_attention import triton as tri

    prompt, cap = 65_573, 65_573 + 144
    q, k, v = make_cache(batch, 4, 7, cap, 128, torch.bfloat16, device="cuda", garbage=[prompt + 5] * batch)
    valid = torch.full((batch,), prompt + 5, device="cuda")
    got = tri.split_kv_decode(q.reshape(batch, 4, 7, 128), k, v, valid).reshape(batch, 28, 1, 128)
    ref = decode_attention_naive(q.float(), k.float(), v.float(), valid)
    assert torch.isfinite(got).all() and rel_error(got, ref) < 1e-2, rel_error(got, ref)
    q32, k32, v32 = make_cache(batch, 4, 7, 4100, 128, torch.float32, device="cuda")
    lens = torch.arange(batch, device="cuda") * 97 % 4100 + 1
    got = decode_attention(q32, k32, v32, lens, backend="triton")
    torch.testing.assert_close(got, decode_attention_naive(q32, k32, v32, lens), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_split_kv_captures_in_a_cuda_graph():
    """Captured once, replayed after the length tensor moves on in place (as the served step advances it):
    each replay equals the eager call at the new length, bit for bit, and the reference."""
    from linmu_cli.ops.decode_attention import triton as tri

    prompt, cap = 32_805, 32_805 + 64
    q, k, v = make_cache(1, 4, 7, cap, 128, torch.bfloat16, device="cuda", seed=1)
    qg = q.reshape(1, 4, 7, 128)
    length = torch.tensor([prompt], device="cuda")  # teacher_decode's convention: valid slots <= length
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tri.split_kv_decode(qg, k, v, length, len_offset=1)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tri.split_kv_decode(qg, k, v, length, len_offset=1)
    for step in range(3):
        length.fill_(prompt + 7 * step)
        graph.replay()
        eager = tri.split_kv_decode(qg, k, v, length, len_offset=1)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), step
        ref = decode_attention_naive(q.float(), k.float(), v.float(), length + 1).reshape(1, 4, 7, 128)
        assert rel_error(out, ref) < 1e-2, (step, rel_error(out, ref))
