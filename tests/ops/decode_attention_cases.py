"""Inputs of tests/ops/test_decode_attention.py, and (run as a script) the driver that executes the Triton
decode kernel under Triton's CPU interpreter.

Why a separate process: TRITON_INTERPRET must be set before `triton` itself is imported (`triton.language`'s own
helpers such as `tl.zeros` / `tl.max` are `@triton.jit` functions decorated at import), and the test session may
have imported triton already (transformers does); the GPU tests of the same session need compiled kernels.

    TRITON_INTERPRET=1 python tests/ops/decode_attention_cases.py OUT.pt

writes {"kernel": {case id: output}, "teacher": {family: [logits of each step]}} or {"unavailable": reason}.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

# (batch, kv heads, group, capacity, head_dim, valid lengths per row, splits or None = the SM heuristic)
CASES = [
    (1, 1, 1, 50, 16, [33], None),  # MHA, length off the block (16), 4 splits from the heuristic
    (2, 2, 7, 77, 32, [77, 1], 3),  # GQA 7 (Qwen2-VL-7B's), length 1: two of its three splits are empty
    (3, 2, 7, 40, 24, [5, 40, 17], 2),  # head_dim off the power of 2 (masked d), one row per split boundary
    (4, 1, 1, 37, 16, [1, 16, 17, 37], 5),  # at, below, past a block; 5 asked -> 3 whole-tile chunks
    (2, 1, 7, 40, 24, [40, 9], 1),  # one split: still partials + the merge (the ring's one split writes out)
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCK_N = 16
TEACHER_STEPS = 4
# teacher_decode's length convention: one (1,) length for every row, valid slots <= length (len_offset=1)
OFFSET_CASE = (2, 2, 7, 128, 32, 100, 8)  # batch, kv heads, group, capacity, head_dim, length, splits


def case_id(case: tuple, dtype: str) -> str:
    b, hkv, g, cap, d = case[:5]
    return f"b{b}-hkv{hkv}-g{g}-L{cap}-d{d}-{dtype}"


def make_cache(batch, kv_heads, group, cap, d, dtype, device="cpu", seed=0, garbage=None):
    """q (B, Hq, 1, d) and a static cache k, v (B, Hkv, cap, d); `garbage` (B,) fills the slots from there on
    with NaN / inf, as an unwritten cache may hold."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, 1, d, generator=gen, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, cap, d, generator=gen, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, cap, d, generator=gen, device=device).to(dtype)
    if garbage is not None:
        for row, start in enumerate(garbage):
            k[row, :, start:] = float("nan")
            v[row, :, start:] = float("inf")
    return q, k, v


def teacher_prompt(processor):
    """The tiny teacher's prompt of tests/bench/test_bench.py's served-teacher test."""
    from helpers import prompt_inputs, video

    return prompt_inputs(processor, ["describe the video"], videos=[video(2)])


def _probe() -> str | None:
    """None if the interpreter runs a trivial kernel right, else why not."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def double(x, out, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(out + i, 2 * tl.load(x + i))

        x = torch.arange(8, dtype=torch.float32)
        out = torch.empty_like(x)
        double[(1,)](x, out, BLOCK=8)
        if not torch.equal(out, 2 * x):
            return "a trivial kernel ran wrongly"
    except Exception as exc:  # noqa: BLE001 - any failure means no usable interpreter
        return repr(exc)
    return None


def interpreter_unavailable(out_path: str) -> bool:
    """In a case script: probe the interpreter; if it cannot run here, save why (`run_interpreted` then skips the
    test with that reason) and return True."""
    why = _probe()
    if why is not None:
        torch.save({"unavailable": why}, out_path)
    return why is not None


def run_interpreted(script: Path, out: Path, weights_only: bool = True) -> dict:
    """Run a cases `script` (this file, swin_kernel_cases.py, rms_norm_cases.py, flex_decode_cases.py) with
    TRITON_INTERPRET=1 in a fresh process and load what it saved; skips the calling test when triton is missing
    or its interpreter cannot run a trivial kernel (the script reports `{"unavailable": why}`)."""
    import pytest

    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not testable")
    here = Path(__file__).resolve().parent
    path = os.pathsep.join(
        [str(here.parents[1]), str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]
    )
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = torch.load(out, weights_only=weights_only)
    if "unavailable" in res:
        pytest.skip(
            f"Triton's CPU interpreter (TRITON_INTERPRET=1) is unavailable here: {res['unavailable']}"
        )
    return res


def main(out_path: str) -> None:
    if interpreter_unavailable(out_path):
        return
    from linmu_cli.ops.decode_attention import decode_attention
    from linmu_cli.ops.decode_attention import triton as tri

    assert tri.INTERPRET, "TRITON_INTERPRET=1 must be set before this script starts"
    kernel: dict[str, torch.Tensor] = {}
    for case in CASES:
        b, hkv, g, cap, d, lens, splits = case
        for name, dtype in DTYPES.items():
            q, k, v = make_cache(b, hkv, g, cap, d, dtype, garbage=lens)
            qg = q.reshape(b, hkv, g, d)
            kernel[case_id(case, name)] = tri.split_kv_decode(qg, k, v, torch.tensor(lens), num_splits=splits,
                                                              block_n=BLOCK_N)  # fmt: skip
    b, hkv, g, cap, d, length, splits = OFFSET_CASE
    q, k, v = make_cache(b, hkv, g, cap, d, torch.float32, seed=3)
    kernel["offset"] = tri.split_kv_decode(q.reshape(b, hkv, g, d), k, v, torch.tensor([length]), len_offset=1,
                                           num_splits=splits, block_n=BLOCK_N)  # fmt: skip
    kernel["public"] = decode_attention(q, k, v, torch.tensor([length + 1]), backend="triton", scale=0.3)
    torch.save({"kernel": kernel, "teacher": _teacher_steps()}, out_path)


def _teacher_steps() -> dict[str, list[torch.Tensor]]:
    """The served teacher's logits over TEACHER_STEPS steps with `triton_split_kv`, for each tiny family."""

    from linmu_cli import bench
    from linmu_cli.teacher_decode import ServedTeacherDecoder
    from linmu_cli.tiny import TINY_FAMILIES, build_tiny_teacher

    steps: dict[str, list[torch.Tensor]] = {}
    for family in TINY_FAMILIES:
        teacher, processor = build_tiny_teacher(family, seed=0)
        inputs = teacher_prompt(processor)
        cache, token, pos = bench.decode_start(teacher, inputs)
        with torch.no_grad():
            served = ServedTeacherDecoder.from_cache(teacher, cache, token, pos,
                                                     new_tokens=TEACHER_STEPS + 2, kernel="triton_split_kv")  # fmt: skip
            assert served.choice.name == "triton_split_kv"
            steps[family] = [served.step().clone() for _ in range(TEACHER_STEPS)]
    return steps


if __name__ == "__main__":
    main(sys.argv[1])


def compile_for_sm90(fn, values: dict, constexprs: dict, num_warps: int, num_stages: int):
    """Compile a Triton kernel for an H100 / H200 (sm_90) without a GPU, specialized as the JIT would for the
    given argument values (ints equal to 1 become constants, pointers and multiples of 16 get the divisibility
    hint: what makes the loads vectorized and pipelined). `values`: name -> (Triton type, value)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        ty, val = values[name]
        if ty.startswith("*"):
            sig[name], attrs[(i,)] = ty, [["tt.divisibility", 16]]
        elif ty == "i32" and val == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = ty
            if ty == "i32" and val % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=target, options=options.__dict__)


# a byte-wide global load: the validity mask's (`_split_kv_kernel` with HAS_VALID), none on the teacher's path
BYTE_LOAD = r"ld\.global(\.\w+)*\.[bsu]8\s"


def split_kv_values(dtype: str, capacity: int, splits: int, chunk: int, heads=28, kv_heads=4, d=128) -> dict:
    """`_split_kv_kernel`'s runtime arguments in the served teacher's layout (q (B, Hkv, G, d) from (B, H, d);
    contiguous (B, Hkv, capacity, d) caches; one length for every row, len_offset=1), as `split_kv_decode`
    passes them: HAS_VALID false (VALID is the length tensor again, its strides 0), SPLIT (OUT unused)."""
    g = heads // kv_heads
    vals = {n: (f"*{dtype}", 0) for n in ("Q", "K", "V", "OUT")} | {n: ("*i64", 0) for n in ("LEN", "VALID")}
    vals |= {n: ("*fp32", 0) for n in ("PO", "PM", "PL")}
    for name, x in zip(("b", "h", "g", "d"), (heads * d, g * d, d, 1), strict=True):
        vals[f"stride_q{name}"] = ("i32", x)
    for name, x in zip(("b", "h", "g", "d"), (kv_heads * g * d, g * d, d, 1), strict=True):
        vals[f"stride_o{name}"] = ("i32", x)
    for p in "kv":
        for name, x in zip(("b", "h", "n", "d"), (kv_heads * capacity * d, capacity * d, d, 1), strict=True):
            vals[f"stride_{p}{name}"] = ("i32", x)
    ints = {"stride_lb": 0, "stride_mb": 0, "stride_mn": 0, "len_offset": 1, "kv_heads": kv_heads, "group": g,
            "head_dim": d, "capacity": capacity, "chunk": chunk, "num_splits": splits}  # fmt: skip
    vals |= {n: ("i32", x) for n, x in ints.items()}
    return vals | {"scale_log2": ("fp32", 0.1)}
