"""Capture's sources on real files, a real broker and a real gRPC server: folder order, video sampling, and the
source policy at work (issue #10): a folder's non-images never reach a topic, refused sources fail the Ingest call
with INVALID_ARGUMENT before any frame and without echoing credentials, a configured source that is down is retried.
"""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from sightline.capture import sources
from sightline.capture.service import Capture, CaptureServicer
from sightline.capture.settings import CaptureSettings
from sightline.capture.source_policy import HostRules, SourcePolicy
from sightline.capture.sources import SourceRefused, SourceUnavailable, open_source, open_vetted, source_id_for
from sightline.common.bus import read_topics
from sightline.common.config import KafkaSettings
from sightline.common.rpc import GrpcServer, channel
from sightline.common.topics import DEADLETTER, FRAMES
from sightline.tooling.broker import free_port
from sightline.v1 import capture_pb2, capture_pb2_grpc, events_pb2

SECRET = "hunter2-do-not-leak"


def write_video(path: Path, frames: int, fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((48, 64, 3), i * 4 % 255, np.uint8))
    writer.release()


def files_under(root: Path) -> SourcePolicy:
    return SourcePolicy(roots=(root.resolve(),))


# --- sources on their own ------------------------------------------------------------------------------------------


def test_folder_frames_come_in_name_order_with_bytes_untouched(tmp_path: Path, face_photos: Path) -> None:
    for name in ("b.jpg", "a.jpg", ".hidden"):
        (tmp_path / name).write_bytes((face_photos / "obama.jpg").read_bytes())
    frames = list(open_source(str(tmp_path), 5, files_under(tmp_path)))
    assert [f.name for f in frames] == ["a.jpg", "b.jpg"]
    assert frames[0].encoded == (face_photos / "obama.jpg").read_bytes() and frames[0].media_type == "image/jpeg"


def test_video_is_sampled_at_the_requested_rate_of_media_time(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, frames=50, fps=25)  # two seconds
    sampled = list(open_source(str(video), 5, files_under(tmp_path)))
    assert 9 <= len(sampled) <= 11
    assert all(f.pixels is not None and f.pixels.shape == (48, 64, 3) for f in sampled)
    times = [f.media_time_s for f in sampled]
    assert all(0.15 < b - a < 0.25 for a, b in pairwise(times))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so an unreadable file cannot be made")
def test_unreadable_file_in_a_folder_is_a_failed_frame_not_an_exception(tmp_path: Path) -> None:
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(b"\xff\xd8\xff\xe0")
    locked.chmod(0)
    (frame,) = list(open_source(str(tmp_path), 5, files_under(tmp_path)))
    assert frame.error and frame.encoded is None


def test_missing_empty_and_fake_sources_fail_when_opened(tmp_path: Path) -> None:
    policy = files_under(tmp_path)
    with pytest.raises(SourceUnavailable, match="does not exist"):
        open_source(str(tmp_path / "nope"), 5, policy)
    with pytest.raises(SourceUnavailable, match="has no files"):
        open_source(str(tmp_path), 5, policy)  # raised by the call itself, not when the first frame is read
    playlist = tmp_path / "clip.mp4"  # FFmpeg probes content: a playlist named .mp4 would be followed
    playlist.write_text(f"#EXTM3U\n#EXTINF:1,\nhttp://169.254.169.254/{SECRET}.ts\n")
    with pytest.raises(SourceRefused, match="not a recognised video") as refused:
        open_source(str(playlist), 5, policy)
    assert SECRET not in str(refused.value)
    fake = tmp_path / "photo.jpg"
    fake.write_text(f"password={SECRET}\n")
    with pytest.raises(SourceRefused, match="not a recognised image") as refused:
        open_source(str(fake), 5, policy)
    assert SECRET not in str(refused.value)


def test_a_video_is_decoded_from_the_file_that_was_checked_even_if_its_path_is_swapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video, other = tmp_path / "clip.avi", tmp_path / "other.avi"
    write_video(video, frames=50, fps=25)
    write_video(other, frames=5, fps=25)
    checked = sources.looks_like_video

    def check_then_swap(head: bytes) -> bool:  # the swap lands between the signature check and FFmpeg's open
        os.replace(other, video)
        return checked(head)

    monkeypatch.setattr(sources, "looks_like_video", check_then_swap)
    assert len(list(open_source(str(video), 25, files_under(tmp_path)))) == 50  # the checked file, not the new one
    monkeypatch.undo()
    vetted = files_under(tmp_path).vet(str(video))
    video.unlink()
    video.symlink_to(tmp_path / "elsewhere.avi")  # a symlink swapped in after the vetting is not followed
    write_video(tmp_path / "elsewhere.avi", frames=5, fps=25)
    with pytest.raises(SourceUnavailable, match="cannot be read"):
        open_vetted(vetted, 25, files_under(tmp_path))
    assert sources.FFMPEG_OPTIONS_VARIABLE not in os.environ  # set around each open only


class _Site(http.server.ThreadingHTTPServer):
    """A loopback web server: ``routes`` maps a path to (status, headers, body); every path asked is recorded."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.routes, self.asked = routes, []  # type: ignore[var-annotated]
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.asked.append(self.path)
                status, headers, body = site.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


def test_an_http_stream_cannot_lead_ffmpeg_to_another_server_by_redirect_or_playlist(tmp_path: Path) -> None:
    # The policy allows a host, not a port: "another server" is a second loopback port, so nothing leaves the machine.
    clip = tmp_path / "clip.avi"
    write_video(clip, frames=10, fps=25)
    elsewhere = _Site({"/clip.avi": (200, {"Content-Type": "video/x-msvideo"}, clip.read_bytes())})
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{elsewhere.url('/clip.avi')}\n#EXT-X-ENDLIST\n"
    allowed = _Site(
        {
            "/clip.avi": (200, {"Content-Type": "video/x-msvideo"}, clip.read_bytes()),
            "/redirect": (302, {"Location": elsewhere.url("/clip.avi")}, b""),
            "/live.m3u8": (200, {"Content-Type": "application/vnd.apple.mpegurl"}, playlist.encode()),
        }
    )
    policy = SourcePolicy(schemes=frozenset({"http"}), hosts=HostRules.parse(["127.0.0.1/32"]))
    try:
        assert list(open_source(allowed.url("/clip.avi"), 1000, policy))  # the allowed server itself: read
        for path in ("/redirect", "/live.m3u8"):
            with pytest.raises(SourceUnavailable, match="cannot open video source"):
                open_source(allowed.url(path), 1000, policy)
        assert "/redirect" in allowed.asked and "/live.m3u8" in allowed.asked
        assert elsewhere.asked == []  # FFmpeg never went there
    finally:
        for site in (allowed, elsewhere):
            site.shutdown()
            site.server_close()


def test_source_ids_are_readable_and_never_carry_credentials() -> None:
    assert source_id_for("/data/cams/gate 3/") == "gate-3"
    assert source_id_for("rtsp://user:pw@10.0.0.5/stream1?x=1") == "stream1"
    assert source_id_for(f"rtsp://admin:{SECRET}@cam-7.site:554") == "cam-7.site"
    assert source_id_for(f"rtsp://admin:{SECRET}@cam-7.site/?token={SECRET}") == "cam-7.site"


# --- through the capture service, on the real broker ------------------------------------------------------------------


@pytest.fixture()
def capture_for(kafka: KafkaSettings) -> Iterator[Any]:
    """``capture_for(**settings)``: a Capture publishing to the session broker (closed at the end)."""
    opened: list[Capture] = []

    def make(**settings: Any) -> Capture:
        capture = Capture(CaptureSettings(backpressure_max_lag_frames=0, **settings), kafka)
        opened.append(capture)
        return capture

    yield make
    for capture in opened:
        capture.close()


def records_of(kafka: KafkaSettings, source_id: str) -> dict[str, list[bytes]]:
    """The values of every frame and dead-letter record keyed by ``source_id``, by topic."""
    found: dict[str, list[bytes]] = {FRAMES.name: [], DEADLETTER.name: []}
    for record in read_topics(kafka, list(found), idle_timeout_s=1.5):
        if record.key == source_id.encode():
            found[record.topic].append(record.value)
    return found


def test_a_folder_publishes_its_photos_only_and_no_topic_ever_holds_another_file(
    capture_for: Any, kafka: KafkaSettings, tmp_path: Path, face_photos: Path
) -> None:
    # The reproduction of issue #10: `sightline run /some/folder/` with creds.txt in it put the secret on a topic.
    folder = tmp_path / "camera"
    folder.mkdir()
    shutil.copy(face_photos / "obama.jpg", folder / "a-photo.jpg")
    (folder / "creds.txt").write_text(f"password={SECRET}\n")
    (folder / "creds.jpg").write_text(f"password={SECRET}\n")  # named like a photo, but not one
    outside = tmp_path / "outside.jpg"
    shutil.copy(face_photos / "biden.jpg", outside)
    (folder / "link.jpg").symlink_to(outside)  # a real photo, but outside the allowed folder
    capture = capture_for(allowed_roots=[folder])
    request = capture_pb2.IngestRequest(source_uri=str(folder), source_id="leaky-folder", no_pacing=True)
    final = list(capture.ingest(request))[-1]
    assert (final.frames_read, final.frames_published, final.frames_failed) == (4, 1, 3)

    records = records_of(kafka, "leaky-folder")
    (frame,) = [events_pb2.FrameCaptured.FromString(v) for v in records[FRAMES.name]]
    assert frame.image == (face_photos / "obama.jpg").read_bytes()
    assert all(SECRET.encode() not in value for values in records.values() for value in values)
    assert all((face_photos / "biden.jpg").read_bytes()[:64] not in v for v in records[DEADLETTER.name])
    letters = {d.reason: d for d in map(events_pb2.DeadLetter.FromString, records[DEADLETTER.name])}
    assert sorted(letters) == ["file_refused", "not_an_image", "not_an_image_file"]
    assert all(d.stage == "capture" and not d.payload for d in letters.values())
    fake, text = letters["not_an_image"], letters["not_an_image_file"]  # described, never copied
    assert fake.payload_withheld and len(fake.payload_sha256) == 32 and fake.payload_size == len(f"password={SECRET}\n")
    assert text.payload_withheld and text.payload_size == fake.payload_size and not text.payload_sha256  # unread
    assert not letters["file_refused"].payload_size  # outside the allowed folder: not even its size is told


def test_a_file_over_the_size_limit_is_refused_without_being_read(capture_for: Any, tmp_path: Path) -> None:
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as file:  # 64 GiB, sparse: reading it would take minutes and all the memory there is
        file.write(b"\xff\xd8\xff\xe0")
        file.truncate(64 * 1024**3)
    capture = capture_for(allowed_roots=[tmp_path], max_image_file_bytes=1024 * 1024)
    started = time.monotonic()
    with pytest.raises(ValueError, match="limit is 1048576"):
        capture.ingest(capture_pb2.IngestRequest(source_uri=str(huge)))
    (frame,) = list(open_source(str(tmp_path), 5, capture.policy))  # in a folder: a failed frame, its size only
    assert frame.reason == "file_too_large" and frame.size == 64 * 1024**3 and frame.encoded is None
    assert time.monotonic() - started < 2


@pytest.fixture()
def capture_server(capture_for: Any, tmp_path: Path) -> Iterator[capture_pb2_grpc.CaptureServiceStub]:
    """A real CaptureService on 127.0.0.1 whose policy allows files under tmp_path/allowed and rtsp to loopback."""
    (tmp_path / "allowed").mkdir()
    capture = capture_for(allowed_roots=[tmp_path / "allowed"], allowed_schemes=["rtsp"], allowed_hosts=["127.0.0.0/8"])
    server = GrpcServer("127.0.0.1", 0, workers=4)
    server.add(CaptureServicer(capture))
    server.start()
    yield capture_pb2_grpc.CaptureServiceStub(channel(f"127.0.0.1:{server.port}"))
    server.stop(0)


def refusal(stub: capture_pb2_grpc.CaptureServiceStub, uri: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        next(iter(stub.Ingest(capture_pb2.IngestRequest(source_uri=uri, source_id="probe"), timeout=20)))
    return failed.value


def test_sources_outside_the_policy_fail_the_call_with_invalid_argument(
    capture_server: capture_pb2_grpc.CaptureServiceStub, tmp_path: Path, face_photos: Path
) -> None:
    allowed = tmp_path / "allowed"
    shutil.copy(face_photos / "obama.jpg", tmp_path / "beside.jpg")
    (allowed / "escape.jpg").symlink_to(tmp_path / "beside.jpg")
    (allowed / "keys").symlink_to(tmp_path, target_is_directory=True)
    closed_port = free_port("127.0.0.1")
    cases = {
        str(tmp_path / "beside.jpg"): "outside the folders",
        f"{allowed}/../beside.jpg": "outside the folders",
        str(allowed / "escape.jpg"): "outside the folders",
        str(allowed / "keys"): "outside the folders",
        "/proc/self/environ": "is a system file",
        str(allowed / "missing.jpg"): "does not exist",
        f"rtsp://admin:{SECRET}@10.1.2.3/stream": "not in an allowed network",
        f"rtsps://admin:{SECRET}@127.0.0.1/stream": "scheme 'rtsps' is not allowed",
        f"http://127.0.0.1:{closed_port}/?token={SECRET}": "scheme 'http' is not allowed",
        f"rtsp://admin:{SECRET}@127.0.0.1:{closed_port}/stream": "cannot open video source",  # allowed, but down
    }
    for uri, expected in cases.items():
        error = refusal(capture_server, uri)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (uri, error)
        assert expected in error.details() and SECRET not in error.details(), (uri, error.details())


def test_with_no_policy_configured_nothing_is_opened_and_the_message_names_the_setting(
    capture_for: Any, face_photos: Path
) -> None:
    capture = capture_for()  # production defaults
    for uri, setting in (
        (str(face_photos / "obama.jpg"), "SIGHTLINE_CAPTURE_ALLOWED_ROOTS"),
        ("rtsp://127.0.0.1/stream", "SIGHTLINE_CAPTURE_ALLOWED_SCHEMES"),
    ):
        with pytest.raises(ValueError, match=setting):
            capture.ingest(capture_pb2.IngestRequest(source_uri=uri))


# --- configured sources ----------------------------------------------------------------------------------------------


def source_logs(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sightline.capture.service" and r.getMessage() == message]


def frames_published() -> float:
    return (
        REGISTRY.get_sample_value("sightline_events_published_total", {"service": "capture", "topic": FRAMES.name})
        or 0.0
    )


def wait_until(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_configured_camera_that_is_down_is_retried_with_backoff_and_never_logged_with_credentials(
    capture_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    camera = f"rtsp://admin:{SECRET}@127.0.0.1:{free_port('127.0.0.1')}/stream1"
    capture = capture_for(
        sources=[camera],
        allowed_schemes=["rtsp"],
        allowed_hosts=["127.0.0.1"],
        reconnect_delay_s=0.05,
        reconnect_max_delay_s=0.2,
    )
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="sightline.capture.service"):
        capture.run_configured_sources(stop)
        try:
            wait_until(lambda: len(source_logs(caplog, "configured source unavailable; retrying")) >= 4, 10)
        finally:
            stop.set()
    attempts = source_logs(caplog, "configured source unavailable; retrying")
    assert [r.attempt for r in attempts[:4]] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    assert [r.retry_in_s for r in attempts[:4]] == [0.05, 0.1, 0.2, 0.2]  # type: ignore[attr-defined]  # capped
    assert {r.source for r in attempts} == {"stream1"}  # type: ignore[attr-defined]
    assert SECRET not in caplog.text and all(SECRET not in str(vars(r)) for r in caplog.records)
    assert not any(SECRET in t.name for t in threading.enumerate())


def test_a_configured_folder_that_appears_later_is_picked_up(
    capture_for: Any, kafka: KafkaSettings, tmp_path: Path, face_photos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "late-camera"
    capture = capture_for(
        sources=[str(folder)],
        allowed_roots=[tmp_path],
        reconnect_delay_s=0.05,
        reconnect_max_delay_s=0.1,
        default_fps=60,
    )
    stop = threading.Event()
    published_before = frames_published()
    with caplog.at_level(logging.WARNING, logger="sightline.capture.service"):
        capture.run_configured_sources(stop)
        try:
            wait_until(lambda: len(source_logs(caplog, "configured source unavailable; retrying")) >= 2, 10)
            folder.mkdir()
            shutil.copy(face_photos / "obama.jpg", folder / "a.jpg")
            wait_until(lambda: frames_published() > published_before, 20)
        finally:
            stop.set()
    wait_until(lambda: not any(t.name == "source-late-camera" for t in threading.enumerate()), 10)
    frames = [events_pb2.FrameCaptured.FromString(v) for v in records_of(kafka, "late-camera")[FRAMES.name]]
    assert frames and all(f.image == (face_photos / "obama.jpg").read_bytes() for f in frames)


def test_a_configured_source_the_policy_refuses_is_logged_once_and_not_retried(
    capture_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    capture = capture_for(
        sources=[f"rtsp://admin:{SECRET}@10.1.2.3/gate-cam"],
        allowed_schemes=["rtsp"],
        allowed_hosts=["127.0.0.0/8"],
        reconnect_delay_s=0.05,
    )
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="sightline.capture.service"):
        capture.run_configured_sources(stop)
        wait_until(lambda: not any(t.name == "source-gate-cam" for t in threading.enumerate()), 5)
        time.sleep(0.3)  # several reconnect delays: no retry may follow
        stop.set()
    (refused,) = source_logs(caplog, "configured source refused by the source policy: not opened")
    assert "10.1.2.3" in refused.error and SECRET not in refused.error  # type: ignore[attr-defined]
    assert not source_logs(caplog, "configured source unavailable; retrying")
