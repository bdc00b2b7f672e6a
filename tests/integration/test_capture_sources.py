"""Capture's sources on real files: folder order, video sampling by media time, unreadable and missing sources."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from sightline.capture.sources import SourceError, open_source, source_id_for


def write_video(path: Path, frames: int, fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((48, 64, 3), i * 4 % 255, np.uint8))
    writer.release()


def test_folder_frames_come_in_name_order_with_bytes_untouched(tmp_path: Path, face_photos: Path) -> None:
    for name in ("b.jpg", "a.jpg", ".hidden"):
        (tmp_path / name).write_bytes((face_photos / "obama.jpg").read_bytes())
    frames = list(open_source(str(tmp_path), fps=5))
    assert [f.name for f in frames] == ["a.jpg", "b.jpg"]
    assert frames[0].encoded == (face_photos / "obama.jpg").read_bytes() and frames[0].media_type == "image/jpeg"


def test_video_is_sampled_at_the_requested_rate_of_media_time(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, frames=50, fps=25)  # two seconds
    sampled = list(open_source(str(video), fps=5))
    assert 9 <= len(sampled) <= 11
    assert all(f.pixels is not None and f.pixels.shape == (48, 64, 3) for f in sampled)
    times = [f.media_time_s for f in sampled]
    assert all(0.15 < b - a < 0.25 for a, b in zip(times, times[1:]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so an unreadable file cannot be made")
def test_unreadable_file_is_a_failed_frame_not_an_exception(tmp_path: Path) -> None:
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(b"x")
    locked.chmod(0)
    (frame,) = list(open_source(str(tmp_path), fps=5))
    assert frame.error and frame.encoded is None


def test_missing_or_empty_sources_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "nope"), fps=5)
    with pytest.raises(SourceError, match="has no files"):
        list(open_source(str(tmp_path), fps=5))
    broken_video = tmp_path / "clip.mp4"
    broken_video.write_bytes(b"not a video")
    with pytest.raises(SourceError, match="cannot open"):
        list(open_source(str(broken_video), fps=5))


def test_source_ids_are_readable_and_safe() -> None:
    assert source_id_for("/data/cams/gate 3/") == "gate-3"
    assert source_id_for("rtsp://user:pw@10.0.0.5/stream1?x=1") == "stream1"
