"""lmms-eval hooks of linmu's synthetic tasks; the data generator is `linmu_cli.evaluation.tasks`.

A doc is one line of `data/<dataset>/test.jsonl`: `media` (path relative to `data/`), `kind` (image | video),
`question`, `answer` (one word), `choices`, `answer_index`. Missing datasets are generated (seed 12345) the first
time a linmu task is loaded, so `lmms-eval --include_path evals/ --tasks linmu_video_count` works from a clean
checkout. Scoring and data generation are linmu's (`linmu_cli.evaluation.answers`, `.tasks`): without linmu
installed, the package of the checkout these files live in is used.
"""

from pathlib import Path

from PIL import Image

EVALS = Path(__file__).resolve().parent
DATA = EVALS / "data"

try:
    from linmu_cli.evaluation.answers import normalize_answer
except ImportError:  # linmu not installed: use the checkout these tasks live in (scoring is linmu's one rule)
    import sys

    sys.path.insert(0, str(EVALS.parent))
    from linmu_cli.evaluation.answers import normalize_answer


def _ensure_data():
    from linmu_cli.evaluation.tasks import ensure_datasets

    ensure_datasets(EVALS)


_ensure_data()


def doc_to_visual(doc):
    path = DATA / doc["media"]
    if doc["kind"] == "image":
        with Image.open(path) as img:
            return [img.convert("RGB")]
    return [str(path)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc):
    return list(doc["choices"])


def process_results(doc, results):
    """Exact match after `linmu_cli.evaluation.answers.normalize_answer` (case, punctuation, spacing)."""
    prediction = results[0] if results else ""
    return {"exact_match": float(normalize_answer(prediction) == normalize_answer(doc["answer"]))}
