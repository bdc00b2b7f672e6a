"""The kiosk's in-memory session book and the gate command's frame loading (no services needed)."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sightline.capture.kiosk import (
    Claim,
    GateSession,
    SessionBook,
    SessionNotOpen,
    TooManySessions,
    check_gate_id,
    media_type_of,
)
from sightline.cli.gate import UsageError, load_frames
from sightline.common.rpc import InvalidInput, NotFound
from sightline.v1 import session_pb2

ACCEPT = session_pb2.SESSION_OUTCOME_ACCEPT


def gate_session(session_id: str, deadline_in: float = 10.0) -> GateSession:
    now = time.time()
    claim = Claim(session_pb2.CLAIM_KIND_PORTRAIT, f"session-{session_id}", session_scoped=True)
    return GateSession(session_id, "gate-1", claim, ["stop-a"], now, now + deadline_in)


def drain(updates: queue.SimpleQueue) -> list[session_pb2.SessionUpdate]:
    found = []
    while not updates.empty():
        found.append(updates.get_nowait())
    return found


def test_frames_are_numbered_until_the_session_is_closed() -> None:
    book = SessionBook(max_sessions=10, retention_s=60)
    book.add(gate_session("s1"))
    assert [book.next_frame("s1")[1] for _ in range(3)] == [1, 2, 3]
    book.close("s1")
    with pytest.raises(SessionNotOpen, match="closed"):
        book.next_frame("s1")
    with pytest.raises(SessionNotOpen, match="unknown"):
        book.next_frame("nope")


def test_watchers_get_progress_then_the_outcome_and_late_watchers_the_outcome_only() -> None:
    book = SessionBook(max_sessions=10, retention_s=60)
    book.add(gate_session("s1"))
    session, early = book.subscribe("s1")
    book.progress("s1", session_pb2.SessionUpdate(session_id="s1", frames_seen=1))
    outcome = session_pb2.SessionUpdate(session_id="s1", outcome=ACCEPT)
    assert book.finish("s1", outcome) is session
    assert book.finish("s1", outcome) is None  # ended once: a second outcome (decision's after a cancel) is ignored
    assert [u.outcome for u in drain(early)] == [session_pb2.SESSION_OUTCOME_UNSPECIFIED, ACCEPT]
    _, late = book.subscribe("s1")
    assert drain(late) == [outcome]
    with pytest.raises(SessionNotOpen, match="ended"):
        book.next_frame("s1")


def test_overdue_sessions_and_forgetting_ended_ones() -> None:
    book = SessionBook(max_sessions=10, retention_s=0.0)
    book.add(gate_session("late", deadline_in=-2.0))
    book.add(gate_session("on-time"))
    assert [s.session_id for s in book.overdue(time.time(), grace_s=1.0)] == ["late"]
    book.finish("late", session_pb2.SessionUpdate(outcome=session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER))
    assert book.active_subjects() == {"session-on-time"}
    book.forget_ended(time.time() + 0.01)
    with pytest.raises(NotFound):
        book.subscribe("late")


def test_the_open_session_limit() -> None:
    book = SessionBook(max_sessions=1, retention_s=60)
    book.add(gate_session("s1"))
    with pytest.raises(TooManySessions):
        book.add(gate_session("s2"))
    book.finish("s1", session_pb2.SessionUpdate(outcome=ACCEPT))
    book.add(gate_session("s2"))  # ended sessions do not count


@pytest.mark.parametrize("gate_id", ["gate-1", "G7", "lane_3.a"])
def test_good_gate_ids(gate_id: str) -> None:
    assert check_gate_id(gate_id) == gate_id


@pytest.mark.parametrize("gate_id", ["", "-gate", "gate:1", "gate 1", "g" * 65])
def test_bad_gate_ids(gate_id: str) -> None:
    with pytest.raises(InvalidInput, match="invalid gate id"):
        check_gate_id(gate_id)


def test_frames_must_be_jpeg_or_png() -> None:
    assert media_type_of(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert media_type_of(b"\x89PNG\r\n\x1a\nrest") == "image/png"
    with pytest.raises(InvalidInput, match="neither a JPEG nor a PNG"):
        media_type_of(b"GIF89a")


def test_the_gate_command_reads_folders_images_and_videos(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, (name, kind) in enumerate([("a.jpg", "JPEG"), ("b.png", "PNG"), ("c.bmp", "BMP")]):
        Image.new("RGB", (64, 48), (i * 60, 90, 120)).save(folder / name, kind)
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 20.0, (64, 48))
    for i in range(20):  # one second at 20 fps
        writer.write(np.full((48, 64, 3), i * 10, np.uint8))
    writer.release()
    frames = load_frames([str(folder), str(video)], fps=10.0)
    assert len(frames) == 3 + 10
    assert all(media_type_of(frame) in ("image/jpeg", "image/png") for frame in frames)  # the BMP is re-encoded
    with pytest.raises(UsageError, match="does not exist"):
        load_frames([str(tmp_path / "missing.jpg")], fps=10.0)
