"""Issue 14 (eval half): --output is never overwritten silently, lmms-eval failures and missing media are one line
naming the task (exit 2, nothing written), model args are typed, lmms-eval's own --batch_size does not collide,
interleave_visuals places images at their placeholders, and the first run's data generation shows progress.

Tasks here are small lmms-eval YAMLs written into tmp dirs; two reuse lmms-eval's real task code (MME's scoring,
Video-MME's way of failing on a missing video)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from linmu_cli.cli import app  # noqa: E402
from linmu_cli.evaluation import tasks as eval_tasks  # noqa: E402

REPO_EVALS = Path(__file__).resolve().parents[2] / "evals"
runner = CliRunner()


def linmu(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def last_line_error(code: int, text: str, message: str) -> None:
    """Progress lines may come first; the run ends with one red line and exit code 2, no traceback."""
    assert code == 2, text
    assert "Traceback" not in text, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, text


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    """A private evals/ copy with 2-sample datasets (the default seed)."""
    root = tmp_path_factory.mktemp("evals")
    evals = root / "evals"
    shutil.copytree(REPO_EVALS, evals, ignore=shutil.ignore_patterns("data", "__pycache__"))
    for name in ("image_color", "video_when"):
        eval_tasks.generate_dataset(name, evals / "data", count=2)
    mp = pytest.MonkeyPatch()
    mp.setenv("LINMU_EVALS_DIR", str(evals))
    mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(root / "datasets_cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield evals
    mp.undo()


def _task_dir(tmp_path: Path, name: str, docs: list[dict], yaml_body: str, utils: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (d / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'docs.jsonl'}\n"
        "test_split: test\n" + yaml_body
    )
    (d / "utils.py").write_text(utils)
    return d


# --- 11 ---------------------------------------------------------------------------------------------------------


def test_output_with_an_earlier_evaluation_needs_force(evals, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    earlier = '{"tasks": [], "created": "earlier"}\n'
    (out / "summary.json").write_text(earlier)
    code, text = linmu("eval", "tiny-qwen2-vl", "--tasks", "linmu_image_color", "--limit", 1, "--output", out)
    last_line_error(code, text, "already holds an earlier evaluation (summary.json); pass --force")
    assert (
        out / "summary.json"
    ).read_text() == earlier and "loading" not in text  # untouched, refused at once
    code, text = linmu("eval", "tiny-qwen2-vl", "--tasks", "linmu_image_color", "--limit", 1, "--output", out,
                       "--force", "--batch-size", 2)  # fmt: skip
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["created"] != "earlier" and summary["tasks"][0]["task"] == "linmu_image_color"
    assert summary["model_args"] == {"batch_size": 2} and (out / "student" / "results.json").is_file()
    assert "Building contexts" not in text and "Postprocessing" not in text  # 29: no lmms-eval bars
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # written beside, renamed


# --- 12: typed model args, devices -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-args", "max_num_frames=abc"], "max_num_frames=abc: max_num_frames takes an integer"),
        (["--model-args", "fps=abc"], "fps=abc: fps takes a number"),
        (["--model-args", "batch_size=0"], "batch_size=0: must be at least 1"),
        (["--model-args", "interleave_visuals=perhaps"], "takes true or false"),
        (["--device", "banana"], "unknown device 'banana'"),
        (["--model-args", "device=cuda:7"], "device cuda:7"),
    ],
)
def test_bad_model_args_and_devices(evals, tmp_path, args, message):
    code, text = linmu(
        "eval", "tiny-qwen2-vl", "--tasks", "linmu_image_color", "--output", tmp_path / "o", *args
    )
    last_line_error(code, text, message)
    assert not (tmp_path / "o").exists()


# --- 19: missing media, checked before the model loads ----------------------------------------------------------

VIDEOMME_LIKE = """import os, sys

def doc_to_visual(doc):  # what lmms-eval's videomme_doc_to_visual does when a video is missing
    path = os.path.join(os.path.dirname(__file__), "videos", doc["videoID"] + ".mp4")
    if not os.path.exists(path):
        sys.exit(f"video path:{path} does not exist, please check")
    return [path]

def doc_to_text(doc):
    return doc["question"]

def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""
GENERATE = (
    "output_type: generate_until\ndoc_to_visual: !function utils.doc_to_visual\n"
    "doc_to_text: !function utils.doc_to_text\ndoc_to_target: answer\n"
    "generation_kwargs:\n  max_new_tokens: 2\n  do_sample: false\n"
)


def test_missing_video_is_named_before_the_model_loads(evals, tmp_path):
    docs = [{"videoID": f"v{i}", "question": "What happens?", "answer": "x"} for i in range(4)]
    d = _task_dir(tmp_path, "vmme_like", docs, GENERATE + "process_results: !function utils.process_results\n"
                  "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
                  VIDEOMME_LIKE)  # fmt: skip
    (d / "videos").mkdir()
    src = evals / "data" / "video_when" / "00000.mp4"
    for i in (0, 1, 3):  # v2 is missing
        shutil.copy(src, d / "videos" / f"v{i}.mp4")
    out = tmp_path / "o"
    code, text = linmu("eval", "tiny-qwen2-vl", "--tasks", "vmme_like", "--include-path", d, "--output", out)
    last_line_error(code, text, "task vmme_like: 1 of the media files its 4 doc(s) need")
    assert str(d / "videos" / "v2.mp4") in text and "loading" not in text and not out.exists()
    # with --limit 2 the missing video is not needed: the run goes through
    code, text = linmu("eval", "tiny-qwen2-vl", "--tasks", "vmme_like", "--include-path", d, "--output", out,
                       "--limit", 2)  # fmt: skip
    assert code == 0, text


# --- 12 / 20: lmms-eval's own assertion (MME with an odd --limit), a failing request --------------------------

MME_LIKE = """from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_process_results  # the real scoring

def doc_to_visual(doc):
    return [doc["image"]]

def doc_to_text(doc):
    return doc["question"]
"""


def test_lmms_eval_assertion_names_the_task_and_exits_2(evals, tmp_path):
    image = str(evals / "data" / "image_color" / "00000.png")
    docs = [{"question_id": f"q{i // 2}", "category": "color", "answer": "Yes" if i % 2 else "No",
             "question": "Is it red?", "image": image} for i in range(4)]  # fmt: skip
    body = GENERATE.replace("doc_to_target: answer\n", "doc_to_target: answer\n") + (
        "process_results: !function utils.mme_process_results\nmetric_list:\n"
        "  - metric: mme_perception_score\n    aggregation: !function utils.mme_aggregate_results\n"
        "    higher_is_better: true\n"
    )
    d = _task_dir(tmp_path, "mme_like", docs, body, MME_LIKE)
    out = tmp_path / "o"
    code, text = linmu("eval", "tiny-qwen2-vl", "--tasks", "mme_like", "--include-path", d, "--output", out,
                       "--limit", 3)  # fmt: skip
    last_line_error(code, text, "student tiny-qwen2-vl: task mme_like failed with AssertionError: MME only supports "
                    "pairwise evaluation")  # fmt: skip
    assert "even --limit" in text and not out.exists()
    code, text = linmu("eval", "tiny-qwen2-vl", "--tasks", "mme_like", "--include-path", d, "--output", out,
                       "--limit", 2)  # fmt: skip
    assert code == 0, text


def test_a_request_that_fails_names_its_task(evals, tmp_path):
    utils = VIDEOMME_LIKE.replace("return [path]", 'return [path.replace(".mp4", ".txt")]')
    docs = [{"videoID": "v0", "question": "?", "answer": "x"}]
    d = _task_dir(tmp_path, "bad_media", docs, GENERATE + "process_results: !function utils.process_results\n"
                  "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
                  utils)  # fmt: skip
    (d / "videos").mkdir()
    (d / "videos" / "v0.mp4").write_bytes(b"")
    (d / "videos" / "v0.txt").write_text("not media")
    code, text = linmu("eval", "tiny-qwen2-vl", "--tasks", "bad_media", "--include-path", d,
                       "--output", tmp_path / "o")  # fmt: skip
    last_line_error(code, text, "task bad_media failed with ValueError: linmu: cannot tell whether")
    assert not (tmp_path / "o").exists()


# --- 18: lmms-eval's --batch_size beside batch_size in --model_args --------------------------------------------


def test_lmms_eval_batch_size_does_not_collide():
    from linmu_cli.evaluation.plugin import LinMU

    # what `lmms-eval --model linmu --model_args ...,batch_size=4` does (its CLI adds its own batch_size=1)
    lm = LinMU.create_from_arg_string("pretrained=tiny-qwen2-vl,batch_size=4,device=cpu",
                                      {"batch_size": 1, "max_batch_size": None, "device": None})  # fmt: skip
    assert lm.batch_size == 4 and str(lm.device) == "cpu"
    lm = LinMU.create_from_arg_string(
        "pretrained=tiny-qwen2-vl,device=cpu", {"batch_size": "3", "device": None}
    )
    assert lm.batch_size == 3  # `--batch_size 3`


# --- 21: interleave_visuals --------------------------------------------------------------------------------------


def _images(n: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((56, 56, 3), 40 * (i + 1), np.uint8)) for i in range(n)]


def test_interleave_visuals_places_each_image_at_its_placeholder():
    from linmu_cli.evaluation.plugin import LinMU

    flat = LinMU(pretrained="tiny-qwen2-vl", device="cpu")
    inter = LinMU(pretrained="tiny-qwen2-vl", device="cpu", interleave_visuals=True)
    one, two = _images(2)
    mmmu = "Compare <image 2> with <image 1>. Which is darker?"
    content, ordered = inter.arrange(mmmu, [one, two])
    assert [c.get("text", c["type"]) for c in content] == [
        "Compare ",
        "visual",
        " with ",
        "visual",
        ". Which is darker?",
    ]
    assert ordered == [two, one]
    # default: images first, text unchanged (placeholders are text then)
    content, ordered = flat.arrange(mmmu, [one, two])
    assert [c["type"] for c in content] == ["visual", "visual", "text"] and ordered == [one, two]
    # LongVideoBench `_i`: bare <image> frames between subtitles, in order
    frames = _images(3)
    lvb = "<image>\nhello\n<image>\n<image>\nworld\nWhat was said?"
    content, ordered = inter.arrange(lvb, frames)
    assert [c.get("text", c["type"]) for c in content] == ["visual", "\nhello\n", "visual", "\n", "visual",
                                                           "\nworld\nWhat was said?"]  # fmt: skip
    assert ordered == frames
    # a placeholder without a visual is dropped (lmms-eval's qwen2_vl does the same)
    assert inter.arrange("<image 3> and <image 1>", [one])[1] == [one]
    # the prompt really puts the image tokens between the texts, and the pixels come in placeholder order
    inputs = inter._batch_inputs([mmmu], [[one, two]])
    text = inter.processor.batch_decode(inputs["input_ids"])[0]
    assert (
        text.index("Compare")
        < text.index("<|vision_start|>")
        < text.index(" with ")
        < text.rindex("<|vision_end|>")
    )
    assert text.rindex("<|vision_end|>") < text.index("Which is darker")
    reference = inter.processor.image_processor(images=[two, one], return_tensors="pt")["pixel_values"]
    assert np.allclose(inputs["pixel_values"].numpy(), reference.numpy())
    flat_text = flat.processor.batch_decode(flat._batch_inputs([mmmu], [[one, two]])["input_ids"])[0]
    assert flat_text.index("<|vision_end|>") < flat_text.index("Compare")


# --- 29: progress while the first run writes the synthetic data -----------------------------------------------


def test_data_generation_reports_progress(tmp_path, monkeypatch):
    for name in eval_tasks.DATASETS:  # small datasets: same code path, fast
        monkeypatch.setitem(eval_tasks.DATASETS, name, eval_tasks.DATASETS[name].__class__(
            name, eval_tasks.DATASETS[name].source, frames=eval_tasks.DATASETS[name].frames, count=2))  # fmt: skip
    seen = []
    made = eval_tasks.ensure_datasets(tmp_path, on_sample=lambda done, total: seen.append((done, total)))
    assert made == list(eval_tasks.DATASETS)
    total = 2 * len(eval_tasks.DATASETS)
    assert seen == [(i, total) for i in range(1, total + 1)]
    assert eval_tasks.ensure_datasets(tmp_path, on_sample=lambda *a: pytest.fail("nothing to write")) == []
