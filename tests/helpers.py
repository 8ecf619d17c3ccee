"""Plain helpers shared by the tests (fixtures live in conftest.py): synthetic media, chat prompts, caches."""

import copy
import inspect

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration

from linmu_cli import bench
from linmu_cli.config import MateConfig
from linmu_cli.fast_decode import StaticDecoder
from linmu_cli.models import convert_model
from linmu_cli.tiny import build_tiny_teacher

# the models' cache keyword in this transformers release: `cache` from 5.24 on, `past_key_values` before (design.md
# §8). Only the M-MATE blocks accept both names; a model forward before 5.24 would take `cache=` as an unknown
# keyword and build its positions from a fresh cache of its own.
CACHE = (
    "cache"
    if "cache" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters
    else "past_key_values"
)


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


def interleave_graph_and_eager(dev: torch.device) -> None:
    """The runner's step (a CUDA graph replay on CUDA) and the model's eager forward (one token, or a three-token
    next turn) write the same LinMUCache buffers in place: each continues exactly where the other left off."""
    teacher, _ = build_tiny_teacher("qwen2_vl")
    teacher = teacher.to(dev)  # float32: a tight comparison
    with torch.device(dev):
        student = convert_model(teacher, MateConfig(text_window=5))
    ids = torch.randint(0, 900, (2, 9), device=dev)
    tokens = torch.randint(0, 900, (2, 14), device=dev)
    with torch.no_grad():
        cache = output_cache(student(input_ids=ids, use_cache=True))
        ref = copy.deepcopy(cache)  # stepped eagerly only
        runner = StaticDecoder.from_cache(
            student, cache, tokens[:, :1], bench.next_positions(student, 9, 2, dev)
        )
        if dev.type == "cuda":
            runner.capture(keep_state=True)
        t = 0
        for kind in ["graph"] * 3 + ["eager"] * 2 + ["graph"] * 3 + ["turn"] + ["graph"] * 3:
            k = 3 if kind == "turn" else 1
            chunk, t = tokens[:, t : t + k], t + k
            want = student(input_ids=chunk, **{CACHE: ref}).logits[:, -1]
            if kind == "graph":
                got = runner.feed(chunk)
            else:
                got = student(input_ids=chunk, **{CACHE: cache}).logits[:, -1]
                runner.positions.add_(k)
            assert rel_error(got, want) < 1e-4, (t, kind, rel_error(got, want))
    assert cache.get_seq_length() == ref.get_seq_length() == 9 + t
    assert (runner.graph is not None) == (dev.type == "cuda")


def rel_error(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def autograd_nodes(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind `t`."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names
