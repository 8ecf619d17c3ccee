"""`linmu_cli.vision.use_fast_vision`: the fast vision tower equals transformers' own (float32, CPU).

Both families (Qwen2-VL: per-frame attention; Qwen2.5-VL: window attention on most blocks, full attention on
`fullatt_block_indexes`), several images of different sizes and multi-frame videos in one batch, so both the
equal-length-run path and the padded path run; the GPU bf16 check is in tests/bench/test_bench_gpu.py."""

import copy
import os
import shutil

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from linmu_cli.errors import LinmuError
from linmu_cli.tiny import build_tiny_teacher
from linmu_cli.vision import fast_vision_info, seq_plan, use_fast_vision


def tower(family: str) -> torch.nn.Module:
    """A small tower with the real structure (depth 4, 4 heads); Qwen2.5-VL windows of 2x2 merged tokens."""
    torch.manual_seed(0)
    if family == "qwen2_vl":
        cfg = Qwen2VLConfig(vision_config={"depth": 4, "embed_dim": 64, "num_heads": 4, "hidden_size": 48,
                                           "mlp_ratio": 2}).vision_config  # fmt: skip
        cls = Qwen2VisionTransformerPretrainedModel
    else:
        cfg = Qwen2_5_VLConfig(vision_config={"depth": 4, "hidden_size": 64, "num_heads": 4, "intermediate_size": 96,
                                              "out_hidden_size": 48, "window_size": 56,
                                              "fullatt_block_indexes": [1, 3]}).vision_config  # fmt: skip
        cls = Qwen2_5_VisionTransformerPretrainedModel
    cfg._attn_implementation = "sdpa"
    model = cls._from_config(cfg, attn_implementation="sdpa").float().eval()
    for p in model.parameters():  # post_init leaves some at zero / one: make every weight matter
        p.data.normal_(0, 0.2)
    return model


def pixels(grid: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 3 * 2 * 14 * 14), torch.tensor(grid)


GRIDS = {
    "video": [[4, 8, 8]],  # 4 frame pairs of 8x8 patches: one run of equal sequences
    "mixed": [
        [1, 4, 6],
        [3, 8, 8],
        [1, 6, 10],
        [2, 4, 4],
        [1, 10, 14],
        [2, 6, 10],
    ],  # images of different sizes + videos
}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_fast_tower_equals_transformers_tower(family, grid):
    ref_tower = tower(family)
    fast_tower = copy.deepcopy(ref_tower)
    x, thw = pixels(GRIDS[grid])
    with torch.no_grad():
        ref = ref_tower(x, grid_thw=thw)
        info = use_fast_vision(fast_tower)
        got = fast_tower(x, grid_thw=thw)
    assert info.attention_modules == 4 and not info.compiled  # CPU: eager elementwise parts
    assert sum(info.paths.values()) == 4  # every block took the fast attention
    if family == "qwen2_5_vl" and grid == "mixed":
        assert info.paths.get("padded", 0) > 0  # partial border windows: the padded batch ran
    if grid == "video":
        assert set(info.paths) == {"runs"}
    for a, b in ((got.pooler_output, ref.pooler_output), (got.last_hidden_state, ref.last_hidden_state)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert (
        ref.pooler_output - ref_tower(x[: len(x)], grid_thw=thw).pooler_output
    ).abs().max() == 0  # unpatched


def test_fast_vision_on_a_whole_model_and_idempotent():
    teacher, _ = build_tiny_teacher("qwen2_5_vl", seed=0)
    info = use_fast_vision(teacher)
    assert use_fast_vision(teacher) is info and fast_vision_info(teacher) is info
    assert "one SDPA call per run" in info.describe()
    with pytest.raises(LinmuError, match="no Qwen2-VL / Qwen2.5-VL vision tower"):
        use_fast_vision(torch.nn.Linear(2, 2))


def test_seq_plan_groups_equal_runs_and_pads_irregular_lists():
    plan = seq_plan(torch.tensor([0, 4, 8, 12, 15, 18]))
    assert plan.runs == ((0, 3, 4), (12, 2, 3)) and plan.index is None
    bounds = [0]
    for i in range(20):
        bounds.append(bounds[-1] + (3 if i % 2 else 5))
    plan = seq_plan(torch.tensor(bounds))
    assert plan.runs == () and plan.index.shape == (20, 5)
    assert plan.valid.sum().item() == bounds[-1] and plan.index[plan.valid].tolist() == list(
        range(bounds[-1])
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_compiled_parts_are_wired_as_the_same_math(family, monkeypatch):
    """compile=True patches the rotary, QuickGELU (Qwen2-VL) and silu(gate) * up (Qwen2.5-VL) functions; with
    torch.compile replaced by the identity (no compiler on CPU CI), the patched tower still equals the original."""
    ref_tower = tower(family)
    fast_tower = copy.deepcopy(ref_tower)
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=True, options=None: fn)
    info = use_fast_vision(fast_tower, compile=True)
    assert info.compiled == ["rotary", "quick_gelu" if family == "qwen2_vl" else "silu_mul"]
    x, thw = pixels(GRIDS["mixed"])
    with torch.no_grad():
        torch.testing.assert_close(fast_tower(x, grid_thw=thw).pooler_output, ref_tower(x, grid_thw=thw).pooler_output,
                                   atol=2e-5, rtol=1e-5)  # fmt: skip


def test_padded_mlp_width_gives_the_same_tower():
    """pad_mlp zero-pads Qwen2.5-VL's gated MLP (here 96 -> 128 wide): same outputs, weights untouched."""
    ref_tower = tower("qwen2_5_vl")
    fast_tower = copy.deepcopy(ref_tower)
    before = fast_tower.blocks[0].mlp.gate_proj.weight.clone()
    info = use_fast_vision(fast_tower, compile=False, pad_mlp=True)
    assert info.mlp_padded == (96, 128) and "padded 96 -> 128" in info.describe()
    assert fast_tower.blocks[0].mlp._linmu_pad[0].shape == (128, 64)
    assert torch.equal(fast_tower.blocks[0].mlp.gate_proj.weight, before)
    x, thw = pixels(GRIDS["mixed"])
    with torch.no_grad():
        torch.testing.assert_close(fast_tower(x, grid_thw=thw).pooler_output, ref_tower(x, grid_thw=thw).pooler_output,
                                   atol=2e-5, rtol=1e-5)  # fmt: skip


def test_compiled_parts_split_inputs_beyond_32_bit_indexing(monkeypatch):
    """Inputs over 2^31 elements are run in row chunks (no 32-bit index overflow in a kernel compiled small)."""
    from linmu_cli import vision

    calls = []
    monkeypatch.setattr(
        torch,
        "compile",
        lambda fn, dynamic=True, options=None: lambda *a: calls.append(a[0].shape[0]) or fn(*a),
    )
    part = vision._Compiled("quick_gelu", vision._quick_gelu, vision.FastVisionInfo(), True)
    x = torch.randn(10, 3)
    monkeypatch.setattr(vision, "_INDEX_LIMIT", 8)  # 2 rows of 3 elements per chunk
    torch.testing.assert_close(part(x), vision._quick_gelu(x))
    assert calls == [2, 2, 2, 2, 2]


def test_compiling_keeps_tritons_cache_dir(monkeypatch):
    """Inductor's first CUDA kernel points TRITON_CACHE_DIR at its own directory when it is unset, which sent the
    student's Triton kernels to a cold cache (session 15: 79 s for step 1 of the tiny recipe instead of 14 s); with
    compile on, use_fast_vision pins it to Triton's own cache first, so inductor's choice is that one."""
    knobs = pytest.importorskip("triton.knobs", reason="triton is not installed (or has no knobs)")
    from torch._inductor.runtime.runtime_utils import triton_cache_dir

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    tritons_own = knobs.cache.dir
    assert triton_cache_dir(0) != tritons_own  # inductor's directory: what it would set
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=True, options=None: fn)
    use_fast_vision(tower("qwen2_vl"), compile=False)
    assert "TRITON_CACHE_DIR" not in os.environ  # eager: untouched
    use_fast_vision(tower("qwen2_vl"), compile=True)
    assert triton_cache_dir(0) == tritons_own == knobs.cache.dir
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")  # a directory the user chose is kept
    use_fast_vision(tower("qwen2_vl"), compile=True)
    assert os.environ["TRITON_CACHE_DIR"] == "/elsewhere"


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++")), reason="inductor on CPU needs a C++ compiler"
)
def test_compiled_parts_compile_a_bounded_number_of_times_on_the_tiny_datas_shapes(monkeypatch):
    """The real torch.compile (inductor, CPU): the tiny recipe's shapes (an image of 1x4x4 patches, 16-frame videos
    of 8x4x4, one or two per batch), under no_grad (the teacher) and with grad (stage 3's tower), repeated, compile
    at most 3 graphs per function (first shape; dynamic after duck sizing; the grad mode) and equal the eager tower.
    ~20 s cold on 2 cores."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)  # restored afterwards (compile=True sets it)
    torch._dynamo.reset()
    counters.clear()
    ref_tower = tower("qwen2_vl")
    fast_tower = copy.deepcopy(ref_tower)
    info = use_fast_vision(fast_tower, compile=True)
    for grad in (False, True):
        for _ in range(2):
            for grid in ([[1, 4, 4]], [[8, 4, 4]], [[8, 4, 4], [8, 4, 4]]):
                x, thw = pixels(grid)
                with torch.set_grad_enabled(grad):
                    fast, ref = (t(x, grid_thw=thw).pooler_output for t in (fast_tower, ref_tower))
                torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)
    assert info.compiled == ["rotary", "quick_gelu"] and info.compile_error is None
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++")), reason="inductor on CPU needs a C++ compiler"
)
def test_compiled_parts_round_as_eager_does_in_bf16():
    """The real torch.compile (inductor, CPU) of each elementwise part, in bf16, equals the eager function bit for
    bit with `EAGER_ROUNDING`; without it QuickGELU's intermediates stay float32 and about a third of its outputs
    differ (the 7B tower's 1.6e-2 on the H200, docs/benchmarks.md). ~15 s cold on 2 cores."""
    import torch._dynamo

    from linmu_cli import vision

    gen = torch.Generator().manual_seed(0)
    x, up = (torch.randn(512, 96, generator=gen).bfloat16() for _ in range(2))
    q, k = (torch.randn(512, 4, 32, generator=gen).bfloat16() for _ in range(2))
    angle = torch.randn(512, 32, generator=gen)
    cases = {
        vision._quick_gelu: (x,),
        vision._silu_mul: (x, up),
        vision.rotary_eager: (q, k, angle.cos(), angle.sin()),
    }
    torch._dynamo.reset()
    for fn, args in cases.items():
        compiled, eager = torch.compile(fn, dynamic=True, options=vision.EAGER_ROUNDING)(*args), fn(*args)
        for c, e in zip(*(o if isinstance(o, tuple) else (o,) for o in (compiled, eager)), strict=True):
            assert torch.equal(c, e), f"{fn.__name__}: {(c != e).sum().item()} of {e.numel()} differ"
    fused = torch.compile(vision._quick_gelu, dynamic=True)(x)  # inductor's default: rounded once
    assert (fused != vision._quick_gelu(x)).float().mean() > 0.05
    torch._dynamo.reset()
