"""GPU: a full M-MATE block at Qwen2-VL-7B head shapes, fast SSD path against the PyTorch reference.

Forward output and every parameter gradient agree to bf16 tolerance with a video segment, text around it,
and left padding. Run with `python3 -m pytest -s -m gpu tests/test_mate_gpu.py` to see the numbers.
"""

import copy

import pytest
import torch
from transformers import Qwen2VLTextConfig

from linmu_cli.config import MateConfig
from linmu_cli.layers.layout import Segment, TokenLayout
from linmu_cli.layers.mate import MateAttention
from linmu_cli.ops import last_ssd_backend, select_ssd_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and fla-core or mamba-ssm)"),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_fast_block_matches_reference_forward_and_backward():
    dev = torch.device("cuda")
    fast = select_ssd_backend(dev, "auto", need_backward=True)
    if fast == "torch":
        pytest.skip("no fast SSD backend with a backward pass imports on this GPU")
    cfg = Qwen2VLTextConfig(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                            intermediate_size=256, num_hidden_layers=2, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    length, seg = 1400, Segment(100, 4, 16, 16)  # 1024 video tokens
    ref_block = MateAttention(cfg, MateConfig(ssd_backend="torch"), layer_idx=1)
    for p in ref_block.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    ref_block.flex.init_new_parameters(0.02)
    ref_block = ref_block.to(dev, torch.bfloat16)
    fast_block = copy.deepcopy(ref_block)
    fast_block.mate = fast_block.flex.mate = fast_block.swin.mate = MateConfig(ssd_backend=fast)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :37] = False  # left padding
    layout = TokenLayout.text_only(2, length, dev, valid)
    layout.segments = [[seg], [Segment(seg.start + 37, 4, 16, 16)]]
    u = torch.randn(2, length, 3584, device=dev, dtype=torch.bfloat16)
    angles = torch.randn(2, length, 64, device=dev)
    rope = (
        torch.cat([angles, angles], -1).cos().bfloat16(),
        torch.cat([angles, angles], -1).sin().bfloat16(),
    )
    outs, grads = [], []
    for block in (ref_block, fast_block):
        out = block(u, position_embeddings=rope, linmu_layout=layout)[0]
        ran = last_ssd_backend()
        (out.float() * valid[..., None].to(dev)).square().mean().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in block.named_parameters()})
    assert ran == fast
    fwd_err = rel(outs[1][valid], outs[0][valid])
    grad_errs = {n: rel(grads[1][n], grads[0][n]) for n in grads[0] if ".flex." in f".{n}"}
    print(f"\nfast backend {fast}: forward rel. error {fwd_err:.2e}; worst Flex-MA grad rel. error "
          f"{max(grad_errs.values()):.2e} ({max(grad_errs, key=grad_errs.get)})")  # fmt: skip
    assert fwd_err < 2e-2
    assert all(e < 5e-2 for e in grad_errs.values()), grad_errs
