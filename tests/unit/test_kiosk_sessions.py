"""The kiosk's session book over its store (a real SQLite file, or PostgreSQL when reachable), its stop lists and the
gate command's frame loading (no services needed)."""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sightline.capture.kiosk.claims import Claim
from sightline.capture.kiosk.kiosk import check_gate_id, media_type_of, session_stop_lists
from sightline.capture.kiosk.session_book import SessionBook, Told
from sightline.capture.kiosk.session_store import (
    GateSession,
    GateSessionStore,
    SessionNotOpen,
    SessionStoreUnavailable,
    TooManySessions,
)
from sightline.cli.gate import UsageError, load_frames
from sightline.common.rpc import InvalidInput, NotFound
from sightline.v1 import session_pb2

ACCEPT = session_pb2.SESSION_OUTCOME_ACCEPT
REFER = session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER


@pytest.fixture()
def store(store_url: str) -> Iterator[GateSessionStore]:
    with GateSessionStore.open(store_url) as opened:
        yield opened


def make_book(store: GateSessionStore, max_sessions: int = 10, retention_s: float = 60.0) -> SessionBook:
    return SessionBook(store, max_sessions, retention_s, idle_s=120.0)


def gate_session(session_id: str, deadline_in: float = 10.0) -> GateSession:
    now = time.time()
    claim = Claim(session_pb2.CLAIM_KIND_PORTRAIT, f"session-{session_id}", session_scoped=True)
    return GateSession(session_id, "gate-1", claim, ["stop-a"], now, now + deadline_in)


def drain(updates: queue.SimpleQueue[Told]) -> list[Told]:
    found = []
    while not updates.empty():
        found.append(updates.get_nowait())
    return found


def send(book: SessionBook, session_id: str, published: bool = True) -> tuple[int, int | None]:
    """One frame through the book as the kiosk sends it: its sequence number, then the frames published so far."""
    session, sequence = book.next_frame(session_id)
    return sequence, book.frame_done(session, published)


def test_a_session_is_stored_as_opened_and_read_back_by_another_connection(
    store: GateSessionStore, store_url: str
) -> None:
    opened = gate_session("s1")
    make_book(store).add(opened)
    with GateSessionStore.open(store_url) as other:  # another replica's connection
        (found,) = other.open_sessions()
    assert (found.session_id, found.gate_id, found.claim, found.stop_lists) == (
        "s1",
        "gate-1",
        opened.claim,
        ["stop-a"],
    )
    assert found.opened_at == pytest.approx(opened.opened_at, abs=1e-6)
    assert found.deadline == pytest.approx(opened.deadline, abs=1e-6)  # the deadline runs on, it is not reset
    assert (found.frames_numbered, found.frames_sent, found.closed, found.ended) == (0, 0, False, False)


def test_frames_are_numbered_until_the_session_is_closed(store: GateSessionStore) -> None:
    book = make_book(store)
    book.add(gate_session("s1"))
    assert [send(book, "s1")[0] for _ in range(3)] == [1, 2, 3]
    assert book.close("s1").frames_sent == 3
    with pytest.raises(SessionNotOpen, match="closed"):
        book.next_frame("s1")
    with pytest.raises(SessionNotOpen, match="unknown"):
        book.next_frame("nope")


def test_two_books_on_one_store_number_a_sessions_frames_in_one_sequence(
    store: GateSessionStore, store_url: str
) -> None:
    book_a = make_book(store)
    book_a.add(gate_session("s1"))
    with GateSessionStore.open(store_url) as other:
        book_b = make_book(other)
        numbers: list[int] = []

        def sender(book: SessionBook) -> None:
            for _ in range(20):
                numbers.append(send(book, "s1")[0])

        threads = [threading.Thread(target=sender, args=(book,)) for book in (book_a, book_b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(numbers) == list(range(1, 41))  # unique and without a gap, whichever replica took them
        assert book_b.close("s1").frames_sent == 40


def test_only_published_frames_count_as_sent_and_no_number_is_reused(store: GateSessionStore) -> None:
    book = make_book(store)
    book.add(gate_session("s1"))
    assert send(book, "s1") == (1, 1)
    assert send(book, "s1", published=False) == (2, None)  # dead-lettered, or the broker did not take it
    assert send(book, "s1") == (3, 2)
    assert book.close("s1").frames_sent == 2  # what CLOSED tells decision to wait for


def test_closing_waits_for_a_frame_being_published_so_that_it_is_counted(store: GateSessionStore) -> None:
    book = make_book(store)
    book.add(gate_session("s1"))
    session, _ = book.next_frame("s1")
    closed: list[int] = []
    closer = threading.Thread(target=lambda: closed.append(book.close("s1", wait_s=30).frames_sent))
    closer.start()
    closer.join(timeout=0.3)
    assert closer.is_alive() and not closed, "close did not wait for the frame under way"
    book.frame_done(session, published=True)
    closer.join(timeout=10)
    assert closed == [1]


def test_closing_does_not_wait_past_its_bound(store: GateSessionStore) -> None:
    book = make_book(store)
    book.add(gate_session("s1"))
    book.next_frame("s1")  # a publication that never finishes
    assert book.close("s1", wait_s=0.05).frames_sent == 0


def test_open_sessions_include_closed_ones_waiting_for_their_outcome(store: GateSessionStore) -> None:
    book = make_book(store)
    for session_id in ("open", "closed", "ended"):
        book.add(gate_session(session_id))
    book.close("closed")
    book.finish("ended", session_pb2.SessionUpdate(outcome=ACCEPT))
    assert sorted(s.session_id for s in book.open_sessions()) == ["closed", "open"]


def test_watchers_get_progress_then_the_outcome_and_late_watchers_the_outcome_only(store: GateSessionStore) -> None:
    book = make_book(store)
    book.add(gate_session("s1"))
    _, early = book.subscribe("s1")
    book.progress("s1", session_pb2.SessionUpdate(session_id="s1", frames_seen=1))
    outcome = session_pb2.SessionUpdate(session_id="s1", outcome=ACCEPT, reasons=["2 good frames verified"])
    ended = book.finish("s1", outcome)
    assert ended is not None and ended.outcome == outcome
    assert book.finish("s1", outcome) is None  # ended once: a second outcome (decision's after a cancel) is ignored
    assert [(u.outcome, final) for u, final in drain(early)] == [
        (session_pb2.SESSION_OUTCOME_UNSPECIFIED, False),
        (ACCEPT, True),
    ]
    _, late = book.subscribe("s1")
    assert drain(late) == [(outcome, True)]
    with pytest.raises(SessionNotOpen, match="ended"):
        book.next_frame("s1")


def test_the_first_outcome_stands_and_another_replicas_watchers_are_told_it(
    store: GateSessionStore, store_url: str
) -> None:
    book_a = make_book(store)
    book_a.add(gate_session("s1"))
    with GateSessionStore.open(store_url) as other:
        book_b = make_book(other)
        _, watching_b = book_b.subscribe("s1")  # a kiosk watching through replica B
        late = session_pb2.SessionUpdate(session_id="s1", outcome=REFER, reasons=["the decision did not arrive"])
        assert book_a.finish("s1", late) is not None  # replica A expired it
        assert drain(watching_b) == []  # B learns it from the store, on its next sync
        book_b.sync()
        assert drain(watching_b) == [(late, True)]
        # Decision's outcome, arriving afterwards at B's relay, changes nothing: the gate has acted on the referral.
        assert book_b.finish("s1", session_pb2.SessionUpdate(session_id="s1", outcome=ACCEPT)) is None
        assert book_a.store.get("s1").outcome == late  # type: ignore[union-attr]


def test_overdue_sessions_and_purging_ended_ones(store: GateSessionStore) -> None:
    book = make_book(store, retention_s=0.0)
    book.add(gate_session("late", deadline_in=-2.0))
    book.add(gate_session("on-time"))
    assert [s.session_id for s in book.overdue(time.time(), grace_s=1.0)] == ["late"]
    book.finish("late", session_pb2.SessionUpdate(outcome=REFER))
    assert book.overdue(time.time(), grace_s=1.0) == []
    assert book.active_subjects() == {"session-on-time"}
    assert book.forget_ended(time.time() + 0.01) == 1
    with pytest.raises(NotFound):
        book.subscribe("late")
    assert [s.session_id for s in book.open_sessions()] == ["on-time"]


def test_the_open_session_limit_counts_every_replicas_sessions(store: GateSessionStore, store_url: str) -> None:
    make_book(store, max_sessions=1).add(gate_session("s1"))
    with GateSessionStore.open(store_url) as other:
        book_b = make_book(other, max_sessions=1)
        with pytest.raises(TooManySessions):
            book_b.add(gate_session("s2"))
        book_b.finish("s1", session_pb2.SessionUpdate(outcome=ACCEPT))
        book_b.add(gate_session("s2"))  # ended sessions do not count


def test_the_store_holds_ids_and_counts_never_images(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    with GateSessionStore.open(url) as store:
        book = make_book(store)
        book.add(gate_session("s1"))
        send(book, "s1")
        book.finish("s1", session_pb2.SessionUpdate(session_id="s1", outcome=ACCEPT, evidence_frame_ids=["g:s1:1"]))
    with sqlite3.connect(tmp_path / "sessions.db") as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(gate_sessions)")]
        blobs = [len(row[0]) for row in conn.execute("SELECT outcome FROM gate_sessions")]
    assert not {"image", "portrait", "document_page", "template", "descriptor"} & set(columns), columns
    assert blobs and max(blobs) < 200  # the outcome: ids and figures only


def test_a_store_that_does_not_answer_is_unavailable(tmp_path: Path) -> None:
    store = GateSessionStore.open(f"sqlite:///{tmp_path / 'sessions.db'}")
    store.close()
    with pytest.raises(SessionStoreUnavailable):  # the kiosk's call fails with UNAVAILABLE, not UNKNOWN
        make_book(store).next_frame("s1")


def test_a_kiosk_adds_stop_lists_to_the_defaults_and_never_removes_one() -> None:
    assert session_stop_lists([], ["stop-a", "stop-b"]) == ["stop-a", "stop-b"]
    assert session_stop_lists(["stop-c", "stop-a"], ["stop-a", "stop-b"]) == ["stop-a", "stop-b", "stop-c"]
    # No default is every watchlist: a kiosk's lists would narrow the search, so they change nothing.
    assert session_stop_lists(["stop-c"], []) == []
    with pytest.raises(InvalidInput, match="empty name"):
        session_stop_lists([" "], ["stop-a"])


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
