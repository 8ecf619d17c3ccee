"""Inputs of tests/ops/test_flex_decode.py, and (run as a script) the driver that executes Flex-MA's decode kernels
(ops/ssd/decode.py: the conv step and the fused step) under Triton's CPU interpreter, alone and inside an M-MATE
block's decode step and a tiny LinMU model's `StaticDecoder` step.

Why a separate process: TRITON_INTERPRET must be set before `triton` is imported (see decode_attention_cases.py);
the test session may have imported triton already, and its GPU tests need compiled kernels.

    TRITON_INTERPRET=1 python tests/ops/flex_decode_cases.py OUT.pt

writes {"conv": ..., "step": ..., "block": ..., "model": ..., "ran": ...} or {"unavailable": reason}. The test
process builds the same inputs from the same seeds and runs the references on them.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers import Qwen2VLTextConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (batch, channels, width, dtype, bias): one block of channels and several, widths 4 (the default), 2, 1 (no tail)
CONV_CASES = [(3, 40, 4, "fp32", True), (3, 40, 4, "bf16", True), (2, 600, 4, "bf16", True),
              (2, 24, 2, "fp32", False), (2, 24, 1, "fp32", True)]  # fmt: skip

# the fused step: shapes, state / activation dtypes, gate, norm (and how many heads it covers), fusion mode ("none", "token", "head", "one": one
# output for a shared W_o), no conv (input masked)
STEP_CASES = [
    dict(b=3, h=4, hk=2, d=8, state="fp32", io="fp32", gate=True, norm=True, mix="none", mask=False),
    dict(b=3, h=4, hk=2, d=8, state="fp32", io="fp32", gate=True, norm=True, mix="token", mask=False),
    dict(b=2, h=6, hk=2, d=16, state="fp32", io="bf16", gate=True, norm=True, mix="head", mask=False),
    dict(b=2, h=6, hk=3, d=24, state="bf16", io="bf16", gate=True, norm=True, mix="one", mask=False),
    dict(b=2, h=4, hk=4, d=8, state="fp32", io="fp32", gate=False, norm=False, mix="token", mask=True),
    dict(b=2, h=4, hk=2, d=8, state="fp32", io="fp32", gate=True, norm=False, mix="none", mask=False),
    dict(b=1, h=7, hk=1, d=128, state="bf16", io="bf16", gate=True, norm=True, mix="token", mask=False),
    # the norm on the first heads only (MateConfig.output_norm_heads): inside a kv group, whole groups, none
    *(
        dict(b=b, h=h, hk=2, d=d, state="fp32", io=io, gate=gate, norm=True, mix=mix, mask=mask, norm_heads=n)
        for b, h, d, io, gate, mix, mask, n in (
            (3, 6, 8, "fp32", True, "none", False, 2),
            (2, 6, 16, "bf16", True, "head", False, 3),
            (2, 4, 8, "fp32", False, "token", True, 0),
        )
    ),
]

# M-MATE blocks (GQA 3, head_dim 8): MateConfig fields, activation dtype, SSM state dtype
BLOCK_CASES = [
    ("own", {}, "fp32", "fp32"),
    ("shared", {"shared_projections": True}, "fp32", "fp32"),
    ("head-fusion", {"fusion": "head"}, "fp32", "fp32"),
    ("no-gate", {"output_gate": False}, "fp32", "fp32"),
    ("no-norm", {"output_norm": False}, "fp32", "fp32"),
    ("half-norm", {"output_norm_heads": 3}, "fp32", "fp32"),
    ("half-norm-bf16", {"output_norm_heads": 2, "shared_projections": True}, "bf16", "fp32"),
    ("flex-only", {"use_swin": False}, "fp32", "fp32"),
    ("no-conv", {"d_conv": 0}, "fp32", "fp32"),
    ("bf16", {}, "bf16", "fp32"),
    ("bf16-state", {"shared_projections": True}, "bf16", "bf16"),
]
HIDDEN, HEADS, KV_HEADS = 48, 6, 2
PREFILL, STEPS = 9, 5
PAD_STEP = 2  # the decode step at which row 1 is padding (its state must not move)


def case_id(case: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in case.items())


def conv_inputs(case: tuple, seed: int = 0):
    """x (B, C) a strided slice (as the block's GEMV output hands it over), tail, weight, bias or None, valid."""
    b, c, w, dt, has_bias = case
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dt]
    x = torch.randn(b, c + 7, generator=g).to(dtype)[:, 3 : 3 + c]
    tail = torch.randn(b, c, w - 1, generator=g).to(dtype)
    weight = (torch.randn(c, 1, w, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(c, generator=g) * 0.1).to(dtype) if has_bias else None
    valid = torch.ones(b, dtype=torch.bool)
    valid[1] = False  # a padding row: its input enters the tail as zero
    return x, tail, weight, bias, valid


def step_inputs(case: dict, seed: int = 0) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of `flex_decode_step` / `flex_step_naive`; strided slices as in the block."""
    b, h, hk, d = case["b"], case["h"], case["hk"], case["d"]
    io, sd = DTYPES[case["io"]], DTYPES[case["state"]]
    g = torch.Generator().manual_seed(seed + d)
    width = (2 * hk + h) * d
    xbc = torch.randn(b, width + 5, generator=g).to(io)[:, :width]
    row = torch.randn(b, h * d + h + 2 * h, generator=g).to(io)  # gate, dt_raw, logit of one GEMV output row
    gate = row[:, : h * d] if case["gate"] else None
    dt_raw = row[:, h * d : h * d + h]
    state = torch.randn(b, h, d, d, generator=g).to(sd)
    valid = torch.ones(b, dtype=torch.bool)
    if b > 1:
        valid[1] = False
    dt_bias = torch.randn(h, generator=g) - 2.0
    a_log = torch.rand(h, generator=g) * 2.0
    D = torch.randn(h, generator=g)
    norm_weight = 1 + 0.1 * torch.randn(h * d, generator=g)
    kw = dict(
        kv_heads=hk, eps=1e-6, norm=case["norm"], norm_heads=case.get("norm_heads"), mask_input=case["mask"]
    )
    if case["mix"] != "none":
        n = h if case["mix"] == "head" else 1
        kw["logit"] = row[:, h * d + h : h * d + h + n]
        kw["swin"] = torch.randn(b, 1, h, d, generator=g).to(io)[:, 0]
        kw["one_output"] = case["mix"] == "one"
    return (xbc, dt_raw, gate, state, valid, dt_bias, a_log, D, norm_weight), kw


def text_config() -> Qwen2VLTextConfig:
    return Qwen2VLTextConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             intermediate_size=64, num_hidden_layers=2, vocab_size=50)  # fmt: skip


def make_block(fields: dict, dtype: str):
    """A block with every parameter random (a trained-looking conv, step sizes, fusion), text window 6."""
    from linmu_cli.config import MateConfig
    from linmu_cli.layers.mate import MateAttention

    torch.manual_seed(0)
    block = MateAttention(text_config(), MateConfig(text_window=6, **fields).validate(), 1)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.flex.init_new_parameters(0.3)
        block.flex.dt_bias.normal_(-1.0, 0.5)
        if block.mate.d_conv > 0:
            block.flex.conv.weight.normal_(0, 0.5)
        if hasattr(block, "fuse"):
            block.fuse.weight.normal_(0, 0.3)
    return block.eval().to(DTYPES[dtype])


def block_inputs(dtype: str):
    g = torch.Generator().manual_seed(5)
    n = PREFILL + STEPS
    u = torch.randn(2, n, HIDDEN, generator=g).to(DTYPES[dtype])
    angles = torch.randn(1, n, HIDDEN // HEADS // 2, generator=g)
    emb = torch.cat([angles, angles], dim=-1).expand(2, -1, -1)
    return u, (emb.cos().to(DTYPES[dtype]), emb.sin().to(DTYPES[dtype]))


@contextlib.contextmanager
def decode_kernels(on: bool):
    """The M-MATE blocks' decode step on the decode kernels whatever the device (CPU: only under the interpreter):
    the block's device switch (`fast_kernels`, as mate.py reads it) answers True while inside."""
    from linmu_cli.layers import mate

    original = mate.fast_kernels
    if on:
        mate.fast_kernels = lambda u, m: m.ssd_backend != "torch"
    try:
        yield
    finally:
        mate.fast_kernels = original


def block_run(name: str, kernels: bool, pack: bool = False) -> dict:
    """Prefill (reference, left padding in row 1) then STEPS decode steps of one block (the decode kernels when
    `kernels`): each step's output and the cache's tensors at the end."""
    from linmu_cli.layers.cache import LinMUCache
    from linmu_cli.layers.layout import TokenLayout
    from linmu_cli.layers.mate import pack_decode_weights

    _, fields, dtype, ssm_dtype = next(c for c in BLOCK_CASES if c[0] == name)
    block = make_block(fields, dtype)
    if pack:
        pack_decode_weights(block)
    u, (cos, sin) = block_inputs(dtype)
    cache = LinMUCache(2, ssm_dtype=DTYPES[ssm_dtype])
    valid = torch.ones(2, PREFILL, dtype=torch.bool)
    valid[1, :2] = False
    outs = []
    with torch.no_grad():
        layout = TokenLayout.text_only(2, PREFILL, torch.device("cpu"), valid)
        block(u[:, :PREFILL], position_embeddings=(cos[:, :PREFILL], sin[:, :PREFILL]), cache=cache,
              linmu_layout=layout)  # fmt: skip
        with decode_kernels(kernels):
            for t in range(PREFILL, PREFILL + STEPS):
                step_valid = torch.tensor([[True], [t - PREFILL != PAD_STEP]])
                layout = TokenLayout.text_only(2, 1, torch.device("cpu"), step_valid)
                out = block(u[:, t : t + 1], position_embeddings=(cos[:, t : t + 1], sin[:, t : t + 1]),
                            cache=cache, linmu_layout=layout)[0]  # fmt: skip
                outs.append(out)
    state = cache.layer(1)
    return {"out": torch.cat(outs, 1), **{n: t.clone() for n, t in state.tensors()}}


def model_steps(kernels: bool) -> list[torch.Tensor]:
    """A tiny LinMU model's `StaticDecoder` (random cache of the real shapes): three steps' logits."""
    from linmu_cli.config import MateConfig
    from linmu_cli.fast_decode import StaticDecoder
    from linmu_cli.models import convert_model
    from linmu_cli.tiny import build_tiny_teacher

    teacher, _ = build_tiny_teacher("qwen2_vl", seed=0)
    student = convert_model(teacher, MateConfig(text_window=5))
    with torch.no_grad(), decode_kernels(kernels):
        runner = StaticDecoder.random(student, batch=2, position=20, seed=1)
        return [runner.step().clone() for _ in range(3)]


def main(out_path: str) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from decode_attention_cases import interpreter_unavailable

    if interpreter_unavailable(out_path):
        return
    from linmu_cli.ops.short_conv import conv_step, last_conv_backend
    from linmu_cli.ops.ssd import decode, flex_decode_step, last_ssd_step_backend

    assert decode.INTERPRET, "TRITON_INTERPRET=1 must be set before this script starts"
    res: dict = {"conv": {}, "step": {}, "block": {}, "ran": {}}
    for case in CONV_CASES:
        x, tail, weight, bias, valid = conv_inputs(case)
        out = conv_step(x, tail, weight, bias, valid)
        res["conv"][case] = (out, tail)
    res["ran"]["conv"] = last_conv_backend()
    x, tail, weight, bias, valid = conv_inputs(CONV_CASES[0])
    try:  # no backward: refused in grad mode, never a silently detached output
        conv_step(x.requires_grad_(True), tail, weight, bias, valid)
    except RuntimeError as exc:
        res["refused_grad"] = str(exc)
    for case in STEP_CASES:
        args, kw = step_inputs(case)
        out = flex_decode_step(*args, **kw)
        res["step"][case_id(case)] = (out, args[3])  # the state, updated in place
    res["ran"]["step"] = last_ssd_step_backend()
    for name, *_ in BLOCK_CASES:
        for pack in (False, True):
            res["block"][(name, pack)] = block_run(name, kernels=True, pack=pack)
    res["ran"]["block"] = (last_ssd_step_backend(), last_conv_backend())
    res["model"] = model_steps(kernels=True)
    torch.save(res, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
