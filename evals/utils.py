"""lmms-eval hooks of linmu's synthetic tasks; the data generator is `linmu_cli.evaluation.tasks`.

A doc is one line of `data/<dataset>/test.jsonl`: `media` (path relative to `data/`), `kind` (image | video),
`question`, `answer` (one word), `choices`, `answer_index`. Missing datasets are generated (seed 12345) the first
time a linmu task is loaded, so `lmms-eval --include_path evals/ --tasks linmu_video_count` works from a clean
checkout.
"""

import string
from pathlib import Path

from PIL import Image

EVALS = Path(__file__).resolve().parent
DATA = EVALS / "data"


def _ensure_data():
    try:
        from linmu_cli.evaluation.tasks import ensure_datasets
    except ImportError:  # linmu not installed: the data must have been generated already
        return
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


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text):
    """Lowercase, no punctuation, single spaces: 'Red.' == 'red', ' 3 ' == '3'."""
    return " ".join(str(text).lower().translate(_PUNCTUATION).split())


def process_results(doc, results):
    prediction = results[0] if results else ""
    return {"exact_match": float(normalize(prediction) == normalize(doc["answer"]))}
