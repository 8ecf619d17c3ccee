"""Issue 17 (distillation at half the GPU-hours): checkpointing policies, the trimmed teacher pass, the AdamW
implementation switch, the data prefetcher and the per-phase benchmark, each checked against the exact path."""

import copy
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import linmu_cli  # noqa: F401
from linmu_cli.config import MateConfig
from linmu_cli.distillation import load_recipe
from linmu_cli.distillation.data import Prefetcher, SampleStream
from linmu_cli.distillation.losses import relative_mse, token_weights
from linmu_cli.distillation.objectives import EndToEndObjective, LayerwiseObjective, run_student, run_teacher
from linmu_cli.distillation.recipe import LoraSettings, LossConfig
from linmu_cli.distillation.recompute import apply_end_to_end
from linmu_cli.distillation.trainer import _set_optimizer_impl, inject_lora, optimizer_flags, set_trainable
from linmu_cli.errors import LinmuError
from linmu_cli.models import convert_model
from linmu_cli.tiny import build_tiny_teacher

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    teacher, processor = build_tiny_teacher("qwen2_vl", seed=0)
    teacher.requires_grad_(False)
    recipe = load_recipe(RECIPE, ["data.tasks=[video_count]", "data.frames=8"])
    batch = SampleStream(recipe.data, processor, seed=0).next_batch(2)
    return teacher, processor, recipe, batch


def _count_calls(modules) -> Counter:
    calls: Counter = Counter()
    for name, m in modules:
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.update([name]))
    return calls


def _stage3_grads(tiny, policy: str):
    """One stage-3 loss and its gradients under `policy`, with forward calls of each MLP and M-MATE block."""
    teacher, _, _, batch = tiny
    torch.manual_seed(0)
    student = convert_model(teacher, MateConfig(vision_window=[2, 2, 2], text_window=64), seed=0)
    inject_lora(student, LoraSettings(rank=4, alpha=8.0, dropout=0.1))  # dropout: recompute must replay RNG
    params = set_trainable(student, ["flex", "swin", "fusion", "lora"])
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, p in params:
            if "lora_B" in name:
                p.normal_(0, 0.02)
    student.train()
    layers = student.family.decoder_layers(student)
    apply_end_to_end(student, layers, policy)
    calls = _count_calls(
        [(f"mlp{i}", layer.mlp.down_proj) for i, layer in enumerate(layers)]
        + [(f"mate{i}", layer.self_attn) for i, layer in enumerate(layers)]
    )
    vision_grad: list[bool] = []  # the frozen tower's output: does backward run through the tower?
    student.model.visual.register_forward_hook(
        lambda m, a, o: vision_grad.append(o.pooler_output.requires_grad)
    )
    tp = run_teacher(teacher, teacher.model.language_model.layers, batch, want_logits=True, keep_inputs=False)
    objective = EndToEndObjective(student, LossConfig(hidden=1.0, kl=1.0))
    torch.manual_seed(1)
    out = objective(batch, tp, student.token_layout(**batch))
    out["loss"].backward()
    assert vision_grad == [False], f"{policy}: the frozen vision tower is in the autograd graph"
    return out["loss"].detach(), {n: p.grad.clone() for n, p in params}, calls


def test_checkpointing_policies_give_the_same_loss_and_gradients(tiny):
    """Every policy recomputes what it says (once: no MLP runs a third time) and none changes the numbers."""
    loss, grads, calls = _stage3_grads(tiny, "none")
    assert all(v == 1 for v in calls.values()), calls
    expected = {  # forward calls per module in one step: 1 = no recomputation, 2 = recomputed once in backward
        "all": {"mlp0": 2, "mlp1": 2, "mate0": 2, "mate1": 2},
        "every_other": {"mlp0": 2, "mlp1": 1, "mate0": 2, "mate1": 1},
        "mlp_only": {"mlp0": 2, "mlp1": 2, "mate0": 1, "mate1": 1},
    }
    for policy, want in expected.items():
        loss_p, grads_p, calls_p = _stage3_grads(tiny, policy)
        assert dict(calls_p) == want, policy
        assert torch.equal(loss_p, loss), policy
        assert grads_p.keys() == grads.keys()
        assert all(torch.equal(grads_p[k], grads[k]) for k in grads), policy


def test_layerwise_policies_give_the_same_gradients(tiny):
    """Every layer-wise policy gives the same loss and the same gradient bits, `per_layer` included (its backward
    runs inside the objective, one layer at a time, as the trainer calls it: 3 micro-batches accumulated, a loss
    weight whose product with 1/3 rounds)."""
    teacher, _, _, batch = tiny
    tp = run_teacher(teacher, teacher.model.language_model.layers, batch, want_logits=False)
    assert tp.logits is None and len(tp.layer_inputs) == len(tp.layer_outputs) == 2
    results = {}
    for policy in ("none", "all", "every_other", "mlp_only", "per_layer"):
        student = convert_model(teacher, MateConfig(vision_window=[2, 2, 2], text_window=64), seed=0)
        params = set_trainable(student, ["flex", "swin", "fusion"])
        student.train()
        objective = LayerwiseObjective(student, LossConfig(hidden=0.3), policy, grad_accum=3)
        losses = []
        for _ in range(3):  # the trainer's micro-batches
            out = objective(tp, student.token_layout(**batch))
            assert out["loss"].requires_grad != objective.runs_backward, policy
            if not objective.runs_backward:
                (out["loss"] / 3).backward()
            losses.append(out["loss"].detach())
        results[policy] = (torch.stack(losses), [p.grad.clone() for _, p in params])
    ref_loss, ref_grads = results["none"]
    assert all(g.abs().sum() > 0 for g in ref_grads)
    for policy, (loss, grads) in results.items():
        assert torch.equal(loss, ref_loss) and all(map(torch.equal, grads, ref_grads)), policy


def test_per_layer_is_refused_end_to_end_and_under_fsdp():
    with pytest.raises(LinmuError, match="stage3.gradient_checkpointing: per_layer needs layer-wise"):
        load_recipe(RECIPE, ["stages.stage3.gradient_checkpointing=per_layer"])
    from linmu_cli.distillation import _check_per_layer

    ddp = load_recipe(RECIPE, ["stages.stage1.gradient_checkpointing=per_layer"])
    fsdp = load_recipe(
        RECIPE, ["stages.stage1.gradient_checkpointing=per_layer", "distributed.strategy=fsdp"]
    )
    _check_per_layer(ddp, ["stage1", "stage2"], world=2)  # DDP: the trainer averages the gradients
    _check_per_layer(fsdp, ["stage1"], world=1)
    _check_per_layer(fsdp, ["stage2", "stage3"], world=2)  # stage 1 does not run
    with pytest.raises(LinmuError, match="stage1.gradient_checkpointing=per_layer does not run under FSDP"):
        _check_per_layer(fsdp, ["stage1"], world=2)


def test_teacher_pass_keeps_only_what_the_loss_uses(tiny):
    teacher, _, _, batch = tiny
    layers = teacher.model.language_model.layers
    full = run_teacher(teacher, layers, batch, want_logits=True)
    trimmed = run_teacher(teacher, layers, batch, want_logits=True, keep_inputs=False, keep_layers=[1])
    assert trimmed.layer_inputs == [] and trimmed.layer_ids == [1] and len(trimmed.layer_outputs) == 1
    assert torch.equal(trimmed.output_of(1), full.layer_outputs[1]) and torch.equal(
        trimmed.logits, full.logits
    )
    # kept in the teacher's own dtype (bf16 here), never upcast to a float32 copy
    bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    kept = run_teacher(bf16, bf16.model.language_model.layers, batch, want_logits=False, keep_inputs=False,
                       keep_layers=[1])  # fmt: skip
    assert kept.output_of(1).dtype == torch.bfloat16
    assert run_teacher(teacher, layers, batch, want_logits=False, keep_layers=[]).layer_outputs == []
    # the loss over every layer is the same from the trimmed pass; a subset is that subset's regression
    student = convert_model(teacher, MateConfig(vision_window=[2, 2, 2], text_window=64), seed=0)
    layout = student.token_layout(**batch)
    no_inputs = run_teacher(teacher, layers, batch, want_logits=True, keep_inputs=False, keep_layers=[0, 1])
    with torch.no_grad():
        a = EndToEndObjective(student, LossConfig(kl=1.0))(batch, full, layout)
        b = EndToEndObjective(student, LossConfig(kl=1.0))(batch, no_inputs, layout)
        c = EndToEndObjective(student, LossConfig(kl=1.0, hidden_layers=[1]))(batch, trimmed, layout)
        _, (layer1,) = run_student(student, batch, [1])
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["hidden"], b["hidden"])
    w = token_weights(layout.valid, layout.is_vision(), 1.0)
    assert torch.equal(c["hidden"], relative_mse(layer1, full.layer_outputs[1], w))
    assert torch.equal(c["kl"], a["kl"]) and not torch.equal(c["hidden"], a["hidden"])
    with pytest.raises(LinmuError, match="hidden_layers"):
        EndToEndObjective(student, LossConfig(hidden_layers=[5]))(batch, full, layout)
    with pytest.raises(LinmuError, match="end_to_end only"):
        load_recipe(RECIPE, ["stages.stage1.loss.hidden_layers=[0]"])


def test_recipe_switches_default_to_the_exact_path():
    recipe = load_recipe(RECIPE)
    for cfg in recipe.stages.values():
        assert cfg.optimizer == "auto" and cfg.prefetch == 0 and cfg.checkpoint_policy == "none"
        assert cfg.loss.hidden_layers is None
    r = load_recipe(RECIPE, ["stages.stage3.gradient_checkpointing=every_other", "stages.stage1.gradient_checkpointing=true",
                             "stages.stage3.optimizer=fused", "stages.stage2.prefetch=2"])  # fmt: skip
    assert (
        r.stages["stage3"].checkpoint_policy == "every_other"
        and r.stages["stage1"].checkpoint_policy == "all"
    )
    assert r.stages["stage3"].optimizer == "fused" and r.stages["stage2"].prefetch == 2
    with pytest.raises(LinmuError, match="gradient_checkpointing"):
        load_recipe(RECIPE, ["stages.stage3.gradient_checkpointing=sometimes"])
    with pytest.raises(LinmuError, match="optimizer"):
        load_recipe(RECIPE, ["stages.stage3.optimizer=fast"])


def test_resumed_optimizer_takes_this_recipes_implementation():
    """A checkpoint's param groups carry the saved run's foreach / fused flags; a resume applies the recipe's,
    and the restored state continues the same update (fused vs loop: equal within float32 rounding)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64))
    opt = torch.optim.AdamW([w], lr=1e-2, **optimizer_flags("for_loop"))
    for _ in range(3):
        w.grad = torch.randn(64)
        opt.step()
    saved, w_saved = opt.state_dict(), w.detach().clone()
    grad = torch.randn(64)
    results = {}
    for impl in ("for_loop", "foreach", "fused"):
        v = torch.nn.Parameter(w_saved.clone())
        again = torch.optim.AdamW([v], lr=1e-2, **optimizer_flags(impl))
        again.load_state_dict(copy.deepcopy(saved))  # load_state_dict shares the tensors
        assert again.param_groups[0]["foreach"] is False  # what the checkpoint said
        _set_optimizer_impl(again, impl)
        assert again.param_groups[0]["fused"] is (True if impl == "fused" else None)
        v.grad = grad.clone()
        again.step()
        results[impl] = v.detach()
    assert torch.equal(results["foreach"], results["for_loop"])
    torch.testing.assert_close(results["fused"], results["for_loop"], rtol=1e-6, atol=1e-7)


def _stream(recipe, processor):
    return SampleStream(recipe.data, processor, seed=0)


def test_prefetcher_yields_the_same_batches_and_consumed_positions(tiny):
    _, processor, recipe, _ = tiny
    plain, ahead = _stream(recipe, processor), Prefetcher(_stream(recipe, processor), 2, depth=3)
    for _ in range(4):
        a, b = plain.next_batch(2), ahead.next_batch(2)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert ahead.position == plain.position  # what was consumed, not what the worker made
    # the worker runs ahead (polled: right after handing over a batch it may not have read the next sample yet)
    deadline = time.monotonic() + 60
    while ahead.stream.position <= ahead.position and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ahead.stream.position > ahead.position
    ahead.close()
    # a resume sets the position before the first batch: the same batches follow
    resumed = Prefetcher(_stream(recipe, processor), 2)
    resumed.position = plain.position
    a, b = plain.next_batch(2), resumed.next_batch(2)
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed.position == plain.position
    resumed.close()
    with pytest.raises(ValueError, match="batches of 2"):
        Prefetcher(_stream(recipe, processor), 2).next_batch(1)


def test_prefetcher_raises_bad_samples_at_their_batch(tiny, tmp_path):
    """data.on_error: raise stops at the bad sample's batch, after the good ones before it were consumed."""
    _, processor, _, _ = tiny
    from PIL import Image

    Image.new("RGB", (56, 56), "red").save(tmp_path / "ok.png")
    rows = [
        {
            "image": "ok.png",
            "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "red"}],
        }
    ]
    rows = rows * 2 + [{**rows[0], "image": "missing.png"}] + rows * 3
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(RECIPE, ["data.source=manifest", f"data.manifest={tmp_path / 'm.jsonl'}",
                                  "data.heldout=1", "data.on_error=raise"])  # fmt: skip
    stream = SampleStream(recipe.data, processor, seed=0)
    order = [stream._index(i) for i in range(5)]
    bad_at = order.index(2)
    ahead = Prefetcher(SampleStream(recipe.data, processor, seed=0), 1, depth=4)
    for _ in range(bad_at):
        ahead.next_batch(1)
    assert ahead.position == bad_at
    with pytest.raises(LinmuError, match="bad sample"):
        ahead.next_batch(1)


def test_distill_throughput_breakdown_adds_up(tmp_path):
    """benchmarks/distill_throughput.py --tiny: every phase of every stage present, the phases cover the step,
    recomputation only with checkpointing, per_layer's in-objective backward counted as backward, the trimmed
    configuration's fields recorded."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill_throughput.py"), "--tiny", "--steps", "1",
           "--variant", "before:ckpt=all,ckpt_e2e=all",
           "--variant", "after:ckpt=none,ckpt_e2e=mlp_only,optimizer=fused,teacher_keep=used,prefetch=1,stages=stage1+stage3",
           "--variant", "b2:ckpt=per_layer,teacher_keep=used,prefetch=1,stages=stage1,batch=2",
           "--out", str(tmp_path), "--label", "t"]  # fmt: skip
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "distill_throughput-t.json").read_text())
    phases = set(data["phases"])
    assert phases == {"data", "teacher_forward", "student_forward", "losses", "recompute", "backward",
                      "optimizer", "other"}  # fmt: skip
    records = [data["baseline_teacher_fwd_bwd"], data["baseline_by_batch"]["2"]] + [
        s for v in data["variants"].values() for s in v["stages"].values()
    ]
    assert len(records) == 8 and set(data["variants"]["after"]["stages"]) == {"stage1", "stage3"}
    # batch=2: twice the tokens per step, against the teacher at batch 2 (and at batch 1)
    base1, base2 = data["baseline_by_batch"]["1"], data["baseline_by_batch"]["2"]
    b2 = data["variants"]["b2"]["stages"]["stage1"]
    assert base1 == data["baseline_teacher_fwd_bwd"] and base1["tokens_per_step"] == data["tokens"]
    assert (
        b2["batch"] == base2["batch"] == 2
        and b2["tokens_per_step"] == base2["tokens_per_step"] == 2 * data["tokens"]
    )
    assert b2["tokens_per_s"] == pytest.approx(2 * data["tokens"] / b2["s_per_step"])
    assert b2["over_baseline"] == pytest.approx(b2["tokens_per_s"] / base2["tokens_per_s_without_data"])
    assert b2["over_baseline_batch1"] == pytest.approx(
        b2["tokens_per_s"] / base1["tokens_per_s_without_data"]
    )
    for rec in records:
        assert set(rec["phases_s"]) == phases
        assert rec["phases_sum_s"] == pytest.approx(rec["s_per_step"], rel=1e-6)
        assert rec["phases_s"]["other"] <= 0.25 * rec["s_per_step"]  # the spans cover the step
        assert rec["phases_s"]["data"] > 0 and rec["phases_s"]["teacher_forward"] > 0
        assert rec["phases_s"]["backward"] > 0 and rec["tokens_per_s"] > 0
        assert rec["allocator"] == {"alloc_retries": 0, "device_mallocs": 0}  # CPU: no CUDA allocator
    before, after = data["variants"]["before"]["stages"], data["variants"]["after"]["stages"]
    assert all(s["phases_s"]["recompute"] > 0 and s["phases_s"]["optimizer"] > 0 for s in before.values())
    assert after["stage1"]["phases_s"]["recompute"] == 0 and after["stage3"]["phases_s"]["recompute"] > 0
    assert before["stage3"]["phases_s"]["losses"] > 0 and after["stage3"]["checkpointing"] == "mlp_only"
    assert data["variants"]["after"]["config"]["optimizer"] == "fused"
    assert b2["checkpointing"] == "per_layer" and b2["phases_s"]["recompute"] == 0
    assert data["stage3_over_baseline"] == before["stage3"]["over_baseline"] > 0


def test_shared_teacher_embeddings_skip_the_students_vision_tower(tiny):
    """Stage 3 with share_teacher_embeddings: the same loss and gradients (float32), no second vision pass."""
    teacher, _, _, batch = tiny
    layers = teacher.model.language_model.layers
    results = []
    for share in (False, True):
        student = convert_model(teacher, MateConfig(vision_window=[2, 2, 2], text_window=64), seed=0)
        params = set_trainable(student, ["flex", "swin", "fusion"])
        tp = run_teacher(teacher, layers, batch, want_logits=True, keep_inputs=False, keep_embeds=share)
        assert (tp.inputs_embeds is not None) == share
        calls = _count_calls([("visual", student.model.visual), ("embed", student.get_input_embeddings())])
        out = EndToEndObjective(student, LossConfig(kl=1.0), share)(batch, tp, student.token_layout(**batch))
        out["loss"].backward()
        assert dict(calls) == ({} if share else {"visual": 1, "embed": 1})
        results.append((out["loss"].detach(), [p.grad.clone() for _, p in params]))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and all(map(torch.equal, ga, gb))
    with pytest.raises(ValueError, match="keep_embeds"):
        plain = run_teacher(teacher, layers, batch, True)
        EndToEndObjective(student, LossConfig(), True)(batch, plain, student.token_layout(**batch))
    with pytest.raises(LinmuError, match="share_teacher_embeddings"):
        load_recipe(RECIPE, ["stages.stage1.share_teacher_embeddings=true"])


def _distill_throughput():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "distill_throughput", ROOT / "benchmarks" / "distill_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distill_throughput_batch_of_copies_has_the_one_sample_loss(tiny):
    """distill_throughput.py `batch=2`: two copies of the sample stacked as the processor batches two videos
    (patches concatenated, one grid row per video), twice the tokens per step, one segment per row, and stage
    1's and stage 3's losses (finite) those of the one sample: identical rows give the same weighted means."""
    bench = _distill_throughput()
    from linmu_cli.archs import build_random_model
    from linmu_cli.distillation.objectives import hidden_layer_ids
    from linmu_cli.distillation.recipe import STAGE_DEFAULTS

    _, _, _, processed = tiny  # what the processor makes of 2 videos: the layout stack_copies follows
    grid = processed["video_grid_thw"]
    assert grid.shape == (2, 3) and processed["pixel_values_videos"].shape[0] == int(grid.prod(-1).sum())
    torch.manual_seed(0)
    teacher = build_random_model("tiny-qwen2-vl", torch.float32, torch.device("cpu"))
    teacher.requires_grad_(False)
    torch.manual_seed(1)
    one = bench.video_batch(teacher.config, 8, 112, 64, "cpu")
    two = bench.stack_copies(one, 2)
    assert two["input_ids"].shape == (2, one["input_ids"].shape[1])
    assert two["input_ids"].numel() == 2 * one["input_ids"].numel()
    assert two["pixel_values_videos"].shape[0] == 2 * one["pixel_values_videos"].shape[0]
    assert two["video_grid_thw"].tolist() == 2 * one["video_grid_thw"].tolist()
    assert all(torch.equal(two[k][1:], one[k]) for k in ("input_ids", "attention_mask", "mm_token_type_ids"))
    layers = teacher.model.language_model.layers
    student = convert_model(teacher, MateConfig(), seed=0)
    student.train()
    for stage in ("stage1", "stage3"):
        loss_cfg = LossConfig(**STAGE_DEFAULTS[stage].get("loss", {}))
        keep = hidden_layer_ids(loss_cfg, len(layers))
        losses = []
        for batch in (one, two):
            layout = student.token_layout(**batch)
            assert [[(s.start, s.length) for s in row] for row in layout.segments] == [
                [(s.start, s.length) for s in student.token_layout(**one).segments[0]]
            ] * batch["input_ids"].shape[0]
            if stage == "stage1":
                tp = run_teacher(teacher, layers, batch, want_logits=False)
                out = LayerwiseObjective(student, loss_cfg)(tp, layout)
            else:
                tp = run_teacher(
                    teacher, layers, batch, want_logits=True, keep_inputs=False, keep_layers=keep
                )
                out = EndToEndObjective(student, loss_cfg)(batch, tp, layout)
            losses.append(out["loss"].detach())
        assert torch.isfinite(losses[0]) and losses[0] > 0, stage
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7, msg=stage)
