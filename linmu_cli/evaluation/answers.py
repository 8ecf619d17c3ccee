"""How a model's free-form reply is compared with a task's one-word answer: the one rule every score uses.

The lmms-eval tasks in `evals/` (`evals/utils.py`), the quality study (`evals/study.py`) and the teacher's
training report (`evals/train_teacher.py`) all score exact match after `normalize_answer`, so "0.74" means the
same thing in docs/eval.md, docs/quality.md and evals/teacher/README.md.
"""

from __future__ import annotations

import string

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: object) -> str:
    """Lowercase, ASCII punctuation deleted, whitespace collapsed: "Red!", " red.", "RED" all become "red".

    The synthetic tasks ask for one word or digit ("Answer with one word."), so the rule forgives only how the
    word is written, never what else is said: "the red one" stays "the red one" and does not match "red"
    (a containment rule would credit "red or blue" on a question whose choices are red and blue). Punctuation
    is deleted, not replaced by a space ("top-left" -> "topleft"), which is what lmms-eval's scores in
    docs/eval.md were computed with; no answer of these tasks contains punctuation, so nothing depends on it.
    """
    return " ".join(str(text).lower().translate(_PUNCTUATION).split())


def exact_match(reply: object, answer: object) -> bool:
    """`reply` says `answer`, up to case, punctuation and spacing (see `normalize_answer`)."""
    return normalize_answer(reply) == normalize_answer(answer)


__all__ = ["exact_match", "normalize_answer"]
