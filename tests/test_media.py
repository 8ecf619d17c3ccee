"""The one video reader (`linmu_cli.media`): each caller's frame choice, and quiet failure on a corrupt file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import corrupt_mp4

pytest.importorskip("decord", reason="needs decord (the eval extra)")

from linmu_cli.distillation import data as distill_data  # noqa: E402
from linmu_cli.media import VideoError, frame_indices, read_video, write_video  # noqa: E402


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """16 frames at 2 fps (8 s), each frame a different grey level so frame indices can be read back."""
    frames = np.stack([np.full((56, 56, 3), 10 + 15 * i, dtype=np.uint8) for i in range(16)])
    return write_video(tmp_path_factory.mktemp("media") / "grey.mp4", frames, fps=2.0)


def _levels(frames: np.ndarray) -> list[int]:
    return [round((float(f.mean()) - 10) / 15) for f in frames]


def test_eval_reads_up_to_max_num_frames(video: Path) -> None:
    clip = read_video(video, max_num_frames=32)  # never more frames than the file has
    assert (clip.total_frames, clip.source_fps, clip.fps) == (16, 2.0, 2.0)
    assert _levels(clip.frames) == list(range(16))
    assert _levels(read_video(video, max_num_frames=8).frames) == frame_indices(16, 2.0, 8).tolist()
    assert len(read_video(video, fps=1.0).frames) == 8  # 8 s at 1 frame per second


def test_distillation_reads_exactly_frames(video: Path) -> None:
    frames, fps = distill_data.read_video(video, 8, None)
    assert _levels(frames) == np.linspace(0, 15, 8).round().astype(int).tolist() and fps == 1.0
    frames, fps = distill_data.read_video(video, 32, None)  # more than the file: frames repeat
    assert len(frames) == 32 and fps == 4.0
    frames, _ = distill_data.read_video(video, 32, 1.0)  # the fps cap: 8 s at 1 frame per second
    assert len(frames) == 8


def test_both_callers_decode_the_same_pixels(video: Path) -> None:
    frames, _ = distill_data.read_video(video, 16, None)
    np.testing.assert_array_equal(frames, read_video(video, max_num_frames=16).frames)


@pytest.mark.parametrize("caller", ["eval", "distill"])
def test_a_corrupt_video_is_one_error_and_no_decoder_noise(tmp_path: Path, capfd, caller: str) -> None:
    import gc

    import decord

    path = corrupt_mp4(tmp_path / "v.mp4")
    decord.logging.set_level(decord.logging.INFO)  # decord's default
    if caller == "eval":
        with pytest.raises(VideoError, match="v.mp4"):
            read_video(path, max_num_frames=16, num_threads=0)
    else:
        with pytest.raises(distill_data.SkipSample, match="corrupt video"):
            distill_data.read_video(path, 8, None)
    gc.collect()  # the decoder is gone by now: nothing it says later can reach stderr either
    assert capfd.readouterr().err == ""


def test_a_missing_file_is_a_video_error(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
