"""Greedy answers of a model to synthetic samples, outside lmms-eval: the teacher's training checks
(evals/train_teacher.py), the quality study (evals/study.py) and their tests ask the same questions the same way."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from linmu_cli.data.chat import chat_prompt, question_content
from linmu_cli.data.synthetic import Sample


@torch.no_grad()
def greedy_answers(
    model: nn.Module, processor: Any, samples: list[Sample], batch_size: int = 8, max_new_tokens: int = 8
) -> list[str]:
    """Decoded replies (special tokens dropped, not normalized) to each sample's question about its media.

    One chat turn per sample, left-padded batches of one media kind, greedy decoding. 8 new tokens cover every
    synthetic answer ("beginning" is 5 tokens in the tiny tokenizer) plus `<|im_end|>`.
    """
    was_training = model.training
    model.eval()
    processor.tokenizer.padding_side = "left"
    replies: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        if len({s.kind for s in chunk}) != 1:
            raise ValueError("greedy_answers: a batch mixes images and videos; pass one kind at a time")
        prompts = [chat_prompt(processor, question_content(s.kind, s.question)) for s in chunk]
        media = (
            {"images": [Image.fromarray(s.media) for s in chunk]}
            if chunk[0].kind == "image"
            else {"videos": [s.media for s in chunk]}
        )
        inputs = processor(text=prompts, padding=True, return_tensors="pt", **media).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        replies += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return replies


__all__ = ["greedy_answers"]
