"""GPU: Local-Swin's Triton paths inside a block at Qwen2-VL-7B head shapes (28 / 4 heads of 128, bf16): the
fused rotary in a prefill (forward and every parameter gradient) and in decode steps, and the decode attention
over the ring, against the same block on its PyTorch reference (`ssd_backend: torch`). Local-Swin alone
(`use_flex: false`) so nothing but its own kernels differ.

    python3 -m pytest -s -m gpu tests/layers/test_local_swin_gpu.py
"""

import copy

import pytest
import torch
from helpers import rel_error
from transformers import Qwen2VLTextConfig

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import LinMUCache
from linmu_cli.layers.layout import Segment, TokenLayout
from linmu_cli.layers.mate import MateAttention
from linmu_cli.ops.rotary import last_rotary_backend
from linmu_cli.ops.window_attention import last_decode_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = torch.device("cuda")


def _blocks(text_window: int = 512) -> tuple[MateAttention, MateAttention]:
    """(reference, fast) copies of one Local-Swin-only block with random weights."""
    cfg = Qwen2VLTextConfig(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                            intermediate_size=256, num_hidden_layers=2, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    ref = MateAttention(cfg, MateConfig(use_flex=False, text_window=text_window, ssd_backend="torch"), 1)
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    ref = ref.to(DEV, torch.bfloat16)
    fast = copy.deepcopy(ref)
    fast.mate = fast.swin.mate = ref.mate.replace(ssd_backend="auto")
    return ref, fast


def _rope(batch: int, length: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 cos / sin (B, L, 128) of Qwen's form (both halves from the same angles), as the model passes them."""
    pos = torch.arange(start, start + length, device=DEV, dtype=torch.float32)
    inv = 1e6 ** (-torch.arange(0, 64, device=DEV, dtype=torch.float32) / 64)
    angles = (pos[:, None] * inv[None, :]).expand(batch, length, 64)
    return torch.cat([angles] * 2, -1).cos().bfloat16(), torch.cat([angles] * 2, -1).sin().bfloat16()


def test_prefill_with_the_fused_rotary_matches_the_reference_forward_and_backward():
    ref, fast = _blocks()
    length, valid = 1400, torch.ones(2, 1400, dtype=torch.bool)
    valid[1, :37] = False  # left padding
    layout = TokenLayout.text_only(2, length, DEV, valid)
    layout.segments = [[Segment(100, 4, 16, 16)], [Segment(137, 4, 16, 16)]]
    u = torch.randn(2, length, 3584, device=DEV, dtype=torch.bfloat16)
    outs, grads, ran = [], [], []
    for block in (ref, fast):
        out = block(u, position_embeddings=_rope(2, length), linmu_layout=layout)[0]
        ran.append(last_rotary_backend())
        (out.float() * valid[..., None].to(DEV)).square().mean().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in block.named_parameters()})
    assert ran == ["torch", "triton"], ran
    fwd = rel_error(outs[1][valid], outs[0][valid])
    errs = {n: rel_error(grads[1][n], grads[0][n]) for n in grads[0]}
    print(f"\nprefill, fused rotary: forward rel. error {fwd:.1e}; worst grad {max(errs.values()):.1e} "
          f"({max(errs, key=errs.get)})")  # fmt: skip
    assert fwd < 1e-2 and all(e < 2e-2 for e in errs.values()), (fwd, errs)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_steps_over_the_ring_match_the_reference(batch):
    """A 600-token prompt (the 64-slot ring wraps while prefilling and again while decoding), then 80 decode
    steps on each block's own cache: every step's output agrees, through the Triton rotary and ring kernels."""
    window, prompt, steps = 64, 600, 80
    ref, fast = _blocks(window)
    valid = torch.ones(batch, prompt, dtype=torch.bool)
    valid[batch - 1, :29] = False  # a left-padded row: its padding never becomes a valid key
    layout = TokenLayout.text_only(batch, prompt, DEV, valid)
    u = torch.randn(batch, prompt + steps, 3584, device=DEV, dtype=torch.bfloat16)
    step_layout = TokenLayout.text_only(batch, 1, DEV)
    worst = 0.0
    with torch.no_grad():
        caches = [LinMUCache(2, window) for _ in range(2)]
        for block, cache in zip((ref, fast), caches, strict=True):
            block(u[:, :prompt], position_embeddings=_rope(batch, prompt), linmu_layout=layout, cache=cache)
        for t in range(prompt, prompt + steps):
            outs = []
            for block, cache in zip((ref, fast), caches, strict=True):
                rope = _rope(batch, 1, t)
                outs.append(block(u[:, t : t + 1], position_embeddings=rope, linmu_layout=step_layout,
                                  cache=cache)[0])  # fmt: skip
                ran = (last_rotary_backend(), last_decode_backend())
            assert ran == ("triton", "triton"), ran
            worst = max(worst, rel_error(outs[1], outs[0]))
    print(f"\ndecode batch {batch}: worst step rel. error {worst:.1e} over {steps} steps")
    assert worst < 2e-2, worst
