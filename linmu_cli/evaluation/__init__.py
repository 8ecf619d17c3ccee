"""Evaluation through lmms-eval: the `linmu` lmms-eval model, the offline synthetic tasks, `linmu eval`.

    from linmu_cli.evaluation import evaluate
    evaluate("out/", "linmu_video_count", teacher="teacher/", limit=20)

Needs the `eval` extra (`pip install 'linmu[eval]'`); nothing here imports lmms-eval until it is used.
"""

from __future__ import annotations

from typing import Any


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `linmu_cli.evaluation.run.evaluate`."""
    from linmu_cli.evaluation.run import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["evaluate"]
