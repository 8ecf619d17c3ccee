"""Video files in and out: mp4 written with PyAV, frames read back with decord (never through a global bridge).

decord's `set_bridge` is process-global (docs/design.md §8) and other lmms-eval models set it to "torch" at import,
so frames are converted from whatever `get_batch` returns instead of relying on the native bridge.
"""

from __future__ import annotations

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


def _to_numpy(batch) -> np.ndarray:
    if hasattr(batch, "asnumpy"):  # decord's native NDArray
        return batch.asnumpy()
    if hasattr(batch, "numpy"):  # torch bridge (set by someone else)
        return batch.cpu().numpy()
    return np.asarray(batch)  # numpy / other bridges


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
) -> Clip:
    """Decode the frames `frame_indices` picks from a video file with decord, as a (T, H, W, 3) uint8 array.

    With `max_pixels`, frames larger than that are scaled down (aspect kept) while decoding, so a long 1080p video
    never sits in memory at full size before the processor resizes it to its own budget anyway.
    """
    import decord

    path = str(path)
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    height, width = reader[0].shape[:2]
    if max_pixels is not None and height * width > max_pixels:
        scale = (max_pixels / (height * width)) ** 0.5
        size = {"width": max(28, int(width * scale)), "height": max(28, int(height * scale))}
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads, **size)
    total = len(reader)
    source_fps = float(reader.get_avg_fps() or 0.0)
    idx = frame_indices(total, source_fps, max_num_frames, fps)
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
