"""The one answer rule (`linmu_cli.evaluation.answers`) that the lmms-eval tasks, the quality study and the
teacher's training report score with: what it forgives and what it does not."""

from __future__ import annotations

import pytest

from linmu_cli.evaluation.answers import exact_match, normalize_answer


@pytest.mark.parametrize(
    ("reply", "normalized"),
    [
        ("Red!", "red"),
        (" red.", "red"),
        ("RED", "red"),
        ("red\n", "red"),
        ('"red"', "red"),
        ("3.", "3"),
        (" 3 ", "3"),
        ("Beginning,", "beginning"),
        ("the  red\tone", "the red one"),  # spacing collapsed, words kept
        ("top-left", "topleft"),  # punctuation deleted, not turned into a space
        ("“red”", "“red”"),  # only ASCII punctuation is dropped
        ("", ""),
        (3, "3"),  # lmms-eval may hand over a non-string
    ],
)
def test_normalize_answer(reply: object, normalized: str) -> None:
    assert normalize_answer(reply) == normalized


@pytest.mark.parametrize(("reply", "answer"), [("Red!", "red"), (" red.", "red"), ("RED", "red"), ("7", "7")])
def test_exact_match_forgives_how_the_word_is_written(reply: str, answer: str) -> None:
    assert exact_match(reply, answer)


@pytest.mark.parametrize(
    ("reply", "answer"),
    [("the red one", "red"), ("red or blue", "red"), ("reddish", "red"), ("17", "7"), ("", "red")],
)
def test_exact_match_does_not_credit_more_than_the_answer(reply: str, answer: str) -> None:
    assert not exact_match(reply, answer)
