"""evals/train_teacher.py: its training-only speed-ups change nothing, and a short run writes a complete teacher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "evals"))

import train_teacher  # noqa: E402
from device_inputs import device_batch, host_batch  # noqa: E402
from helpers import image, prompt_inputs, video  # noqa: E402

from linmu_cli.data import synthetic  # noqa: E402
from linmu_cli.evaluation.greedy import greedy_answers  # noqa: E402
from linmu_cli.tiny import build_tiny_teacher  # noqa: E402


def test_batched_vision_attention_equals_transformers_loop():
    """Equal-length frame chunks run as one batch; unequal ones (images of two sizes) fall back to a loop."""
    model, processor = build_tiny_teacher("qwen2_vl", seed=0, vision_config={"embed_dim": 64, "num_heads": 2})
    batches = [
        prompt_inputs(processor, ["What color?"] * 2, videos=[video(0, frames=16), video(1, frames=6)]),
        prompt_inputs(processor, ["What color?"] * 2, images=[image(0, size=56), image(1, size=112)]),
    ]
    for inputs in batches:
        train_teacher.use_vision_attention(model, "sdpa")
        with torch.no_grad():
            ref = model(**inputs).logits
            train_teacher.use_vision_attention(model, train_teacher.VISION_ATTENTION)
            got = model(**inputs).logits
        train_teacher.use_vision_attention(model, "sdpa")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_video_parts_match_the_video_when_task():
    parts = train_teacher.LayoutProbes._parts(torch.tensor([[5, 2, 2]]))  # 5 frame pairs, 1 token each
    # video_when cuts pairs at round(5 * i / 3) = 0, 2, 3, 5
    assert parts.tolist() == [0, 0, 1, 2, 2]


def test_short_run_writes_a_loadable_documented_teacher(tmp_path):
    out = tmp_path / "teacher"
    argv = ["--out", str(out), "--steps", "3", "--layers", "2", "--heads", "2", "--vision-depth", "1",
            "--image-batch", "2", "--video-batch", "3", "--frames", "8", "--eval-count", "2", "--eval-every", "0",
            "--threads", "1"]  # fmt: skip
    assert train_teacher.main(argv) == 0
    report = json.loads((out / "train_teacher.json").read_text())
    assert report["steps"] == 3 and set(report["heldout_accuracy"]) == {"16", "32", "64"}
    assert report["command"].startswith("python evals/train_teacher.py --out evals/teacher")
    assert "--steps 3" in report["command"]
    config = json.loads((out / "config.json").read_text())
    assert "flash" not in json.dumps(config)  # the training-only attention is not saved
    assert "Held-out accuracy" in (out / "README.md").read_text()


# --- teacher 2 (--preset teacher2): the grid tasks at 224x224, device-side pixels, answer-window loss ------------

# --task-weights "": every task in each 1-step window (the preset's weights need several steps)
SMALL_T2 = ["--preset", "teacher2", "--size", "112", "--frames", "4,8", "--layers", "2", "--heads", "2",
            "--vision-depth", "1", "--vision-dim", "64", "--intermediate", "256", "--image-batch", "2",
            "--video-batch", "4", "--eval-count", "3", "--eval-frames", "8,16", "--log-every", "1",
            "--threads", "1", "--device", "cpu", "--task-weights", ""]  # fmt: skip


def test_teacher2_short_run_writes_report_curves_and_bf16_weights(tmp_path):
    """The whole pipeline (data -> train -> held-out eval -> atomic save) in seconds; the time budget stops it."""
    out = tmp_path / "teacher2"
    assert train_teacher.main(["--out", str(out), *SMALL_T2, "--steps", "1000", "--time-budget", "2"]) == 0
    report = json.loads((out / "train_teacher.json").read_text())
    assert report["stopped_at_budget"] and 0 < report["steps"] < 1000
    assert report["command"].startswith(
        "python evals/train_teacher.py --out evals/teacher2 --preset teacher2"
    )
    assert f"--steps {report['steps']}" in report["command"] and "--time-budget" not in report["command"]
    acc = report["heldout_accuracy"]
    assert set(acc) == {"8", "16"} and set(acc["8"]) == set(synthetic.GRID_TASKS)
    assert set(acc["16"]) == {t for t in synthetic.GRID_TASKS if synthetic.KIND[t] == "video"}
    assert report["curve"] and set(report["curve"][-1]["tasks"]) == set(synthetic.GRID_TASKS)
    assert report["min_accuracy"] == min(a for f in acc.values() for a in f.values())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "flash" not in (out / "config.json").read_text()
    assert (
        train_teacher.TEXT_ATTENTION not in (out / "config.json").read_text()
    )  # training-only mask: sdpa saved
    assert "Held-out accuracy" in (out / "README.md").read_text()
    assert "parent" not in report and "trained from scratch by" in (out / "README.md").read_text()

    # a fine-tune of it records what it started from, and its README tells both runs
    tuned = tmp_path / "tuned"
    argv = ["--out", str(tuned), *SMALL_T2, "--steps", "2", "--init-from", str(out), "--seed", "1"]
    assert train_teacher.main(argv) == 0
    child = json.loads((tuned / "train_teacher.json").read_text())
    assert child["parent"]["command"] == report["command"]
    assert child["parent"]["model_safetensors"] == report["model_safetensors"]
    assert child["parent"]["heldout_accuracy"] == report["heldout_accuracy"]
    text = (tuned / "README.md").read_text()
    assert text.index("trained from scratch by") < text.index("then fine-tuned from those weights by")
    assert report["command"] in text and child["command"] in text and "The last run: 2 AdamW steps" in text


def test_fast_replies_equal_greedy_answers():
    """The held-out path of teacher 2 (device-side pixels, worker batches) replies exactly as greedy_answers."""
    args = train_teacher.parse_args(["--out", "x", *SMALL_T2])
    model, processor = build_tiny_teacher(
        "qwen2_vl", seed=1, size="teacher2", **train_teacher.model_config(args)
    )
    jobs = [("grid_glyph", 8), ("grid_color", 8)]
    for device_inputs in (
        True,
        False,
    ):  # False: the fallback when the processor differs (processor in workers)
        fast = train_teacher.fast_replies(
            model, processor, jobs, seed=3, count=4, size=112, batch=4, device_inputs=device_inputs
        )
        for task, frames in jobs:
            samples = [synthetic.generate(task, i, seed=3, frames=frames, size=112) for i in range(4)]
            ref = greedy_answers(model, processor, samples, batch_size=4)
            assert [r for r, _ in fast[(task, frames)]] == ref
            assert [a for _, a in fast[(task, frames)]] == [s.answer for s in samples]


def one_layer_teacher2_batch(tasks: tuple[str, ...]):
    """A one-layer teacher-2 model and a labelled host batch of two 4-frame samples of each task (112 px)."""
    model, processor = build_tiny_teacher(
        "qwen2_vl", size="teacher2", num_hidden_layers=1, vision_config={"depth": 1}
    )
    examples = [train_teacher.example(t, i, 0, 4, 1.0, 112) for i in range(2) for t in tasks]
    host = host_batch(processor, examples)
    host["labels"] = train_teacher.answer_labels(host, examples, processor.tokenizer)
    return model, processor, host


def test_answer_window_loss_is_the_models_loss():
    model, processor, host = one_layer_teacher2_batch(("grid_count", "grid_glyph"))
    inputs = device_batch(host, "cpu", processor)
    with torch.no_grad():
        ref = model(**inputs).loss
        labels = inputs.pop("labels")
        out = model(**inputs, logits_to_keep=train_teacher.answer_window(labels))
    loss, per_row, right = train_teacher.answer_loss(out.logits, labels)
    torch.testing.assert_close(loss, ref)
    assert per_row.shape == right.shape == (4,) and out.logits.shape[1] < labels.shape[1]


def test_token_colors_and_glyph_targets_read_the_pixels():
    s = synthetic.generate("grid_position", 0, seed=0)  # the red square in the cell of the answer
    colors = train_teacher.token_colors(torch.from_numpy(s.media)[None, None]).reshape(8, 8)
    red = 1 + list(synthetic.COLORS).index("red")
    rows, cols = (colors == red).nonzero(as_tuple=True)
    cell = synthetic.POSITIONS.index(s.answer)
    assert len(rows) and all(
        3 * int(r * 3 // 8) + int(c * 3 // 8) == cell for r, c in zip(rows, cols, strict=True)
    )
    g = synthetic.generate("grid_glyph", 0, seed=0, frames=8)
    colors = train_teacher.token_colors(torch.from_numpy(g.media)[None])
    targets = train_teacher.GridProbes._glyph_targets(colors, [("grid_glyph", g.answer)])
    letter = list(synthetic.GLYPHS).index(g.answer)
    assert (targets == letter).any() and set(targets.unique().tolist()) <= {letter, -100}
    assert train_teacher.GridProbes._glyph_targets(colors, [("grid_count", "3")]) is None


def test_lookup_targets_are_the_object_the_question_names():
    """grid_color: the target tokens are those of the asked square (every one overlaps the asked cell, never
    empty); other tasks: none."""
    for i in range(12):
        s = synthetic.generate("grid_color", i, seed=4)
        colors = train_teacher.token_colors(torch.from_numpy(s.media)[None, None])
        target = train_teacher.GridProbes.lookup_targets(colors, [("grid_color", s.answer)])[0].view(8, 8)
        asked = max((p for p in synthetic.POSITIONS if f"at the {p}?" in s.question), key=len)
        cell_row, cell_col = divmod(synthetic.POSITIONS.index(asked), 3)
        edges = [224 * k / 3 for k in range(4)]
        assert target.any(), (i, s.question)
        for r, c in target.nonzero().tolist():  # the 28-px token overlaps the cell
            assert 28 * r < edges[cell_row + 1] and 28 * (r + 1) > edges[cell_row], (i, asked, r)
            assert 28 * c < edges[cell_col + 1] and 28 * (c + 1) > edges[cell_col], (i, asked, c)
    order = synthetic.generate("grid_order", 0, seed=4, frames=16)
    colors = train_teacher.token_colors(torch.from_numpy(order.media)[None])
    assert not train_teacher.GridProbes.lookup_targets(colors, [("grid_order", order.answer)]).any()
    none = train_teacher.GridProbes.lookup_targets(colors, [("grid_count", "3")])
    assert not none.any()


def test_lookup_targets_of_grid_glyph_are_the_letter_when_asked_for():
    """`--lookup-tasks grid_color,grid_glyph`: a glyph row's targets are the letter's tokens (those the glyph
    probe labels), in its one frame pair; without grid_glyph in the tasks, none."""
    both = ("grid_color", "grid_glyph")
    assert set(both) < set(train_teacher.GridProbes.LOOKUP_TASKS)
    for i in range(4):
        g = synthetic.generate("grid_glyph", i, seed=1, frames=16)
        colors = train_teacher.token_colors(torch.from_numpy(g.media)[None])
        target = train_teacher.GridProbes.lookup_targets(colors, [("grid_glyph", g.answer)], both)[0]
        letter = train_teacher.GridProbes._glyph_targets(colors, [("grid_glyph", g.answer)]) >= 0
        assert target.any() and torch.equal(target, letter), i
        assert len(target.view(8, 64).any(dim=1).nonzero()) == 1  # one frame pair (8 pairs of 8x8 tokens)
        assert not train_teacher.GridProbes.lookup_targets(colors, [("grid_glyph", g.answer)]).any()


def test_lookup_targets_of_grid_order_are_the_first_square_in_its_one_pair():
    """grid_order's targets are the tokens of the answer's square (the one that appears first): all in one frame
    pair, earlier than any token of the other named square."""
    for i in range(6):
        s = synthetic.generate("grid_order", i, seed=4, frames=16)
        colors = train_teacher.token_colors(torch.from_numpy(s.media)[None])
        row = [("grid_order", s.answer)]
        target = train_teacher.GridProbes.lookup_targets(colors, row, ("grid_order",))[0].view(8, 64)
        (other,) = [c for c in s.choices if c != s.answer]
        later = train_teacher.GridProbes.lookup_targets(colors, [("grid_order", other)], ("grid_order",))[0]
        pairs = target.any(dim=1).nonzero().flatten()
        assert len(pairs) == 1, i
        assert pairs[0] < later.view(8, 64).any(dim=1).nonzero().min(), i
        assert not train_teacher.GridProbes.lookup_targets(colors, row).any()  # grid_color only: none


def test_running_count_targets_end_at_the_answer_and_only_on_count_rows():
    """`--count-probe on`: on a grid_count row, every token of frame pair p holds the red squares of pairs 0..p:
    non-decreasing, one value per pair, the answer at the last pair; -100 on the other rows of the batch."""
    for i in range(6):
        count = synthetic.generate("grid_count", i, seed=3, frames=16)
        other = synthetic.generate("grid_motion", i, seed=3, frames=16)
        frames = torch.from_numpy(np.stack([count.media, other.media]))
        rows = [("grid_count", count.answer), ("grid_motion", other.answer)]
        target = train_teacher.GridProbes.running_count_targets(train_teacher.token_colors(frames), rows, 8)
        target = target.view(2, 8, 64)
        assert (target[0] == target[0, :, :1]).all()  # one value per frame pair
        per_pair = target[0, :, 0]
        assert (per_pair.diff() >= 0).all() and (per_pair.diff() <= 1).all(), per_pair
        assert per_pair[-1].item() == int(count.answer), (i, per_pair, count.answer)
        assert (target[1] == -100).all()
    assert train_teacher.GridProbes.running_count_targets(torch.zeros(2 * 8 * 64), rows[1:] * 2, 8) is None


def test_count_probe_adds_a_finite_loss_on_a_count_batch():
    """The probe's loss runs on a real video batch of the teacher-2 model (middle layer's hidden states)."""
    model, processor = build_tiny_teacher(
        "qwen2_vl", seed=2, size="teacher2", num_hidden_layers=2, vision_config={"depth": 1}
    )
    examples = [train_teacher.example("grid_count", i, 0, 8, 1.0, 112) for i in range(2)]
    inputs = device_batch(host_batch(processor, examples), "cpu", processor, keep_frames=True)
    frames = inputs.pop(train_teacher.FRAMES_KEY)
    hidden = model.config.text_config.hidden_size
    probes = train_teacher.GridProbes(hidden, 4, 4, 1, count_probe=True)
    probes.attach(model)
    out = model(**inputs, output_hidden_states=True)
    loss = probes.loss(inputs, out.hidden_states, frames, [("grid_count", ex.answer) for ex in examples])
    assert torch.isfinite(loss) and "count" in probes.parts
    assert torch.isfinite(probes.parts["count"][0]) and probes.parts["count"][0] > 0


def test_unknown_lookup_task_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.parse_args(
            ["--preset", "teacher2", "--out", "x", "--lookup-tasks", "grid_color,grid_count"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--lookup-tasks: grid_count cannot be supervised" in err and "grid_glyph" in err
    args = train_teacher.parse_args(
        ["--preset", "teacher2", "--out", "x", "--lookup-tasks", "grid_glyph,grid_color"]
    )
    assert args.lookup_tasks == ("grid_glyph", "grid_color")
    assert train_teacher.parse_args(["--preset", "teacher2", "--out", "x"]).lookup_tasks == (
        "grid_color",
        "grid_glyph",
        "grid_order",
    )


def _lookup_pass(tasks: list[str], frames: int):
    """A 2-layer teacher-2 model's forward on samples of `tasks` (112 px), keeping layer 1's rotated queries and
    keys as training does: (model, rows, inputs, labels, frames, qk)."""
    model, processor = build_tiny_teacher(
        "qwen2_vl", seed=2, size="teacher2", num_hidden_layers=2, vision_config={"depth": 1}
    )
    train_teacher.use_text_attention(model, train_teacher.TEXT_ATTENTION)
    examples = [train_teacher.example(t, i, 0, frames, 1.0, 112) for i, t in enumerate(tasks)]
    rows = [(t, ex.answer) for t, ex in zip(tasks, examples, strict=True)]
    host = host_batch(processor, examples)
    labels = train_teacher.answer_labels(host, examples, processor.tokenizer)
    inputs = device_batch(host, "cpu", processor, keep_frames=True)
    pixels = inputs.pop(train_teacher.FRAMES_KEY)
    train_teacher.LOOKUP["layer"] = 1
    try:
        with torch.no_grad():
            model(**inputs)
        qk, train_teacher.LOOKUP["qk"] = train_teacher.LOOKUP["qk"], None
    finally:
        train_teacher.LOOKUP["layer"] = None
    return model, rows, inputs, labels, pixels, qk


def test_lookup_loss_is_the_heads_own_attention_on_the_target():
    """`lookup_loss` from the kept (rotated) queries and keys = -log of the weight that query head 0 of the layer
    really gives the target tokens, among the media tokens (eager attention's own probabilities); with
    `lookup_spread`, -mean log weight of each target token."""
    model, rows, inputs, labels, frames, qk = _lookup_pass(["grid_color"] * 3, frames=1)
    probes = train_teacher.GridProbes(model.config.text_config.hidden_size, 4, 4, 1)
    loss = probes.lookup_loss(qk, inputs, labels, frames, rows)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[1][:, 0]  # (B, query, key) of head 0
    first = (labels != -100).int().argmax(dim=1) - 1
    media = inputs["mm_token_type_ids"] > 0
    target = train_teacher.GridProbes.lookup_targets(train_teacher.token_colors(frames), rows)
    ref, ref_spread = [], []
    for b in range(3):
        weights = attn[b, first[b]][media[b]]
        weights = weights / weights.sum()  # among the media tokens
        ref.append(-torch.log(weights[target[b]].sum()))
        ref_spread.append(-torch.log(weights[target[b]]).mean())
    assert all(target.any(dim=1)) and qk[0].shape[2] == labels.shape[1]
    torch.testing.assert_close(loss, torch.stack(ref).mean(), atol=1e-4, rtol=1e-4)
    # --lookup-spread on: -mean log weight of each target token (never below the sum's -log, equal for one token)
    spread = train_teacher.GridProbes(model.config.text_config.hidden_size, 4, 4, 1, lookup_spread=True)
    loss_spread = spread.lookup_loss(qk, inputs, labels, frames, rows)
    torch.testing.assert_close(loss_spread, torch.stack(ref_spread).mean(), atol=1e-4, rtol=1e-4)
    assert loss_spread >= loss


# --- issue 15's NaN run: a decoder query row with no key to attend to, and the trainer's stop on a NaN ------------


class _FlashStyleAttention(torch.autograd.Function):
    """Attention whose backward rebuilds the probabilities from the forward's logsumexp, P = exp(s - lse), as
    flash-style kernels (cuDNN's on the H200 among them) do, with no special case for a row that may attend to no
    key (lse = -inf, so P = exp(-inf - -inf) = NaN there). Its forward gives such a row 0, as torch's SDPA does:
    the loss stays finite and only the gradients go NaN, as in the 2026-12-02 H200 run."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        out = torch.exp(s - lse).nan_to_num(0.0) @ v
        ctx.save_for_backward(q, k, v, mask, lse, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask, lse, out = ctx.saved_tensors
        p = torch.exp((q @ k.transpose(-1, -2) * ctx.scale).masked_fill(~mask, float("-inf")) - lse)
        ds = p * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
        return (
            ds @ k * ctx.scale,
            ds.transpose(-1, -2) @ q * ctx.scale,
            p.transpose(-1, -2) @ dout,
            None,
            None,
        )


def _flash_style_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    lq, lk = query.shape[2], key.shape[2]
    mask = attention_mask if attention_mask is not None else torch.ones(lq, lk, dtype=torch.bool).tril()
    out = _FlashStyleAttention.apply(query, key, value, mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def _teacher2_step(model, inputs, labels):
    """One forward/backward of the answer loss: (loss, answer logits, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False, logits_to_keep=train_teacher.answer_window(labels))
    loss = train_teacher.answer_loss(out.logits, labels)[0]
    loss.backward()
    return (
        loss.detach(),
        out.logits.detach(),
        {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
    )


def test_teacher2_decoder_mask_leaves_no_row_without_a_key_and_changes_nothing_else():
    """Left padding gives every pad position a query row with no key; with the plain mask a flash-style backward
    turns it into NaN gradients (the H200 run). The trainer's mask lets those rows attend to every key: finite
    gradients with the same kernel, and the same loss, logits and gradients as torch's SDPA on the plain mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    args = train_teacher.parse_args(["--out", "x", *SMALL_T2])
    model, processor = build_tiny_teacher(
        "qwen2_vl", seed=0, size="teacher2", **train_teacher.model_config(args)
    )
    model.train()
    batches, _ = train_teacher.make_batches(0, args, processor, [8], list(synthetic.GRID_TASKS), 1.0)
    host = dict(batches[1][0])  # the video batch
    labels = host.pop("labels")
    inputs = device_batch(host, "cpu", processor)
    assert (inputs["attention_mask"] == 0).any()  # left padding: pad positions exist

    masks = []
    try:
        AttentionInterface.register("test_flash_style_plain", _flash_style_attention)
        AttentionMaskInterface.register("test_flash_style_plain", sdpa_mask)
        train_teacher.use_text_attention(model, "test_flash_style_plain")
        _, _, grads = _teacher2_step(model, inputs, labels)
        assert not all(torch.isfinite(g).all() for g in grads.values())  # the failure, reproduced on the CPU

        train_teacher.use_text_attention(model, train_teacher.TEXT_ATTENTION)

        def spy(module, query, key, value, attention_mask, **kw):
            masks.append(attention_mask)
            return _flash_style_attention(module, query, key, value, attention_mask, **kw)

        AttentionInterface.register(train_teacher.TEXT_ATTENTION, spy)
        loss, logits, grads = _teacher2_step(model, inputs, labels)
    finally:
        train_teacher.use_text_attention(model, train_teacher.TEXT_ATTENTION)  # restores its sdpa kernel
        for interface in (AttentionInterface, AttentionMaskInterface):
            interface._global_mapping.pop("test_flash_style_plain", None)
    assert masks and all(m.any(dim=-1).all() for m in masks)  # every query row attends to some key
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())

    train_teacher.use_text_attention(model, "sdpa")  # torch's kernel on the plain mask: the reference
    assert "test_flash_style_plain" not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    ref_loss, ref_logits, ref_grads = _teacher2_step(model, inputs, labels)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(
            g, ref_grads[name], atol=1e-5, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_teacher2_stops_at_the_first_nonfinite_loss(tmp_path, monkeypatch, capsys):
    """A NaN answer loss at step 2 ends the run with one error line naming the step and the term, exit code 3,
    and nothing written."""
    real, calls = train_teacher.answer_loss, []

    def answer_loss(logits, labels):
        calls.append(1)
        loss, per_row, right = real(logits, labels)
        return (loss * float("nan") if len(calls) == 3 else loss), per_row, right  # step 2's image batch

    monkeypatch.setattr(train_teacher, "answer_loss", answer_loss)
    out = tmp_path / "teacher2"
    assert train_teacher.main(["--out", str(out), *SMALL_T2, "--steps", "5", "--eval-count", "1"]) == 3
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1 and "non-finite answer loss (image batch) and gradient norm at step 2 " in lines[0]
    assert "gradient norm" in lines[0] and "try:" in lines[0]
    assert len(calls) == 6 and not out.exists()  # stopped after step 3 (checked one step late), saved nothing


def test_nonfinite_error_names_the_term_and_what_to_try():
    args = train_teacher.parse_args(["--out", "x", "--preset", "teacher2"])
    finite = {"answer loss (video batch)": 2.5, "time probe loss": 1.2, "gradient norm": 3.0}
    assert train_teacher.nonfinite_error(4, finite, args, 8) is None
    line = train_teacher.nonfinite_error(4, {**finite, "gradient norm": float("nan")}, args, 8)
    assert line.startswith("ERROR: non-finite gradient norm at step 5 (lr 5.00e-05, 8 frames;")
    assert "every loss was finite" in line and "--amp off" in line and "\n" not in line
    line = train_teacher.nonfinite_error(0, {**finite, "time probe loss": float("inf")}, args, 8)
    assert "non-finite time probe loss at step 1" in line and "lower --lr (now 0.001" in line


def test_time_budget_is_planned_again_on_the_full_frame_mix(tmp_path, monkeypatch, capsys):
    """Steps after the frames ramp are slower than steps 10-50 (longer videos): the plan made at step 50 would run
    past the budget (teacher 2 of 2026-12-02: 1,935 steps planned, stopped at 1,589 with the lr not annealed), so
    it is made again on the full mix, and the run then ends at its planned step, not at the budget. A fake clock
    (0.1 s per step up to step 50, 0.3 s after) makes the arithmetic exact."""
    clock = [0.0]
    monkeypatch.setattr(train_teacher, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(train_teacher, "REPLAN_STEPS", 10)
    real, calls = train_teacher.train_step, []

    def train_step(*args, **kwargs):
        clock[0] += 0.1 if len(calls) < 50 else 0.3
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_teacher, "train_step", train_step)
    out = tmp_path / "teacher2"
    argv = ["--out", str(out), *SMALL_T2, "--frames-ramp", "1", "--steps", "1000", "--time-budget", "30",
            "--log-every", "1000", "--eval-count", "1"]  # fmt: skip
    assert train_teacher.main(argv) == 0
    log = capsys.readouterr().out
    # step 50: 40 steps of 0.1 s measured, 25 s left -> 50 + 0.97 * 25 / 0.1 = 292 steps (would need 77 s)
    assert "time budget 30 s at 0.100 s/step: 292 steps" in log
    # step 60: steps 50-60 at 0.3 s, 22 s left -> 60 + int(0.97 * 22 / 0.3) = 131 steps, done at 29.3 s
    assert "time budget re-planned on steps 50-60 (the full frame mix) at 0.300 s/step: 131 steps" in log
    report = json.loads((out / "train_teacher.json").read_text())
    assert report["steps"] == 131 and not report["stopped_at_budget"] and len(calls) == 131
    assert "time budget spent" not in log


def test_task_weights_give_each_task_its_share_and_unique_samples():
    """Weight-1 tasks keep plain round-robin; a weighted task takes its share of the stream, never repeating a
    sample index; a bad spec is one SystemExit naming what to write."""
    tasks = ["grid_motion", "grid_count", "grid_order"]
    weights = train_teacher.parse_task_weights("grid_count=3", tasks)
    assert weights == {"grid_motion": 1, "grid_count": 3, "grid_order": 1}
    plain = [train_teacher.stream_slot(i, tasks, dict.fromkeys(tasks, 1)) for i in range(6)]
    assert plain == [(tasks[i % 3], i // 3) for i in range(6)]
    seen: dict[str, list[int]] = {t: [] for t in tasks}
    for i in range(500):
        task, index = train_teacher.stream_slot(i, tasks, weights)
        seen[task].append(index)
    assert len(seen["grid_count"]) == 300 and len(seen["grid_motion"]) == 100
    assert all(sorted(v) == list(range(len(v))) for v in seen.values())  # 0..n-1, each once
    stream = [train_teacher.stream_slot(i, tasks, weights)[0] for i in range(10)]
    # spread, not grouped: any 5 consecutive slots hold every task
    assert all(set(stream[i : i + 5]) == set(tasks) for i in range(6))
    assert stream[:5] == ["grid_count", "grid_motion", "grid_count", "grid_order", "grid_count"]
    for bad in ("grid_count=0", "grid_nope=2", "grid_count=x"):
        with pytest.raises(SystemExit, match="--task-weights .*TASK=N"):
            train_teacher.parse_task_weights(bad, tasks)


def test_per_task_lookup_heads_read_each_rows_own_head():
    """`--lookup-heads per_task`: a grid_glyph row's look-up is query head 1's attention on its letter, a
    grid_order row's is head 2's on the square that appears first (eager attention's own probabilities; 6 query
    heads share 2 kv heads)."""
    tasks = ["grid_glyph", "grid_order", "grid_order"]
    model, rows, inputs, labels, frames, qk = _lookup_pass(tasks, frames=4)
    assert qk[0].shape[1] == 6 and qk[1].shape[1] == 2
    lookup = train_teacher.GridProbes.LOOKUP_TASKS
    probes = train_teacher.GridProbes(model.config.text_config.hidden_size, 4, 4, 1, lookup_tasks=lookup,
                                      lookup_heads="per_task")  # fmt: skip
    loss = probes.lookup_loss(qk, inputs, labels, frames, rows)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[1]  # (B, heads, query, key)
    first = (labels != -100).int().argmax(dim=1) - 1
    media = inputs["mm_token_type_ids"] > 0
    target = train_teacher.GridProbes.lookup_targets(train_teacher.token_colors(frames), rows, lookup)
    ref = []
    for b, task in enumerate(tasks):
        weights = attn[b, lookup.index(task), first[b]][media[b]]
        weights = weights / weights.sum()
        ref.append(-torch.log(weights[target[b]].sum()))
    assert all(target.any(dim=1))
    torch.testing.assert_close(loss, torch.stack(ref).mean(), atol=1e-4, rtol=1e-4)
    shared = train_teacher.GridProbes(model.config.text_config.hidden_size, 4, 4, 1, lookup_tasks=lookup)
    assert not torch.allclose(shared.lookup_loss(qk, inputs, labels, frames, rows), loss)


def test_hard_negatives_change_training_samples_only_and_only_some():
    """`--color-mirror P` / `--order-early P`: about P of the training grid_color / grid_order samples use the
    hard layout; 0 leaves every sample as `synthetic.generate` makes it (the held-out report's samples), and other
    tasks never change."""
    changed = 0
    for i in range(40):
        plain = train_teacher.example("grid_color", i, 0, 1, size=224)
        assert np.array_equal(np.asarray(plain.media), synthetic.generate("grid_color", i, seed=0).media)
        mixed = train_teacher.example("grid_color", i, 0, 1, size=224, color_mirror=0.5)
        changed += not np.array_equal(np.asarray(mixed.media), np.asarray(plain.media))
    assert 5 <= changed <= 30  # half are mirrored; a mirrored one whose layout was already so stays equal
    other = train_teacher.example("grid_position", 1, 0, 1, size=224, color_mirror=1.0, order_early=1.0)
    assert np.array_equal(np.asarray(other.media), synthetic.generate("grid_position", 1, seed=0).media)
    # --order-early: the same for grid_order's early distractor
    early = sum(
        not np.array_equal(
            train_teacher.example("grid_order", i, 0, 16, size=224, order_early=0.5).media,
            synthetic.generate("grid_order", i, seed=0, frames=16).media,
        )
        for i in range(20)
    )
    assert 2 <= early <= 15


def test_asked_cells_are_the_cell_the_question_names():
    """`GridProbes.asked_cells` (the cell probe's target) from the look-up targets' tokens = the question's cell,
    at teacher 2's 224 px (8x8 tokens) and the CPU runs' 112 px (4x4)."""
    for size in (224, 112):
        for i in range(60):
            s = synthetic.generate("grid_color", i, seed=5, size=size)
            colors = train_teacher.token_colors(torch.from_numpy(s.media)[None, None])
            target = train_teacher.GridProbes.lookup_targets(colors, [("grid_color", s.answer)])
            grid = torch.tensor([[1, size // 14, size // 14]])
            asked = max((p for p in synthetic.POSITIONS if f"at the {p}?" in s.question), key=len)
            assert train_teacher.GridProbes.asked_cells(target, grid).tolist() == [
                synthetic.POSITIONS.index(asked)
            ], (size, i, s.question)
    none = torch.zeros(1, 16, dtype=torch.bool)
    assert train_teacher.GridProbes.asked_cells(none, torch.tensor([[1, 8, 8]])).tolist() == [-100]


def test_cell_probe_adds_its_loss_to_the_lookup_on_colour_rows_only():
    """`--cell-probe on`: the look-up loss gains the probe's cross-entropy (the asked cell, read at the answer
    position of the layer's input); off, or without hidden states, the loss is the look-up alone."""
    model, rows, inputs, labels, frames, qk = _lookup_pass(
        ["grid_color", "grid_position", "grid_color"], frames=1
    )
    hidden_size = model.config.text_config.hidden_size
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1]
    plain = train_teacher.GridProbes(hidden_size, 4, 4, 1).lookup_loss(
        qk, inputs, labels, frames, rows, hidden=hidden
    )
    probes = train_teacher.GridProbes(hidden_size, 4, 4, 1, cell_probe=True)
    loss = probes.lookup_loss(qk, inputs, labels, frames, rows, hidden=hidden)
    cell = probes.parts["cell"][0]
    assert torch.isfinite(cell) and cell > 0
    torch.testing.assert_close(loss, plain + cell)
    first = (labels != -100).int().argmax(dim=1) - 1
    target = train_teacher.GridProbes.lookup_targets(train_teacher.token_colors(frames), rows)
    cells = train_teacher.GridProbes.asked_cells(target, inputs["image_grid_thw"])
    logits = probes.cell(hidden[[0, 2], first[[0, 2]]])
    torch.testing.assert_close(
        cell, torch.nn.functional.cross_entropy(logits, cells[[0, 2]]), atol=1e-5, rtol=1e-5
    )
    assert cells[1] == -100  # grid_position has no look-up target
    torch.testing.assert_close(probes.lookup_loss(qk, inputs, labels, frames, rows), plain)


def test_mrope_section_is_checked_and_reaches_the_config(capsys):
    """`--mrope-section T,H,W` must add up to head_dim / 2 (one red line, exit 2, otherwise); a good one and
    `--rope-theta` reach the text config's rope parameters."""
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.parse_args(["--preset", "teacher2", "--out", "x", "--mrope-section", "12,4,8"])
    assert exit_info.value.code == 2
    assert "adding up to head_dim / 2 = 32" in capsys.readouterr().err
    args = train_teacher.parse_args(
        ["--preset", "teacher2", "--out", "x", "--mrope-section", "12,4,16", "--rope-theta", "1000"]
    )
    rope = train_teacher.model_config(args)["rope_parameters"]
    assert rope == {"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [12, 4, 16]}
    default = train_teacher.parse_args(["--preset", "teacher2", "--out", "x"])
    assert "rope_parameters" not in train_teacher.model_config(default)  # tiny_config's 1e6 and 2:3:3


def test_init_from_loads_a_saved_teacher_and_refuses_other_shapes(tmp_path):
    """`--init-from DIR`: the saved weights (safetensors) replace the random ones; a model of other shapes is one
    clear line, not a traceback."""
    saved, _ = build_tiny_teacher(
        "qwen2_vl", seed=1, size="teacher2", num_hidden_layers=2, vision_config={"depth": 1}
    )
    saved.save_pretrained(tmp_path / "t")
    fresh, _ = build_tiny_teacher(
        "qwen2_vl", seed=2, size="teacher2", num_hidden_layers=2, vision_config={"depth": 1}
    )
    train_teacher.load_weights(fresh, tmp_path / "t")
    for (name, a), b in zip(saved.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    other, _ = build_tiny_teacher(
        "qwen2_vl", seed=2, size="teacher2", num_hidden_layers=3, vision_config={"depth": 1}
    )
    with pytest.raises(SystemExit, match="do not fit the model these flags build"):
        train_teacher.load_weights(other, tmp_path / "t")
    with pytest.raises(SystemExit, match="no model.safetensors"):
        train_teacher.load_weights(other, tmp_path)


def test_host_positions_are_the_models_own_and_leave_the_loss_unchanged():
    """`--host-positions on` hands the forward the M-RoPE ids computed from the host batch: the loss of a video
    batch of two tasks (left padded: their prompts differ in length) is the loss without them, bit for bit."""
    model, processor, host = one_layer_teacher2_batch(("grid_count", "grid_order"))
    assert (host["attention_mask"] == 0).any()  # padded rows, whose positions skip the pad
    positions = train_teacher.host_positions(model, host)
    assert positions.shape == (3, *host["input_ids"].shape)
    # height and width differ on the video tokens: real M-RoPE ids, not a 1D ramp
    assert (positions[1] != positions[2]).any()
    with torch.no_grad():
        own = model(**device_batch(host, "cpu", processor)).loss
        given = model(**device_batch(dict(host, position_ids=positions), "cpu", processor)).loss
        wrong = model(**device_batch(dict(host, position_ids=positions.flip(0)), "cpu", processor)).loss
    assert torch.equal(own, given)
    assert not torch.equal(own, wrong)  # the forward does read what it is given
    args = train_teacher.parse_args(["--preset", "teacher2", "--out", "x", "--size", "112"])
    train_teacher.check_host_positions(
        model, processor, ["grid_color", "grid_count"], args, torch.device("cpu")
    )
