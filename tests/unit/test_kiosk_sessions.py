"""The kiosk's in-memory session book, its stop lists and the gate command's frame loading (no services needed)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sightline.capture.kiosk.claims import Claim
from sightline.capture.kiosk.kiosk import check_gate_id, media_type_of, session_stop_lists
from sightline.capture.kiosk.session_book import GateSession, SessionBook, SessionNotOpen, TooManySessions
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


def send(book: SessionBook, session_id: str, published: bool = True) -> tuple[int, int]:
    """One frame through the book as the kiosk sends it: its sequence number, then the frames published so far."""
    session, sequence = book.next_frame(session_id)
    return sequence, book.frame_done(session, published)


def test_frames_are_numbered_until_the_session_is_closed() -> None:
    book = SessionBook(max_sessions=10, retention_s=60)
    book.add(gate_session("s1"))
    assert [send(book, "s1")[0] for _ in range(3)] == [1, 2, 3]
    assert book.close("s1").frames_sent == 3
    with pytest.raises(SessionNotOpen, match="closed"):
        book.next_frame("s1")
    with pytest.raises(SessionNotOpen, match="unknown"):
        book.next_frame("nope")


def test_only_published_frames_count_as_sent_and_no_number_is_reused() -> None:
    book = SessionBook(max_sessions=10, retention_s=60)
    book.add(gate_session("s1"))
    assert send(book, "s1") == (1, 1)
    assert send(book, "s1", published=False) == (2, 1)  # dead-lettered, or the broker did not take it
    assert send(book, "s1") == (3, 2)
    assert book.close("s1").frames_sent == 2  # what CLOSED tells decision to wait for


def test_closing_waits_for_a_frame_being_published_so_that_it_is_counted() -> None:
    book = SessionBook(max_sessions=10, retention_s=60)
    book.add(gate_session("s1"))
    session, _ = book.next_frame("s1")
    closed: list[int] = []
    closer = threading.Thread(target=lambda: closed.append(book.close("s1", wait_s=30).frames_sent))
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive() and not closed, "close did not wait for the frame under way"
    book.frame_done(session, published=True)
    closer.join(timeout=10)
    assert closed == [1]


def test_closing_does_not_wait_past_its_bound() -> None:
    book = SessionBook(max_sessions=10, retention_s=60)
    book.add(gate_session("s1"))
    book.next_frame("s1")  # a publication that never finishes
    assert book.close("s1", wait_s=0.05).frames_sent == 0


def test_still_open_sessions_include_closed_ones_waiting_for_their_outcome() -> None:
    book = SessionBook(max_sessions=10, retention_s=60)
    for session_id in ("open", "closed", "ended"):
        book.add(gate_session(session_id))
    book.close("closed")
    book.finish("ended", session_pb2.SessionUpdate(outcome=ACCEPT))
    assert sorted(s.session_id for s in book.still_open()) == ["closed", "open"]


def test_a_kiosk_adds_stop_lists_to_the_defaults_and_never_removes_one() -> None:
    assert session_stop_lists([], ["stop-a", "stop-b"]) == ["stop-a", "stop-b"]
    assert session_stop_lists(["stop-c", "stop-a"], ["stop-a", "stop-b"]) == ["stop-a", "stop-b", "stop-c"]
    # No default is every watchlist: a kiosk's lists would narrow the search, so they change nothing.
    assert session_stop_lists(["stop-c"], []) == []
    with pytest.raises(InvalidInput, match="empty name"):
        session_stop_lists([" "], ["stop-a"])


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
