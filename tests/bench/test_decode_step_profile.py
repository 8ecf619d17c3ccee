"""benchmarks/decode_step_profile.py: every (runner, batch, norm / MLP variant) entry with its counts, timing and
roofline, on the tiny model on CPU (seconds), and on the GPU with the fused kernels in the profiled step."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_step_profile.py"


def _script():
    spec = importlib.util.spec_from_file_location("decode_step_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(res: dict, batches: list[int], variants: list[str]) -> None:
    assert (
        res["layers"] == 2
        and res["ceilings"]["copy_bytes_per_s"] > 0
        and res["norm_mlp_variants"] == variants
    )
    for name in ("linmu", "teacher"):
        assert set(res[name]) == {f"batch_{b}" for b in batches}
        for b in batches:
            for variant in variants:
                entry = res[name][f"batch_{b}"][variant]
                assert entry["status"] == "ok" and entry["batch"] == b and entry["step_ms"] > 0
                assert entry["aten_ops_per_step"] == pytest.approx(2 * entry["aten_ops_per_layer"])
                assert entry["bytes_per_step"] == entry["weight_bytes"] + entry["state_bytes"] > 0
                assert entry["achieved_bytes_per_s"] == pytest.approx(
                    entry["bytes_per_step"] * 1e3 / entry["step_ms"]
                )
                assert entry["of_copy_bandwidth"] == pytest.approx(
                    entry["achieved_bytes_per_s"] / res["ceilings"]["copy_bytes_per_s"]
                )
                assert set(entry["norm_mlp_kernels"]) == {"rms_norm", "add_rms_norm", "silu_mul"}
        weights = {res[name][f"batch_{b}"][variants[0]]["weight_bytes"] for b in batches}
        assert len(weights) == 1  # what grows with the batch is the state / KV read
    assert "attention_kernel" in res["teacher"][f"batch_{batches[0]}"][variants[0]]
    assert res["elapsed_s"] > 0


def test_the_profile_runs_on_the_tiny_model_on_cpu(tmp_path):
    """CPU: aten op counts and eager steps (no CUDA kernels to count); the references run in both variants."""
    out = tmp_path / "profile.json"
    res = _script().main(["--arch", "tiny-qwen2-vl", "--device", "cpu", "--batch", "1,3", "--prompt", "40",
                          "--steps", "2", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    _check(res, [1, 3], ["auto", "torch"])
    entry = res["linmu"]["batch_1"]["auto"]
    assert "kernels_per_step" not in entry and entry["timing"] == "eager steps, mean of 2"
    assert set(entry["norm_mlp_kernels"].values()) == {"torch"}
    # LinMU's M-MATE block dispatches more than the teacher's attention; the shared layer code is the same
    assert entry["aten_ops_per_layer"] > res["teacher"]["batch_1"]["auto"]["aten_ops_per_layer"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_profile_counts_the_fused_kernels_on_gpu(tmp_path):
    """CUDA, tiny model: graph replays timed; in the fused variant the step launches the two Triton kernels
    (2 norms per layer + the final one, one SiLU product per layer) and fewer kernels than on the references."""
    res = _script().main(["--arch", "tiny-qwen2-vl", "--device", "cuda", "--batch", "1,4", "--steps", "3"])
    _check(res, [1, 4], ["auto", "torch"])
    for name in ("linmu", "teacher"):
        for b in (1, 4):
            fused, ref = res[name][f"batch_{b}"]["auto"], res[name][f"batch_{b}"]["torch"]
            assert set(fused["norm_mlp_kernels"].values()) == {"triton"}
            assert set(ref["norm_mlp_kernels"].values()) == {"torch"}
            assert fused["timing"].startswith("CUDA-graph replays")
            calls = fused["kernel_calls"]
            assert sum(c for n, c in calls.items() if "_rms_norm_kernel" in n) == 2 * 2 + 1, calls
            assert sum(c for n, c in calls.items() if "_silu_mul_kernel" in n) == 2, calls
            assert not any("_rms_norm_kernel" in n or "_silu_mul_kernel" in n for n in ref["kernel_calls"])
            print(f"\n{name} batch {b}: {fused['kernels_per_step']} kernels fused, {ref['kernels_per_step']} on the "
                  f"references; {fused['step_ms']:.3f} vs {ref['step_ms']:.3f} ms")  # fmt: skip
            # per layer: 2 norms of ~8 kernels, 2 residual adds, SiLU and its product -> 3 kernels
            assert fused["kernels_per_step"] <= ref["kernels_per_step"] - 2 * 2 * 8, (fused, ref)
