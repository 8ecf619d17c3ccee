"""`linmu eval` and the lmms-eval model `linmu`: end to end on the offline synthetic tasks (CPU, tiny models).

One session fixture converts the tiny Qwen2-VL, copies `evals/` (YAMLs + utils.py) into a temp dir with small
generated datasets, and runs `linmu eval` once with the teacher; the tests read what it printed and wrote, and
check it against lmms-eval's raw results, a direct greedy-generate loop and the plain `lmms-eval` CLI.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from linmu_cli.cli import app  # noqa: E402
from linmu_cli.conversion import convert  # noqa: E402
from linmu_cli.data import synthetic  # noqa: E402
from linmu_cli.evaluation import tasks as eval_tasks  # noqa: E402
from linmu_cli.evaluation.answers import normalize_answer  # noqa: E402
from linmu_cli.media import frame_indices, read_video  # noqa: E402

REPO_EVALS = Path(__file__).resolve().parents[2] / "evals"
COUNT = 8  # samples per generated dataset in tests
LIMIT = 6
TASKS = "linmu_image_color,linmu_video_order,linmu_video_order_mc"  # image + video, generation + choice

runner = CliRunner()


def linmu(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.output


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Tiny student + teacher, a private evals/ copy with small datasets, an isolated datasets cache."""
    root = tmp_path_factory.mktemp("eval")
    # text window 32: every test prompt is longer, so the decode cache must not depend on prompt length
    convert("tiny-qwen2-vl", root / "out", save_teacher=root / "teacher", mate={"text_window": 32})
    evals = root / "evals"
    shutil.copytree(REPO_EVALS, evals, ignore=shutil.ignore_patterns("data", "__pycache__"))
    for name in eval_tasks.DATASETS:
        eval_tasks.generate_dataset(name, evals / "data", count=COUNT)  # the default (evaluation) seed
    mp = pytest.MonkeyPatch()
    mp.setenv("LINMU_EVALS_DIR", str(evals))
    mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(root / "datasets_cache"))
    yield {"root": root, "out": root / "out", "teacher": root / "teacher", "evals": evals}
    mp.undo()


@pytest.fixture(scope="session")
def run(env):
    """`linmu eval out --tasks ... --teacher teacher --limit 6` through the CLI: (exit code, text, output dir)."""
    output = env["root"] / "results"
    code, text = linmu("eval", env["out"], "--tasks", TASKS, "--teacher", env["teacher"], "--limit", LIMIT,
                       "--output", output)  # fmt: skip
    return code, text, output


def _raw(output: Path, role: str) -> dict:
    return json.loads((output / role / "results.json").read_text())


def _metric(raw: dict, task: str, metric: str) -> float:
    return raw["results"][task][f"{metric},none"]


def _samples(output: Path, role: str, task: str) -> list[dict]:
    lines = (output / role / f"samples_{task}.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])


# --- registration, data, media -----------------------------------------------------------------------------


def test_lmms_eval_resolves_linmu_through_the_entry_point():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model, get_model_manifest

    from linmu_cli.evaluation.plugin import LinMU

    assert "linmu" in {ep.name for ep in entry_points(group="lmms_eval.models")}
    assert get_model_manifest("linmu").simple_class_path == "linmu_cli.evaluation.plugin.LinMU"
    assert get_model("linmu") is LinMU


def test_generator_is_seeded_and_matches_the_synthetic_tasks(tmp_path):
    a = eval_tasks.generate_dataset("video_when", tmp_path / "a", seed=3, count=3, frames=8)
    b = eval_tasks.generate_dataset("video_when", tmp_path / "b", seed=3, count=3, frames=8)
    c = eval_tasks.generate_dataset("video_when", tmp_path / "c", seed=4, count=3, frames=8)
    rows = [json.loads(line) for line in (a / "test.jsonl").read_text().splitlines()]
    assert (a / "test.jsonl").read_text() == (b / "test.jsonl").read_text()
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in ("00000.mp4", "00002.mp4"))
    assert (a / "00000.mp4").read_bytes() != (c / "00000.mp4").read_bytes()
    for i, row in enumerate(rows):
        sample = synthetic.generate("video_when", i, seed=3, frames=8)
        assert (row["question"], row["answer"], row["choices"]) == (
            sample.question,
            sample.answer,
            sample.choices,
        )
        assert (
            row["choices"][row["answer_index"]] == row["answer"] and row["media"] == f"video_when/{i:05d}.mp4"
        )
        clip = read_video(tmp_path / "a" / row["media"], max_num_frames=64)
        assert clip.frames.shape == (8, 56, 56, 3) and clip.frames.dtype == np.uint8
        assert clip.fps == pytest.approx(2.0) and clip.total_frames == 8
        # mp4 is lossy (yuv420p): the painted flash survives, the noise background roughly
        assert np.abs(clip.frames.astype(int) - sample.media).mean() < 20
    meta = json.loads((a / "meta.json").read_text())
    assert (meta["seed"], meta["count"], meta["frames"], meta["size"]) == (3, 3, 8, 56)
    img = eval_tasks.generate_dataset("image_color", tmp_path / "a", seed=3, count=1)
    from PIL import Image

    assert np.array_equal(
        np.asarray(Image.open(img / "00000.png")), synthetic.generate("image_color", 0, seed=3).media
    )


def test_generator_cli_and_bad_values(tmp_path, capsys):
    assert eval_tasks.main(["image_color", "--evals-dir", str(tmp_path), "--count", "2"]) == 0
    assert eval_tasks.dataset_meta(tmp_path, "image_color")["count"] == 2
    assert eval_tasks.main(["image_color", "--evals-dir", str(tmp_path)]) == 0  # exists: kept
    assert eval_tasks.dataset_meta(tmp_path, "image_color")["count"] == 2
    assert eval_tasks.main(["video_count", "--evals-dir", str(tmp_path), "--frames", "7"]) == 2
    assert eval_tasks.main(["nope", "--evals-dir", str(tmp_path)]) == 2
    assert "frames" in capsys.readouterr().err


def test_frame_sampling_and_no_global_decord_bridge(env, monkeypatch):
    assert frame_indices(16, 2.0, 64).tolist() == list(range(16))
    assert frame_indices(64, 2.0, 16).tolist() == np.linspace(0, 63, 16).round().astype(int).tolist()
    assert len(frame_indices(64, 2.0, 64, fps=1.0)) == 32  # 32 s at 1 frame per second
    assert len(frame_indices(15, 2.0, 64)) == 14 and len(frame_indices(1, 2.0, 64)) == 2  # even, >= 2
    import decord

    video = env["evals"] / "data" / "long_video_count" / "00000.mp4"
    native = read_video(video, max_num_frames=16)
    decord.bridge.set_bridge("torch")  # what some lmms-eval models do at import
    try:
        monkeypatch.setattr(
            decord.bridge, "set_bridge", lambda *a: pytest.fail("linmu must not set the bridge")
        )
        under_torch = read_video(video, max_num_frames=16)
    finally:
        monkeypatch.undo()
        decord.bridge.set_bridge("native")
    assert isinstance(under_torch.frames, np.ndarray) and np.array_equal(native.frames, under_torch.frames)
    assert native.frames.shape == (16, 56, 56, 3)
    assert native.fps == pytest.approx(0.5)  # 16 of 64 frames spread over 32 s
    assert read_video(video, max_num_frames=4, max_pixels=56 * 28).frames.shape == (4, 39, 39, 3)  # scaled


# --- linmu eval end to end ---------------------------------------------------------------------------------


def test_linmu_eval_prints_teacher_student_delta_from_lmms_eval_results(run):
    code, text, output = run
    assert code == 0, text
    header = next(line for line in text.splitlines() if "task" in line and "metric" in line)
    assert re.search(r"teacher.*student.*delta", header)
    student, teacher = _raw(output, "student"), _raw(output, "teacher")
    summary = json.loads((output / "summary.json").read_text())
    for task, metric in (("linmu_image_color", "exact_match"), ("linmu_video_order", "exact_match"),
                         ("linmu_video_order_mc", "acc")):  # fmt: skip
        row = next(line for line in text.splitlines() if re.search(rf"\b{task}\b", line) and metric in line)
        cells = [c.strip() for c in re.split(r"[│┃|]", row) if c.strip()]
        s, t = _metric(student, task, metric), _metric(teacher, task, metric)
        assert cells == [task, metric, str(LIMIT), f"{t:.4f}", f"{s:.4f}", f"{s - t:+.4f}"]
        entry = next(r for r in summary["tasks"] if r["task"] == task)
        assert (entry["student"], entry["teacher"], entry["delta"], entry["n"]) == (s, t, s - t, LIMIT)
        assert len(_samples(output, "student", task)) == LIMIT
    models = summary["models"]
    assert models["student"]["linmu"] and models["student"]["model_class"].startswith("LinMU")
    assert models["student"]["cache_bytes_max"] > 0 and not models["teacher"]["linmu"]
    assert models["student"]["generate_requests"] == 2 * LIMIT
    assert models["student"]["loglikelihood_requests"] == LIMIT * 2  # two colors per ordering question
    assert summary["synthetic_data"]["linmu_video_order"]["frames"] == 16
    # random tiny weights: generation never hits the one-word answer, choosing does (and differs per model)
    s, t = _metric(student, "linmu_video_order_mc", "acc"), _metric(teacher, "linmu_video_order_mc", "acc")
    assert 0 < s < 1 and 0 < t < 1 and s != t


def _direct_inputs(processor, doc, evals: Path, suffix: str = ""):
    """A prompt built by hand, as a user of transformers would: chat template, decord frames, processor."""
    import decord
    from PIL import Image

    path = evals / "data" / doc["media"]
    content = [{"type": doc["kind"]}, {"type": "text", "text": doc["question"]}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False) + suffix  # fmt: skip
    if doc["kind"] == "image":
        return processor(text=[prompt], images=[Image.open(path).convert("RGB")], return_tensors="pt")
    reader = decord.VideoReader(str(path))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    meta = [{"total_num_frames": len(frames), "fps": reader.get_avg_fps()}]
    return processor(text=[prompt], videos=[frames], video_metadata=meta, return_tensors="pt")


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_plugin_equals_a_direct_greedy_loop(run, env, role):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, _, output = run
    model = AutoModelForImageTextToText.from_pretrained(
        env[{"teacher": "teacher", "student": "out"}[role]]
    ).eval()
    processor = AutoProcessor.from_pretrained(env["out"])
    raw = _raw(output, role)
    for task in ("linmu_image_color", "linmu_video_order"):
        samples = _samples(output, role, task)
        hits = []
        for sample in samples:
            inputs = _direct_inputs(processor, sample["doc"], env["evals"])
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            text = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            assert sample["filtered_resps"] == [text]
            hits.append(float(normalize_answer(text) == normalize_answer(sample["doc"]["answer"])))
        assert _metric(raw, task, "exact_match") == pytest.approx(np.mean(hits))
    # multiple choice: the choice with the lowest mean negative log-likelihood, computed by hand
    hits = []
    for sample in _samples(output, role, "linmu_video_order_mc"):
        losses = []
        for choice in sample["doc"]["choices"]:
            inputs = _direct_inputs(processor, sample["doc"], env["evals"], suffix=choice)
            n = len(processor.tokenizer(choice)["input_ids"])
            with torch.inference_mode():
                logits = model(**inputs, use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[-n - 1 : -1], -1).gather(-1, inputs["input_ids"][0, -n:, None])
            losses.append(-logp.mean().item())
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(losses, abs=1e-4)
        hits.append(float(int(np.argmin(losses)) == sample["doc"]["answer_index"]))
    assert _metric(raw, "linmu_video_order_mc", "acc") == pytest.approx(np.mean(hits))


def test_lmms_eval_cli_runs_the_linmu_model(run, env):
    _, _, output = run
    out_dir = env["root"] / "lmms_eval_cli"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "linmu", "--model_args", f"pretrained={env['out']}",
           "--tasks", "linmu_image_color,linmu_video_order_mc", "--include_path", str(env["evals"]),
           "--limit", str(LIMIT), "--output_path", str(out_dir)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "linmu_video_order_mc" in proc.stdout
    results = json.loads(next(out_dir.rglob("*_results.json")).read_text())
    student = _raw(output, "student")
    for task, metric in (("linmu_image_color", "exact_match"), ("linmu_video_order_mc", "acc")):
        assert _metric(results, task, metric) == _metric(student, task, metric)  # same model, data, requests
        assert results["n-samples"][task]["effective"] == LIMIT


def test_long_video_decodes_with_a_constant_size_cache(env):
    from linmu_cli.evaluation.plugin import LinMU

    lm = LinMU(pretrained=str(env["out"]), device="cpu", max_num_frames=64)
    sizes, tokens = [], []
    for name in ("video_count", "long_video_count"):
        inputs = lm._batch_inputs(["How many times does a red square flash?"],
                                  [[str(env["evals"] / "data" / name / "00000.mp4")]])  # fmt: skip
        tokens.append(inputs["input_ids"].shape[1])
        lm._generate(inputs, {"max_new_tokens": 4})
        sizes.append(lm.stats["cache_bytes_last"])
    assert (
        tokens[1] > tokens[0] + 40 and tokens[0] > 32
    )  # 64 frames vs 16 frames, both beyond the text window
    assert sizes[0] == sizes[1] > 0


def test_loglikelihood_batches_match_single_requests(env):
    from linmu_cli.evaluation.plugin import LinMU

    data = env["evals"] / "data"
    items = [("What color is the top left block?", "red", [str(data / "image_color" / "00000.png")]),
             ("How many times does a red square flash?", "12", [str(data / "video_count" / "00001.mp4")]),
             ("Which color flashed first?", "blue", [str(data / "long_video_order" / "00002.mp4")])]  # fmt: skip
    single = LinMU(pretrained=str(env["out"]), device="cpu")
    alone = [single._loglikelihood_batch([item])[0] for item in items]
    batched = single._loglikelihood_batch(items)
    assert [b[0] for b in batched] == pytest.approx([a[0] for a in alone], abs=1e-4)
    assert [b[1] for b in batched] == [a[1] for a in alone]


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "dataset"), [("mmmu_val", "lmms-lab-encoder/MMMU"), ("videomme", "lmms-eval/Video-MME")]
)
def test_dataset_missing_offline_is_one_clear_error(env, tmp_path, task, dataset):
    code, text = linmu("eval", env["out"], "--tasks", task, "--limit", 1, "--output", tmp_path / "o",
                       env={"HF_HUB_OFFLINE": "1", "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "empty")})  # fmt: skip
    assert code == 2, text
    assert f"task {task} needs the Hugging Face dataset {dataset}" in text
    assert (
        "HF_HUB_OFFLINE is set" in text
        and "datasets.load_dataset" in text
        and str(tmp_path / "empty") in text
    )
    assert "Traceback" not in text and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "linmu_video_cont"], "unknown task 'linmu_video_cont'; did you mean linmu_video_count"),
        (["--tasks", " , "], "give at least one lmms-eval task"),
        (["--tasks", "linmu_video_count", "--limit", "0"], "--limit must be at least 1"),
        (["--tasks", "linmu_video_count", "--model-args", "max_num_frames"], "expected KEY=VALUE"),
        (["--tasks", "linmu_video_count", "--model-args", "frames=8"], "unknown key(s) frames"),
        (["--tasks", "linmu_video_count", "--model-args", "pretrained=x"], "not pretrained="),
        (
            ["--tasks", "linmu_video_count", "--model-args", "batch_size=2", "--batch-size", "2"],
            "given twice",
        ),
        (["--tasks", "linmu_video_count", "--include-path", "/nonexistent/dir"], "not a directory"),
        (
            ["--tasks", "linmu_video_count", "--teacher", "/nonexistent/teacher"],
            "--teacher: /nonexistent/teacher: no such directory",
        ),
    ],
)
def test_argument_errors_are_one_line_exit_2(env, args, message):
    code, text = linmu("eval", env["out"], *args)
    assert code == 2, text
    assert message in text and "Traceback" not in text
    assert text.strip().startswith("error:")


def test_missing_model_and_missing_tasks(env, tmp_path):
    (tmp_path / "empty").mkdir()
    code, text = linmu("eval", tmp_path / "empty", "--tasks", "linmu_video_count")
    assert code == 2 and "MODEL:" in text and "no config.json" in text
    code, text = linmu("eval", env["out"])
    assert code == 2 and "--tasks" in text


def test_data_parallel_eval_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m linmu_cli eval` (lmms-eval's data-parallel launch, gloo on CPU): each rank
    scores half of the requests and rank 0 gathers them into the same scores as one process."""
    tasks = "linmu_video_when_mc,linmu_image_color"
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    summaries = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                  "--master_port", "29561"] if procs > 1 else [sys.executable]  # fmt: skip
        cmd = [*launch, "-m", "linmu_cli", "eval", "tiny-qwen2-vl", "--tasks", tasks, "--limit", "8",
               "--output", str(out), "--no-log-samples"]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("linmu eval: tiny-qwen2-vl") == 1  # one table, from rank 0
        summaries[procs] = json.loads((out / "summary.json").read_text())
    assert summaries[2]["models"]["student"]["processes"] == 2
    one = {r["task"]: (r["n"], r["student"]) for r in summaries[1]["tasks"]}
    two = {r["task"]: (r["n"], r["student"]) for r in summaries[2]["tasks"]}
    assert one == two and all(n == 8 for n, _ in one.values())
    # each rank really did only its share of the work
    assert (
        summaries[2]["models"]["student"]["loglikelihood_requests"] * 2
        == (summaries[1]["models"]["student"]["loglikelihood_requests"])
    )
