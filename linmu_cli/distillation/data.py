"""Training samples for distillation: the built-in synthetic source or a LLaVA-style manifest.

A sample is a chat (question + answer) with one image or video, turned into model inputs by the teacher's own
processor. Position in the data is a single integer (samples consumed), so a resumed run continues exactly
where it stopped; with several processes, rank r takes samples r, r + world, ...
"""

from __future__ import annotations

import json
import os
import queue
import random
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from linmu_cli import media
from linmu_cli.data import synthetic
from linmu_cli.data.chat import chat_prompt, question_content
from linmu_cli.distillation.recipe import DataConfig
from linmu_cli.errors import LinmuError


@dataclass
class Example:
    """One chat sample before processing: media is a PIL image, a (T, H, W, 3) uint8 array, or None."""

    kind: str  # "image" | "video" | "text"
    media: object
    question: str
    answer: str
    fps: float = 2.0


class SkipSample(Exception):
    """A bad sample (missing file, corrupt video, too long); counted and reported unless on_error: raise."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def read_video(path: Path, frames: int, fps_cap: float | None) -> tuple[np.ndarray, float]:
    """`frames` frames, spread uniformly (an even number; a short video repeats frames), capped at `fps_cap` per
    second of video; and the frame rate they represent. A file decord cannot decode is a counted skip
    ("corrupt video"); `linmu_cli.media.read_video` keeps the decoder's noise off stderr."""

    def pick(total: int, source_fps: float) -> np.ndarray:
        want = frames
        if fps_cap:
            want = min(want, max(2, int(total / (source_fps or 1.0) * fps_cap)))
        want = max(2, want - want % 2)
        return np.linspace(0, total - 1, want).round().astype(int)

    try:  # num_threads=0: decord's default (ffmpeg picks the thread count)
        clip = media.read_video(path, pick=pick, num_threads=0)
    except media.VideoError as exc:
        raise SkipSample("corrupt video", str(exc)) from None
    return clip.frames, (clip.source_fps or 1.0) * len(clip.frames) / clip.total_frames


class ManifestSource:
    """LLaVA-style JSON list or JSONL: {"image" | "video": path, "conversations": [{"from", "value"}, ...]}."""

    def __init__(self, cfg: DataConfig, heldout: bool = False):
        path = Path(cfg.manifest)
        if not path.is_file():
            raise LinmuError(f"data.manifest {path} not found")
        text = path.read_text()
        try:
            rows = (
                json.loads(text)
                if text.lstrip().startswith("[")
                else [json.loads(x) for x in text.splitlines() if x.strip()]
            )
        except json.JSONDecodeError as exc:
            raise LinmuError(f"data.manifest {path}: not JSON / JSONL ({exc})") from None
        if not isinstance(rows, list) or not rows:
            raise LinmuError(f"data.manifest {path} is empty (or not a list of samples)")
        self.root = Path(cfg.media_root) if cfg.media_root else path.parent
        for i, row in enumerate(rows):
            check_row(row, i, path, self.root, cfg.allow_outside_root)
        if len(rows) <= cfg.heldout:
            raise LinmuError(f"data.manifest {path} has {len(rows)} samples, but data.heldout={cfg.heldout} "
                             "of them are held out for the report: add samples or lower data.heldout")  # fmt: skip
        # the last `heldout` rows are kept out of training for the report
        rows = rows[-cfg.heldout :] if heldout else rows[: -cfg.heldout]
        self.rows, self.cfg = rows, cfg

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> Example:
        row = self.rows[index]
        turns = row.get("conversations") or []
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise SkipSample("malformed", f"row {index}: conversations is not a list of turns")
        human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        answer = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
        if not isinstance(human, str) or not isinstance(answer, str):
            raise SkipSample("malformed", f"row {index} has no human/gpt turn")
        question = human.replace("<image>", "").replace("<video>", "").strip()
        if "video" in row:
            clip, fps = read_video(self._media(row["video"]), frames_for(self.cfg, index), self.cfg.fps)
            return Example("video", clip, question, answer, fps)
        if "image" in row:
            try:
                img = Image.open(self._media(row["image"])).convert("RGB")
            except OSError as exc:
                raise SkipSample("corrupt image", f"{row['image']}: {exc}") from None
            return Example("image", img, question, answer)
        return Example("text", None, question, answer)

    def _media(self, rel: str) -> Path:
        path = self.root / rel  # confined to the root by check_row when the manifest was read
        if not path.is_file():
            raise SkipSample("missing file", str(path))
        return path


def check_row(row: object, index: int, manifest: Path, root: Path, allow_outside_root: bool) -> None:
    """One manifest row, checked before any training: an object whose `image` / `video` is a path string
    inside data.media_root: a shared manifest must not make training read `../secret.png` or `/etc/...`."""
    where = f"data.manifest {manifest} row {index}"
    if not isinstance(row, dict):
        raise LinmuError(f"{where} is {type(row).__name__} {row!r:.60}, not an object like "
                         '{"image": "a.png", "conversations": [...]}')  # fmt: skip
    for key in ("image", "video"):
        if key not in row:
            continue
        rel = row[key]
        if not isinstance(rel, str) or not rel:
            raise LinmuError(f"{where}: {key!r} must be a path (a string), got {rel!r:.60}")
        if allow_outside_root:
            continue
        if os.path.isabs(rel):
            raise LinmuError(f"{where}: {key} path {rel!r} is absolute; media paths are relative to "
                             f"data.media_root ({root}); set data.allow_outside_root: true to allow it")  # fmt: skip
        if os.path.normpath(rel).split(os.sep)[0] == os.pardir:
            raise LinmuError(f"{where}: {key} path {rel!r} leaves data.media_root ({root}); "
                             "set data.allow_outside_root: true to allow it")  # fmt: skip


def frames_for(cfg: DataConfig, index: int, seed: int = 0) -> int:
    """`data.frames` for sample `index`: the number, or one of the list drawn from (seed, index) so that a
    resumed or multi-process run sees the same lengths (distilling over several lengths)."""
    if isinstance(cfg.frames, int):
        return cfg.frames
    return int(cfg.frames[np.random.default_rng([seed, index, 17]).integers(len(cfg.frames))])


class SyntheticSource:
    """The procedural tasks of `linmu_cli.data.synthetic`, round-robin, generated on the fly from the seed."""

    def __init__(self, cfg: DataConfig, seed: int):
        unknown = [t for t in cfg.tasks if t not in synthetic.TASKS]
        if unknown:
            raise LinmuError(
                f"data.tasks: unknown synthetic task(s) {unknown}; known: {', '.join(synthetic.TASKS)}"
            )
        self.cfg, self.seed = cfg, seed

    def example(self, index: int) -> Example:
        tasks = self.cfg.tasks
        s = synthetic.generate(
            tasks[index % len(tasks)],
            index // len(tasks),
            self.seed,
            frames_for(self.cfg, index, self.seed),
            self.cfg.size,
        )
        media = Image.fromarray(s.media) if s.kind == "image" else s.media
        return Example(s.kind, media, s.question, s.answer)


def fit_pixels(media: Any, max_pixels: int | None) -> Any:
    """Downscale an image or every frame of a video so that height x width <= max_pixels (aspect kept)."""
    if not max_pixels:
        return media
    h, w = (media.size[1], media.size[0]) if isinstance(media, Image.Image) else media.shape[1:3]
    scale = (max_pixels / (h * w)) ** 0.5
    if scale >= 1:
        return media
    size = (max(28, int(w * scale)), max(28, int(h * scale)))
    if isinstance(media, Image.Image):
        return media.resize(size, Image.BICUBIC)
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in media])


def to_inputs(
    processor: Any, examples: list[Example], max_tokens: int, max_pixels: int | None = None
) -> dict[str, torch.Tensor]:
    """Chat-format question + answer (teacher forcing) and run the processor; left padding."""
    texts, images, videos, metadata = [], [], [], []
    for ex in examples:
        ex.media = fit_pixels(ex.media, max_pixels) if ex.media is not None else None
        texts.append(chat_prompt(processor, question_content(ex.kind, ex.question), answer=ex.answer))
        if ex.kind == "image":
            images.append(ex.media)
        elif ex.kind == "video":
            videos.append(ex.media)
            metadata.append({"total_num_frames": len(ex.media), "fps": ex.fps})
    processor.tokenizer.padding_side = "left"
    kwargs = {"images": images or None, "videos": videos or None}
    if videos and "Qwen2_5" in type(processor).__name__:
        kwargs["video_metadata"] = metadata  # else it assumes 24 fps for arrays (wrong temporal positions)
    inputs = processor(
        text=texts, padding=True, return_tensors="pt", **{k: v for k, v in kwargs.items() if v}
    )
    if inputs["input_ids"].shape[1] > max_tokens:
        raise SkipSample("too long", f"{inputs['input_ids'].shape[1]} tokens > data.max_tokens={max_tokens}")
    return dict(inputs)


class SampleStream:
    """Deterministic stream of processed batches with an integer position, skipping bad samples."""

    def __init__(
        self, cfg: DataConfig, processor: Any, seed: int, rank: int = 0, world: int = 1, heldout: bool = False
    ):
        self.cfg, self.processor, self.rank, self.world = cfg, processor, rank, world
        if cfg.source == "manifest":
            self.source = ManifestSource(cfg, heldout)
        else:  # held-out samples come from a different seed
            self.source = SyntheticSource(cfg, seed + (7919 if heldout else 0))
        self.seed = seed
        self.skipped: Counter[str] = Counter()
        self.position = 0  # samples consumed by this rank's stream (global index = position * world + rank)

    def _index(self, position: int) -> int:
        global_index = position * self.world + self.rank
        if isinstance(self.source, SyntheticSource):
            return global_index
        n = len(self.source)
        epoch, offset = divmod(global_index, n)
        order = list(range(n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[offset]

    def _next_example(self) -> Example:
        for _ in range(1000):
            index = self._index(self.position)
            self.position += 1
            try:
                return self.source.example(index)
            except SkipSample as exc:
                self._skip(exc)
        raise LinmuError("1000 bad samples in a row: check data.manifest / data.media_root")

    def _skip(self, exc: SkipSample) -> None:
        if self.cfg.on_error == "raise":
            raise LinmuError(f"bad sample ({exc}); set data.on_error: skip to skip such samples") from None
        self.skipped[exc.reason] += 1

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        while True:
            examples = [self._next_example() for _ in range(batch_size)]
            try:
                return to_inputs(self.processor, examples, self.cfg.max_tokens, self.cfg.max_pixels)
            except SkipSample as exc:
                self._skip(exc)


class Prefetcher:
    """A `SampleStream` whose next batches are prepared in a background thread while the step computes.

    The worker owns the stream and hands over each batch with the stream's position and skip counts right
    after it; `position` / `skipped` here are those of the last batch *consumed*, so a checkpoint records
    where training is, not where the worker got to, and a resume (which sets `position` before the first
    batch) continues exactly. The worker starts at the first `next_batch` and draws the same batches in the
    same order as the stream alone would (nothing in it touches a global RNG); an error (e.g. data.on_error:
    raise) reaches the consumer at the batch it belongs to. `pin` pins the tensors (for non-blocking copies).
    """

    def __init__(self, stream: SampleStream, batch_size: int, depth: int = 1, pin: bool = False) -> None:
        self.stream, self.batch_size, self.depth, self.pin = stream, batch_size, max(1, depth), pin
        self.position = stream.position
        self.skipped: Counter[str] = Counter(stream.skipped)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                batch = self.stream.next_batch(self.batch_size)
                if self.pin:
                    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                item: tuple = (batch, self.stream.position, Counter(self.stream.skipped), None)
            except BaseException as exc:  # handed to the consumer, raised there
                item = (None, self.stream.position, Counter(self.stream.skipped), exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[3] is not None:
                return

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        if batch_size != self.batch_size:
            raise ValueError(f"this prefetcher makes batches of {self.batch_size}, not {batch_size}")
        if self._thread is None:
            self.stream.position, self.stream.skipped = self.position, Counter(self.skipped)
            self._stop = threading.Event()
            self._queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._work, name="linmu-prefetch", daemon=True)
            self._thread.start()
        assert self._queue is not None
        batch, self.position, self.skipped, exc = self._queue.get()
        if exc is not None:
            self.close()
            raise exc
        return batch

    def close(self) -> None:
        """Stop the worker (the batches it prepared beyond `position` are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._thread = None
