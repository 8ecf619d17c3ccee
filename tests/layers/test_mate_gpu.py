"""GPU: a full M-MATE block at Qwen2-VL-7B head shapes, fast SSD path against the PyTorch reference.

Forward output and every parameter gradient agree to bf16 tolerance with a video segment, text around it,
and left padding. Run with `python3 -m pytest -s -m gpu tests/layers/test_mate_gpu.py` to see the numbers.
"""

import copy

import pytest
import torch
from transformers import Qwen2VLTextConfig

from linmu_cli.config import MateConfig
from linmu_cli.layers.layout import Segment, TokenLayout
from linmu_cli.layers.mate import MateAttention
from linmu_cli.ops import SSDBackendError, last_ssd_backend, select_ssd_backend
from linmu_cli.ops.fusion_mix import last_fusion_mix_backend
from linmu_cli.ops.gated_norm import gated_rmsnorm, gated_rmsnorm_reference, last_norm_backend
from linmu_cli.ops.scan_inputs import last_scan_inputs_backend
from linmu_cli.ops.short_conv import conv_kernel_error, last_conv_backend, short_conv, short_conv_reference
from linmu_cli.ops.skip_add import last_skip_add_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and fla-core or mamba-ssm)"),
]


def forget_fused_backends() -> None:
    """Clear what the fused scan-input / skip-add / fusion-mix entries recorded, so a test sees only its own calls."""
    from linmu_cli.ops import fusion_mix, scan_inputs, skip_add

    fusion_mix._LAST_BACKEND = scan_inputs._LAST_BACKEND = skip_add._LAST_BACKEND = None


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def random_block(mate: MateConfig, dev: torch.device) -> MateAttention:
    """An M-MATE block at the 7B attention shape (hidden 3584, 28 / 4 heads), random weights, bf16 on `dev`."""
    cfg = Qwen2VLTextConfig(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                            intermediate_size=256, num_hidden_layers=2, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    block = MateAttention(cfg, mate, layer_idx=1)
    for p in block.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    block.flex.init_new_parameters(0.02)
    return block.to(dev, torch.bfloat16)


def random_rope(batch: int, length: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (cos, sin) position embeddings of head_dim 128, bf16, as the decoder passes them."""
    angles = torch.randn(batch, length, 64, device=dev)
    return torch.cat([angles] * 2, -1).cos().bfloat16(), torch.cat([angles] * 2, -1).sin().bfloat16()


@pytest.mark.parametrize("shared", [False, True])
def test_fast_block_matches_reference_forward_and_backward(shared):
    dev = torch.device("cuda")
    fast = select_ssd_backend(dev, "auto", need_backward=True)
    if fast == "torch":
        pytest.skip("no fast SSD backend with a backward pass imports on this GPU")
    length, seg = 1400, Segment(100, 4, 16, 16)  # 1024 video tokens
    ref_block = random_block(MateConfig(ssd_backend="torch", shared_projections=shared), dev)
    fast_block = copy.deepcopy(ref_block)
    fast_block.mate = fast_block.flex.mate = fast_block.swin.mate = MateConfig(
        ssd_backend=fast, shared_projections=shared
    )
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :37] = False  # left padding
    layout = TokenLayout.text_only(2, length, dev, valid)
    layout.segments = [[seg], [Segment(seg.start + 37, 4, 16, 16)]]
    u = torch.randn(2, length, 3584, device=dev, dtype=torch.bfloat16)
    rope = random_rope(2, length, dev)
    outs, grads = [], []
    forget_fused_backends()
    for block in (ref_block, fast_block):
        out = block(u, position_embeddings=rope, linmu_layout=layout)[0]
        ran = last_ssd_backend(), last_conv_backend(), last_norm_backend()
        fused = last_scan_inputs_backend(), last_skip_add_backend(), last_fusion_mix_backend()
        (out.float() * valid[..., None].to(dev)).square().mean().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in block.named_parameters()})
    # the norm ran fused with the skip add (ops/skip_add: `skip_gated_norm`), not as a kernel of its own
    assert ran[0] == fast and ran[1] == "fla" and ran[2] == "skip_add", ran
    assert fused == ("triton",) * 3, fused  # the fused scan inputs, skip add + norm and fusion mix ran
    fwd_err = rel(outs[1][valid], outs[0][valid])
    grad_errs = {n: rel(grads[1][n], grads[0][n]) for n in grads[0]}
    print(f"\nfast backend {ran} (shared={shared}): forward rel. error {fwd_err:.2e}; worst grad rel. error "
          f"{max(grad_errs.values()):.2e} ({max(grad_errs, key=grad_errs.get)})")  # fmt: skip
    assert fwd_err < 2e-2
    assert all(e < 5e-2 for e in grad_errs.values()), grad_errs


@pytest.mark.parametrize("shared", [False, True])
def test_fla_block_matches_reference_forward_and_backward(shared):
    """The inference path on fla (what the prefill profile runs): the fused scan inputs (fla mode: k = B dt, v, g in
    one launch), the fused skip add and the fused fusion mix against the "torch" reference block; forward always,
    backward where fla may run it (on Hopper with Triton < 3.7.1 only because linmu lifts fla's guard at K = 128:
    docs/design.md §8; this is the check of that)."""
    from linmu_cli.ops import fla_backward_supported

    dev = torch.device("cuda")
    try:
        select_ssd_backend(dev, "fla")
    except SSDBackendError as e:
        pytest.skip(f"fla does not run here: {e}")
    # Qwen2-VL's heads: a K tile of 128 (not issue #640's 64)
    backward = fla_backward_supported(dev, key_dim=128)[0]
    length, seg = 1400, Segment(100, 4, 16, 16)
    ref_block = random_block(MateConfig(ssd_backend="torch", shared_projections=shared), dev)
    fast_block = copy.deepcopy(ref_block)
    fast_block.mate = fast_block.flex.mate = fast_block.swin.mate = MateConfig(
        ssd_backend="fla", shared_projections=shared
    )
    layout = TokenLayout.text_only(1, length, dev)
    layout.segments = [[seg]]
    u = torch.randn(1, length, 3584, device=dev, dtype=torch.bfloat16)
    rope = random_rope(1, length, dev)
    outs, grads = [], []
    forget_fused_backends()
    for block in (ref_block, fast_block):
        with torch.set_grad_enabled(backward):
            out = block(u, position_embeddings=rope, linmu_layout=layout)[0]
        ran = last_ssd_backend(), last_scan_inputs_backend(), last_skip_add_backend()
        ran += (last_fusion_mix_backend(), last_norm_backend())
        if backward:
            out.float().square().mean().backward()
            grads.append({n: p.grad for n, p in block.named_parameters()})
        outs.append(out)
    assert ran == ("fla", "triton", "triton", "triton", "skip_add"), ran
    fwd_err = rel(outs[1], outs[0])
    print(f"\nfla block (shared={shared}): forward rel. error {fwd_err:.2e}", end="")
    assert fwd_err < 2e-2
    if backward:
        grad_errs = {n: rel(grads[1][n], grads[0][n]) for n in grads[0]}
        print(f"; worst grad rel. error {max(grad_errs.values()):.2e} ({max(grad_errs, key=grad_errs.get)})")
        assert all(e < 5e-2 for e in grad_errs.values()), grad_errs
    else:
        print(" (backward: fla refuses it here)")


def test_short_conv_kernel_matches_reference_forward_and_backward():
    if conv_kernel_error() is not None:
        pytest.skip(f"fla-core's causal_conv1d does not import: {conv_kernel_error()}")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    z = torch.randn(2, 3000, 4608 + 100, device=dev, dtype=torch.bfloat16)
    x = z[..., :4608]  # a strided slice, as the block's one GEMM hands it over
    w = (torch.randn(4608, 1, 4, device=dev) * 0.5).bfloat16().requires_grad_(True)
    b = (torch.randn(4608, device=dev) * 0.1).bfloat16().requires_grad_(True)
    xs = [x.detach().requires_grad_(True), x.detach().contiguous().requires_grad_(True)]
    y_fast = short_conv(xs[0], w, b, fast=True)
    assert last_conv_backend() == "fla"
    g = torch.randn_like(y_fast)
    (gx, gw, gb) = torch.autograd.grad(y_fast, (xs[0], w, b), g)
    y_ref = short_conv_reference(xs[1].float(), w.float(), b.float())
    (rx, rw, rb) = torch.autograd.grad(y_ref, (xs[1], w, b), g.float())
    errs = [rel(y_fast, y_ref), rel(gx, rx), rel(gw, rw), rel(gb, rb)]
    print(f"\nfla causal_conv1d vs F.conv1d: rel. errors y/dx/dw/db {[f'{e:.1e}' for e in errs]}")
    assert all(e < 1e-2 for e in errs), errs


def test_gated_norm_kernel_matches_reference_forward_and_backward():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    y = torch.randn(1, 2000, 28, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(1, 2000, 28 * 128 + 64, device=dev, dtype=torch.bfloat16)[..., : 28 * 128]
    z.requires_grad_(True)
    w = (1 + 0.1 * torch.randn(28 * 128, device=dev)).bfloat16().requires_grad_(True)
    out = gated_rmsnorm(y, z, w, 1e-6, fast=True)
    ran = last_norm_backend()
    if ran == "torch":
        pytest.skip("no gated RMSNorm kernel imports (mamba-ssm or fla-core)")
    g = torch.randn_like(out)
    fast_grads = torch.autograd.grad(out, (y, z, w), g)
    ref = gated_rmsnorm_reference(y.float(), z.float(), w.float(), 1e-6)
    ref_grads = torch.autograd.grad(ref, (y, z, w), g.float())
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(fast_grads, ref_grads, strict=True)]
    print(f"\n{ran} gated rmsnorm vs reference: rel. errors out/dy/dz/dw {[f'{e:.1e}' for e in errs]}")
    assert all(e < 1e-2 for e in errs), errs


def test_gated_norm_past_int32_offsets_equals_reference():
    """A gate sliced from a 12,864-column GEMM output over 170,000 rows (2048-frame prompts have 262k): the kernel's
    int32 `row * stride` would pass 2^31 (an illegal memory access at 2048 frames on 2026-12-02); the call is split
    into row chunks, and every row still equals the reference (checked around the chunk edge and at the end)."""
    dev = torch.device("cuda")
    rows, width, hd = 170_000, 12_864, 28 * 128
    gemm = torch.randn(1, rows, width, device=dev, dtype=torch.bfloat16)
    z = gemm[..., 512 : 512 + hd]  # a strided column slice, as MateAttention._project hands it over
    y = torch.randn(1, rows, 28, 128, device=dev, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(hd, device=dev)).bfloat16()
    with torch.no_grad():
        out = gated_rmsnorm(y, z, w, 1e-6, fast=True)
    if last_norm_backend() == "torch":
        pytest.skip("no gated RMSNorm kernel imports (mamba-ssm or fla-core)")
    edge = (2**31 - 1 - hd) // width
    for lo, hi in ((0, 1000), (edge - 500, edge + 500), (rows - 1000, rows)):
        ref = gated_rmsnorm_reference(y[:, lo:hi].float(), z[:, lo:hi].float(), w.float(), 1e-6)
        assert rel(out[:, lo:hi], ref) < 1e-2, (lo, hi)


@pytest.mark.parametrize("backend", ["mamba", "fla"])
def test_one_layer_prefill_captures_in_a_cuda_graph(backend):
    """No host synchronisation in a prefill layer: capture fails on any sync (docs/design.md §6)."""
    dev = torch.device("cuda")
    try:
        select_ssd_backend(dev, backend)
    except SSDBackendError as e:
        pytest.skip(str(e))
    block = random_block(MateConfig(ssd_backend=backend), dev).eval()
    length = 40 + 4 * 256
    layout = TokenLayout.text_only(1, length, dev)
    layout.segments = [[Segment(20, 4, 16, 16)]]
    u = torch.randn(1, length, 3584, device=dev, dtype=torch.bfloat16)
    rope = random_rope(1, length, dev)
    run = lambda: block(u, position_embeddings=rope, linmu_layout=layout)[0]  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # warm-up: Triton autotuning, the layout's host-built plans
            eager = run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = run()
    graph.replay()
    torch.cuda.synchronize()
    assert last_ssd_backend() == backend
    print(f"\n{backend}: one M-MATE layer captured; replay vs eager rel. error {rel(static_out, eager):.1e}")
    assert rel(static_out, eager) < 1e-3
