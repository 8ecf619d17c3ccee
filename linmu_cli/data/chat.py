"""The chat turn every linmu prompt is: distillation samples, greedy answers, lmms-eval requests.

One place, because the teacher was trained on exactly this layout (`evals/train_teacher.py` feeds
`linmu_cli.distillation.data.to_inputs`) and scores are only comparable when evaluation asks the same way:
the media slot before the question, in one user turn, rendered by the processor's own chat template.
"""

from __future__ import annotations

from typing import Any


def question_content(kind: str | None, question: str) -> list[dict[str, str]]:
    """A user turn's content: one `{"type": "image" | "video"}` slot (none for "text" or None), then the text."""
    media = [{"type": kind}] if kind not in (None, "text") else []
    return [*media, {"type": "text", "text": question}]


def chat_prompt(
    processor: Any, content: list[dict], *, answer: str | None = None, system: str | None = None
) -> str:
    """The prompt text of one user turn (`content`: media slots and text parts, in order).

    Without `answer` it ends with the assistant's generation prompt (what generation and lmms-eval send); with
    it, the assistant's reply and end-of-turn follow (teacher forcing: what distillation trains on). `system`
    is a system turn before it; none means the template's default.
    """
    messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, tokenize=False)


__all__ = ["chat_prompt", "question_content"]
