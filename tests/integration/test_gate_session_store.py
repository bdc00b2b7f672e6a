"""Gate sessions survive a capture restart and move between capture replicas: the shared gate session store.

The whole stack runs as separate processes (broker, detection, embedding, matching, decision and capture, whose gate
sessions are in ``<run dir>/capture-sessions.db``); a second capture replica runs in this process, on the same store,
behind its own real gRPC server. Travellers are dlib's "johns": one photo enrolled, the others composed into camera
frames with small shifts, so the real decision service decides each session (liveness needs 10 frames).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from e2e.test_echannel_frames import frame_bytes
from integration.test_kiosk import capture_tokens_file, kiosk_running, subject_exists, wait_until_gone
from sightline.capture.kiosk.kiosk import LATE_REASON, RELAY_SKEW_MS
from sightline.capture.kiosk.session_store import GateSessionStore
from sightline.common import codec
from sightline.common.bus import read_topics
from sightline.common.config import KafkaSettings
from sightline.common.rpc import channel
from sightline.common.topics import SESSIONS
from sightline.tooling.localstack import CAPTURE_DB, LocalStack
from sightline.v1 import gallery_pb2, gallery_pb2_grpc, session_pb2, session_pb2_grpc

FPS = 10.0
BUDGET_S = 40.0  # a restart of capture on a busy machine fits well inside it
ACCEPT = session_pb2.SESSION_OUTCOME_ACCEPT
Kind = session_pb2.SessionEvent
KioskStub = session_pb2_grpc.KioskServiceStub


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    # The in-process replica calls the gallery as capture's principal, with a token this test knows.
    tokens = capture_tokens_file(tmp_path_factory.mktemp("tokens"))
    env = {"SIGHTLINE_AUTH_TOKENS_FILE": str(tokens), "SIGHTLINE_CAPTURE_SESSION_BUDGET_S": str(BUDGET_S)}
    with LocalStack(tmp_path_factory.mktemp("gatestore"), ports="auto", env=env) as running:
        running.start(timeout=180)
        yield running


@pytest.fixture(scope="module")
def kafka(stack: LocalStack) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=stack.bootstrap_servers, fetch_max_wait_ms=25)


@pytest.fixture(scope="module")
def store_url(stack: LocalStack) -> str:
    """The stack's capture process's gate session store: the in-process replica shares it."""
    return f"sqlite:///{stack.run_dir / CAPTURE_DB}"


@pytest.fixture(scope="module")
def capture(stack: LocalStack) -> KioskStub:
    """The kiosk's channel to the capture process (it reconnects by itself after a restart)."""
    return KioskStub(channel(stack.addresses["capture"]))


@pytest.fixture(scope="module")
def gallery(stack: LocalStack) -> gallery_pb2_grpc.GalleryServiceStub:
    return gallery_pb2_grpc.GalleryServiceStub(channel(stack.addresses["matching"]))


@pytest.fixture(scope="module")
def photos(dlib_johns: Path) -> list[Path]:
    return sorted(sorted(p for p in dlib_johns.iterdir() if p.is_dir())[0].glob("*.jpg"))


@pytest.fixture(scope="module")
def traveller(gallery: gallery_pb2_grpc.GalleryServiceStub, photos: list[Path]) -> str:
    request = gallery_pb2.EnrollRequest(subject_id="traveller-0", images=[frame_bytes(photos[-1], 0, 0)])
    assert gallery.Enroll(request, timeout=120).templates_added == 1
    return "traveller-0"


def camera_frames(photos: list[Path], count: int = 14) -> list[bytes]:
    """Different photos of the traveller moving a little in front of the camera (the enrolled photo left out)."""
    return [frame_bytes(photos[i % (len(photos) - 1)], (i % 4) * 6 - 9, (i % 3) * 4 - 4) for i in range(count)]


@dataclass
class Watch:
    """A kiosk's WatchSession, on a thread: every update it got, and whether the outcome came."""

    stub: KioskStub
    session_id: str
    updates: list[session_pb2.SessionUpdate] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: grpc.RpcError | None = None

    def __post_init__(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        request = session_pb2.WatchSessionRequest(session_id=self.session_id)
        try:
            for update in self.stub.WatchSession(request, timeout=90, wait_for_ready=True):
                self.updates.append(update)
        except grpc.RpcError as exc:
            self.error = exc
        self.done.set()

    def outcome(self, timeout: float = 60.0) -> session_pb2.SessionUpdate:
        assert self.done.wait(timeout), "no outcome reached the kiosk"
        assert self.error is None, self.error
        assert self.updates and self.updates[-1].outcome != session_pb2.SESSION_OUTCOME_UNSPECIFIED, self.updates
        return self.updates[-1]


def send(stubs: list[KioskStub], session_id: str, frames: list[bytes], until: threading.Event) -> list[str]:
    """Send the frames at FPS, each through the next of ``stubs`` in turn, until ``until`` is set or the session no
    longer takes frames (decided); the frame ids capture gave them."""
    frame_ids = []
    for index, frame in enumerate(frames):
        if until.wait(1 / FPS):
            break
        request = session_pb2.SendFrameRequest(session_id=session_id, image=frame)
        try:
            reply = stubs[index % len(stubs)].SendFrame(request, timeout=30, wait_for_ready=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # decided meanwhile
                break
            raise
        frame_ids.append(reply.frame_id)
    return frame_ids


def close_unless_decided(stub: KioskStub, session_id: str, decided: threading.Event) -> None:
    if decided.is_set():
        return
    try:
        stub.CloseSession(session_pb2.CloseSessionRequest(session_id=session_id), timeout=30, wait_for_ready=True)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc  # decided in between


def session_events(kafka: KafkaSettings, since_ms: int, session_id: str) -> list[session_pb2.SessionEvent]:
    """Every event of the session on the sessions topic (until the topic is quiet for 3 s)."""
    found = []
    for record in read_topics(kafka, [SESSIONS.name], since_ms, idle_timeout_s=3):
        event = codec.parse(session_pb2.SessionEvent, record.value)
        if event.session_id == session_id:
            found.append(event)
    return found


def assert_decided_once_by_decision(kafka: KafkaSettings, since_ms: int, session_id: str) -> None:
    kinds = [event.kind for event in session_events(kafka, since_ms, session_id)]
    assert kinds.count(Kind.KIND_OPENED) == 1 and kinds.count(Kind.KIND_DECIDED) == 1, kinds
    assert Kind.KIND_CANCELLED not in kinds, kinds  # neither expired nor cancelled by a stopping replica


def assert_numbered_in_one_sequence(frame_ids: list[str], gate_id: str, session_id: str) -> None:
    assert frame_ids == [f"{gate_id}:{session_id}:{n}" for n in range(1, len(frame_ids) + 1)], frame_ids


def assert_accepted(outcome: session_pb2.SessionUpdate) -> None:
    assert outcome.outcome == ACCEPT, list(outcome.reasons)
    assert any("verified against the claim" in r for r in outcome.reasons), list(outcome.reasons)
    assert not any(r.startswith(LATE_REASON) for r in outcome.reasons), list(outcome.reasons)


@pytest.mark.parametrize("stop", ["restart", "crash"])
def test_a_session_opened_before_a_capture_restart_is_continued_and_decided_after_it(
    stack: LocalStack, kafka: KafkaSettings, capture: KioskStub, traveller: str, photos: list[Path], stop: str
) -> None:
    gate_id = f"gate-{stop}"
    since_ms = int(time.time() * 1000) - 1000
    opened = capture.OpenSession(session_pb2.OpenSessionRequest(gate_id=gate_id, subject_id=traveller), timeout=60)
    sid = opened.session_id
    frames = camera_frames(photos)
    not_yet = threading.Event()
    before = send([capture], sid, frames[:4], not_yet)
    if stop == "crash":  # no graceful stop at all: the session is only in the store
        os.kill(stack.pids["capture"], signal.SIGKILL)
    stack.restart("capture")  # a graceful stop first, unless killed already
    watch = Watch(capture, sid)  # the kiosk watches again, through the restarted process
    after = send([capture], sid, frames[4:], watch.done)
    close_unless_decided(capture, sid, watch.done)
    outcome = watch.outcome()
    assert_accepted(outcome)
    assert_numbered_in_one_sequence(before + after, gate_id, sid)  # the numbers go on where they stopped
    assert set(before) & set(outcome.evidence_frame_ids), "the frames sent before the restart were not counted"
    assert time.time() < opened.deadline.ToNanoseconds() / 1e9, "decided only after the deadline"
    assert_decided_once_by_decision(kafka, since_ms, sid)


def test_two_replicas_on_one_store_serve_one_kiosk_alternately(
    stack: LocalStack, kafka: KafkaSettings, capture: KioskStub, store_url: str, traveller: str, photos: list[Path]
) -> None:
    since_ms = int(time.time() * 1000) - 1000
    with kiosk_running(stack, kafka, budget_s=BUDGET_S, store_url=store_url) as replica:
        other = replica.stub
        opened = other.OpenSession(session_pb2.OpenSessionRequest(gate_id="gate-ab", subject_id=traveller), timeout=60)
        sid = opened.session_id
        watches = [Watch(capture, sid), Watch(other, sid)]  # a session opened on one replica, watched on both
        frame_ids = send([capture, other], sid, camera_frames(photos), watches[0].done)
        close_unless_decided(capture, sid, watches[0].done)
        outcomes = [watch.outcome() for watch in watches]
        late = list(capture.WatchSession(session_pb2.WatchSessionRequest(session_id=sid), timeout=30))
    assert_accepted(outcomes[0])
    assert outcomes[1] == outcomes[0] and late == [outcomes[0]]  # one outcome, whichever replica tells it
    assert_numbered_in_one_sequence(frame_ids, "gate-ab", sid)
    assert len(frame_ids) >= 10 and outcomes[0].frames_seen >= 10  # both replicas' frames, decision counted
    assert_decided_once_by_decision(kafka, since_ms, sid)


def test_the_store_holds_no_image_of_the_traveller(
    stack: LocalStack,
    kafka: KafkaSettings,
    capture: KioskStub,
    gallery: gallery_pb2_grpc.GalleryServiceStub,
    store_url: str,
    photos: list[Path],
) -> None:
    portrait = frame_bytes(photos[-1], 0, 0)
    frames = camera_frames(photos)
    db_file = stack.run_dir / CAPTURE_DB
    with kiosk_running(stack, kafka, budget_s=BUDGET_S, store_url=store_url) as replica:
        opened = replica.stub.OpenSession(
            session_pb2.OpenSessionRequest(gate_id="gate-portrait", portrait=portrait), timeout=60
        )
        sid, subject = opened.session_id, opened.claim_subject_id
        watch = Watch(capture, sid)
        send([replica.stub, capture], sid, frames, watch.done)
        close_unless_decided(replica.stub, sid, watch.done)
        open_contents = db_file.read_bytes()  # while the session may still be open, then once it has ended
        assert_accepted(watch.outcome())
        assert wait_until_gone(gallery, subject), "the session-scoped template outlived its session"
    for contents in (open_contents, db_file.read_bytes()):
        for image in (portrait, *frames):
            assert image[:64] not in contents and image[-64:] not in contents
        assert b"JFIF" not in contents and b"\x89PNG" not in contents and b"Exif" not in contents
    with GateSessionStore.open(store_url) as store:
        stored = store.get(sid)
    assert stored is not None and stored.claim.subject_id == subject and stored.claim.session_scoped
    assert stored.outcome is not None and stored.outcome.outcome == ACCEPT
    with sqlite3.connect(db_file) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(gate_sessions)")}
        largest = conn.execute("SELECT MAX(LENGTH(outcome)) FROM gate_sessions").fetchone()[0]
    assert not {"image", "portrait", "document_page", "template", "descriptor"} & columns, columns
    assert largest < 1024, "an outcome is ids and figures: far smaller than any image"
    assert not subject_exists(gallery, subject)


def test_an_outcome_published_while_no_replica_runs_reaches_the_session_after_the_restart(
    stack: LocalStack, kafka: KafkaSettings, traveller: str, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'sessions.db'}"  # not the capture process's: no replica reads meanwhile
    since_ms = int(time.time() * 1000) - 1000
    with kiosk_running(stack, kafka, budget_s=1.0, grace_s=0.5, store_url=store_url) as replica:
        request = session_pb2.OpenSessionRequest(gate_id="gate-down", subject_id=traveller)
        sid = replica.stub.OpenSession(request, timeout=60).session_id
    # No frame came: decision times the session out at its deadline, while no capture replica reads its outcome.
    decided = wait_for_event(kafka, since_ms, sid, Kind.KIND_DECIDED)
    # Older than the relay's usual look-back (RELAY_SKEW_MS), and the deadline plus the grace long past: a replica
    # reading only what comes after its start would expire the session as having no outcome.
    time.sleep(RELAY_SKEW_MS / 1000 + 1.0)
    with kiosk_running(stack, kafka, budget_s=1.0, grace_s=0.5, store_url=store_url) as successor:
        updates = list(successor.stub.WatchSession(session_pb2.WatchSessionRequest(session_id=sid), timeout=30))
    assert updates[-1] == decided.update  # decision's own outcome and reasons, not "did not arrive in time"
    assert all(u.outcome == session_pb2.SESSION_OUTCOME_UNSPECIFIED for u in updates[:-1])  # replayed progress
    assert Kind.KIND_CANCELLED not in [event.kind for event in session_events(kafka, since_ms, sid)]


def wait_for_event(kafka: KafkaSettings, since_ms: int, session_id: str, kind: int) -> session_pb2.SessionEvent:
    for record in read_topics(kafka, [SESSIONS.name], since_ms, idle_timeout_s=30):
        event = codec.parse(session_pb2.SessionEvent, record.value)
        if event.session_id == session_id and event.kind == kind:
            return event
    raise AssertionError(f"no {Kind.Kind.Name(kind)} event for session {session_id}")
