"""Video files in and out, for every command: mp4 written with PyAV, frames read back with decord.

One reader for distillation manifests and lmms-eval requests, because decord has two process-wide settings
that a second reader would get wrong:
- `decord.bridge.set_bridge` (docs/design.md §8): other lmms-eval models set it to "torch" at import, so frames
  are converted from whatever `get_batch` returns and linmu never sets it;
- its log level: ffmpeg prints thousands of decoder lines for one corrupt long video, so decoding runs with
  decord's logging off and stderr closed, and a bad file is one `VideoError` with the reason.

Which frames to decode is the caller's policy (`pick`); `frame_indices` is the default (lmms-eval's "up to N").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Clip:
    """Frames chosen from a video file and the frame rate they represent (for M-RoPE seconds)."""

    frames: np.ndarray  # (T, H, W, 3) uint8, T even
    fps: float  # frames per second of `frames` (sampled), not of the file
    total_frames: int  # frames in the file
    source_fps: float  # the file's average frame rate


FramePicker = Callable[[int, float], np.ndarray]
"""(frames in the file, its average frame rate or 0.0 when unknown) -> the indices to decode."""


class VideoError(Exception):
    """A video file decord cannot open or decode (the message names the file and decord's reason)."""


def _to_numpy(batch) -> np.ndarray:
    if hasattr(batch, "asnumpy"):  # decord's native NDArray
        return batch.asnumpy()
    if hasattr(batch, "numpy"):  # torch bridge (set by someone else)
        return batch.cpu().numpy()
    return np.asarray(batch)  # numpy / other bridges


@contextmanager
def _stderr_closed() -> Iterator[None]:
    """decord's own C++ log line ("ERROR opening: ...") ignores its log level: point fd 2 at /dev/null while it
    decodes (the reason travels in the exception instead)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def frame_indices(total: int, source_fps: float, max_num_frames: int, fps: float | None = None) -> np.ndarray:
    """Uniformly spaced frame indices: all frames, or `fps` frames per second, capped at `max_num_frames`.

    The count is even (Qwen2-VL merges two frames into one temporal token) and at least 2; a 1-frame video
    yields its frame twice.
    """
    if total < 1:
        raise ValueError("video has no frames")
    n = total
    if fps is not None and fps > 0 and source_fps > 0:
        n = max(1, round(total / source_fps * fps))
    n = min(n, max(2, int(max_num_frames)))
    n = max(2, n - n % 2)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def read_video(
    path: str | Path,
    max_num_frames: int = 64,
    fps: float | None = None,
    max_pixels: int | None = None,
    num_threads: int = 1,
    pick: FramePicker | None = None,
) -> Clip:
    """Decode chosen frames of a video file with decord, as a (T, H, W, 3) uint8 array; `VideoError` if it fails.

    The frames are `pick(total, source_fps)`, by default `frame_indices(total, source_fps, max_num_frames, fps)`.
    With `max_pixels`, frames larger than that are scaled down (aspect kept) while decoding, so a long 1080p video
    never sits in memory at full size before the processor resizes it to its own budget anyway.
    """
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    if pick is None:
        pick = lambda total, source_fps: frame_indices(total, source_fps, max_num_frames, fps)  # noqa: E731
    with _stderr_closed():
        try:
            clip, error = _decode(decord, str(path), pick, max_pixels, num_threads), None
        except Exception as exc:  # decord raises its own DECORDError, RuntimeError, IndexError
            # only the text leaves this block: the traceback would keep the reader (and its decoder threads,
            # which still log) alive past the point where stderr is restored
            clip, error = None, f"{path}: {exc}"
    if error is not None:
        raise VideoError(error)
    return clip


def _decode(decord, path: str, pick: FramePicker, max_pixels: int | None, num_threads: int) -> Clip:
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    if len(reader) < 1:
        raise ValueError("no frames")
    if max_pixels is not None:
        height, width = reader[0].shape[:2]
        if height * width > max_pixels:
            scale = (max_pixels / (height * width)) ** 0.5
            size = {"width": max(28, int(width * scale)), "height": max(28, int(height * scale))}
            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads, **size)
    total = len(reader)
    source_fps = float(reader.get_avg_fps() or 0.0)
    idx = np.asarray(pick(total, source_fps))
    frames = _to_numpy(reader.get_batch(idx.tolist())).astype(np.uint8, copy=False)
    duration = total / source_fps if source_fps > 0 else 0.0
    sampled_fps = len(idx) / duration if duration > 0 else 1.0
    return Clip(frames=frames, fps=sampled_fps, total_frames=total, source_fps=source_fps)


def _video_codec() -> tuple[str, dict[str, str]]:
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264", {"crf": "0", "preset": "veryfast"}  # visually lossless; yuv420p halves chroma only
    except Exception:  # an FFmpeg build without x264
        return "mpeg4", {"qscale": "2"}


def write_video(path: str | Path, frames: np.ndarray, fps: float = 2.0) -> Path:
    """Write (T, H, W, 3) uint8 frames (H, W even) as an H.264 (or MPEG-4 part 2) yuv420p mp4."""
    import av

    path = Path(path)
    codec, options = _video_codec()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = options
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
