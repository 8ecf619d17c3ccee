"""Shared fixtures: the embedded tiny teachers and prompts built with their real processors."""

import numpy as np
import pytest
import torch
from PIL import Image

from linmu_cli.tiny import TINY_FAMILIES, build_tiny_teacher


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def tiny(request):
    """(family, teacher, processor) for each embedded tiny family."""
    model, processor = build_tiny_teacher(request.param, seed=0)
    return request.param, model, processor


def video(seed: int, frames: int = 8, size: int = 56) -> np.ndarray:
    return (np.random.RandomState(seed).rand(frames, size, size, 3) * 255).astype(np.uint8)


def image(seed: int, size: int = 56) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8))


def prompt_inputs(processor, texts, videos=None, images=None):
    """Chat-formatted prompts (one per text) with left padding, as a batch."""
    kind = "video" if videos is not None else "image" if images is not None else None
    prompts = []
    for text in texts:
        content = ([{"type": kind}] if kind else []) + [{"type": "text", "text": text}]
        msgs = [{"role": "user", "content": content}]
        prompts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    processor.tokenizer.padding_side = "left"
    kwargs = {"videos": videos} if videos is not None else {"images": images} if images is not None else {}
    return processor(text=prompts, padding=True, return_tensors="pt", **kwargs)


def corrupt_mp4(path):
    """An mp4 whose index is intact and whose frames are garbage: decoding fails frame by frame, loudly."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 56
        stream.pix_fmt = "yuv420p"
        for _ in range(32):
            frame = rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = bytearray(path.read_bytes())
    moov = data.find(b"moov")
    data[100 : moov - 100] = rng.integers(0, 256, moov - 200, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def output_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
