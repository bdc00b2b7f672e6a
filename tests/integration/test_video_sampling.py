"""Video sampling on real H.264 files (issue #12): the right frames at the right media times, whichever way capture
decodes them (grab, keyframes only, seek), the same pixels as a full decode, the end of a file, and live streams
left on wall-clock time. The clips are made here with libx264 (tests/integration/video_clips.py)."""

from __future__ import annotations

import http.server
import math
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from video_clips import B_FRAMES, FULL_HD, IRREGULAR, LIVE, Clips, full_decode

from sightline.capture.source_policy import HostRules, SourcePolicy
from sightline.capture.sources import RawFrame, open_source
from sightline.cli.bench_video import ClipSpec, frame_index


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory, face_photos: Path, dlib_example_faces: Path) -> Clips:
    return Clips(tmp_path_factory.mktemp("clips").resolve())  # the scenes are made from the sample photos


def sampled(clips: Clips, spec: ClipSpec, fps: float) -> list[RawFrame]:
    path = clips.path(spec)
    return list(open_source(str(path), fps, SourcePolicy(roots=(path.parent,))))


def assert_each_is_the_frame_its_time_says(frames: list[RawFrame], spec: ClipSpec) -> None:
    assert frames, "no frame sampled"
    for frame in frames:
        assert frame.pixels is not None and frame.pixels.shape == (spec.size[1], spec.size[0], 3)
        index = round(frame.media_time_s * spec.fps)
        assert frame_index(frame.pixels) == index, f"{frame.name} at {frame.media_time_s} s is another frame"
        assert frame.name == f"frame-{index + 1}"
    assert all(a.media_time_s < b.media_time_s for a, b in pairwise(frames))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fps", "times"),
    [
        (25, [i / 25 for i in range(250)]),  # every frame
        (5, [i / 5 for i in range(50)]),  # grabbed between samples
        (1, [float(i) for i in range(10)]),
        (0.2, [0.0, 6.0]),  # keyframes only (every 2 s): the first one at or after each due time (0, 5)
        (0.1, [0.0]),  # a seek per sample; the next due time (10 s) is past the end
    ],
)
def test_a_1080p_camera_file_is_sampled_at_the_media_times_of_the_rate(
    clips: Clips, fps: float, times: list[float]
) -> None:
    path = clips.path(FULL_HD)
    seen = []
    for frame in open_source(str(path), fps, SourcePolicy(roots=(path.parent,))):  # one at a time: 6 MB each
        assert_each_is_the_frame_its_time_says([frame], FULL_HD)
        seen.append(frame.media_time_s)
    assert seen == pytest.approx(times, abs=1e-6)


@pytest.mark.parametrize(
    ("fps", "times"),
    [
        (1, [float(i) for i in range(10)]),  # grab
        (0.4, [0.0, 3.0, 5.0, 8.0]),  # keyframes only (every second): the first at or after 0, 2.5, 5, 7.5
        (0.2, [0.0, 5.0]),  # a seek to each due time
        (50, [i / 25 for i in range(250)]),  # faster than the file: every frame, once
    ],
)
def test_grab_keyframe_and_seek_sampling_give_the_pixels_of_a_full_decode(
    clips: Clips, fps: float, times: list[float]
) -> None:
    frames = sampled(clips, B_FRAMES, fps)  # with B frames: decoding order is not display order
    assert [f.media_time_s for f in frames] == pytest.approx(times, abs=1e-6)
    assert_each_is_the_frame_its_time_says(frames, B_FRAMES)
    reference = full_decode(clips.path(B_FRAMES), [round(f.media_time_s * B_FRAMES.fps) for f in frames])
    for frame in frames:
        assert frame.pixels is not None
        expected = reference[round(frame.media_time_s * B_FRAMES.fps)]
        assert np.abs(frame.pixels.astype(np.int16) - expected).mean() < 0.5, frame.name


def test_keyframes_sparser_than_they_began_bring_back_every_frame_from_the_missed_sample(clips: Clips) -> None:
    # Keyframes at 0, 1, 2, 3 s chose keyframes-only for 0.4 fps; the next one is at 8 s, past the sample due at 5 s.
    frames = sampled(clips, IRREGULAR, 0.4)
    assert [f.media_time_s for f in frames] == pytest.approx([0.0, 3.0, 5.0, 7.52, 10.0], abs=1e-6)
    assert_each_is_the_frame_its_time_says(frames, IRREGULAR)


def test_the_end_of_a_file_ends_the_frames_and_closes_it(clips: Clips) -> None:
    path = clips.path(B_FRAMES)
    frames: Iterator[RawFrame] = open_source(str(path), 0.2, SourcePolicy(roots=(path.parent,)))
    assert [f.media_time_s for f in frames] == pytest.approx([0.0, 5.0])  # the seek to 10 s finds the end
    assert next(frames, None) is None
    duration = B_FRAMES.frames / B_FRAMES.fps
    assert len(sampled(clips, B_FRAMES, 0.3)) == math.ceil(duration * 0.3)  # keyframes only, to the last one


class _OneFile(http.server.ThreadingHTTPServer):
    """A loopback web server with one file, recording every path asked."""

    def __init__(self, path: Path) -> None:
        self.asked: list[str] = []
        body, site = path.read_bytes(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.asked.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_live_stream_keeps_wall_clock_times_and_every_frame_decoded(clips: Clips) -> None:
    site = _OneFile(clips.path(LIVE))
    policy = SourcePolicy(schemes=frozenset({"http"}), hosts=HostRules.parse(["127.0.0.1/32"]))
    try:
        started = time.monotonic()
        frames = list(open_source(f"http://127.0.0.1:{site.server_address[1]}/live.ts", 25, policy))
        elapsed = time.monotonic() - started
    finally:
        site.shutdown()
        site.server_close()
    assert site.asked == ["/live.ts"]  # a stream is opened once: never reopened for keyframes, never sought
    assert frames and frames[0].name == "frame-1"
    for frame in frames:
        assert frame.pixels is not None
        assert frame_index(frame.pixels) == int(frame.name.removeprefix("frame-")) - 1  # counted: every frame read
        assert 0.0 <= frame.media_time_s <= elapsed  # time since the stream was opened, not the stream's own
    assert all(a.media_time_s < b.media_time_s for a, b in pairwise(frames))
    as_file = sampled(clips, LIVE, 25)  # the same bytes as a file: every frame, at its own media time
    assert len(as_file) == LIVE.frames
    assert_each_is_the_frame_its_time_says(as_file, LIVE)
