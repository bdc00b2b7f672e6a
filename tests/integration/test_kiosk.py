"""The kiosk API (capture's KioskService) on a real gRPC server, with the real gallery (detection, embedding and
matching processes), the real broker and real photos; and ``sightline gate`` against it.

Decision's side of the contract is played here by publishing what decision publishes (PROGRESS and DECIDED events on
the sessions topic); the whole loop with the real decision service is tests/e2e/test_gate.py. The kiosks run in this
process and call the gallery as capture's own service principal (the ``session-`` prefix is reserved for it).
"""

from __future__ import annotations

import io
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from PIL import Image

from e2e.test_echannel_frames import frame_bytes
from integration.test_document_reading import LINE1, LINE2, LINE2_BAD_CHECK, render_page
from sightline.capture.kiosk.claims import SessionGallery
from sightline.capture.kiosk.kiosk import Kiosk
from sightline.capture.kiosk.servicer import KioskServicer
from sightline.capture.kiosk.session_store import GateSessionStore
from sightline.capture.service import Capture
from sightline.capture.settings import CaptureSettings
from sightline.cli.gate import open_request, run_session
from sightline.cli.main import main as cli
from sightline.common import codec
from sightline.common.auth import (
    SERVICE_CALLER_ROLES,
    Principal,
    dump_principals,
    hash_token,
    new_token,
    service_principal,
)
from sightline.common.bus import make_producer, read_topics
from sightline.common.config import KafkaSettings
from sightline.common.rpc import GrpcServer, channel
from sightline.common.topics import FRAMES, SESSIONS
from sightline.tooling.localstack import LocalStack
from sightline.v1 import events_pb2, gallery_pb2, gallery_pb2_grpc, session_pb2, session_pb2_grpc, types_pb2

BUDGET_S, GRACE_S = 30.0, 1.0  # the module's kiosk: long enough that no session expires under a slow test
CAPTURE_TOKEN = new_token()
KioskStub = session_pb2_grpc.KioskServiceStub
GalleryStub = gallery_pb2_grpc.GalleryServiceStub
Kind = session_pb2.SessionEvent
ACCEPT, REFER = session_pb2.SESSION_OUTCOME_ACCEPT, session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
CANCELLED = session_pb2.SESSION_OUTCOME_CANCELLED


def capture_tokens_file(folder: Path) -> Path:
    """A tokens file naming capture's principal with CAPTURE_TOKEN, for a stack this test's replicas call into."""
    tokens = folder / "capture.yaml"
    principal = Principal(service_principal("capture"), SERVICE_CALLER_ROLES["capture"], hash_token(CAPTURE_TOKEN))
    tokens.write_text(dump_principals([principal]))
    return tokens


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    # Capture's principal with a token this test knows, added to the stack's own (whose tokens stay private to it).
    tokens = capture_tokens_file(tmp_path_factory.mktemp("tokens"))
    with LocalStack(
        tmp_path_factory.mktemp("kiosk"),
        ports="auto",
        services=("detection", "embedding", "matching"),
        env={"SIGHTLINE_AUTH_TOKENS_FILE": str(tokens)},
    ) as running:
        running.start(timeout=120)
        yield running


@pytest.fixture(scope="module")
def kafka(stack: LocalStack) -> KafkaSettings:
    # 1 MiB, the smallest allowed: a frame too large to publish is then easy to make.
    return KafkaSettings(bootstrap_servers=stack.bootstrap_servers, fetch_max_wait_ms=25, max_message_bytes=1024 * 1024)


@pytest.fixture(scope="module")
def gallery(stack: LocalStack) -> GalleryStub:
    """The gallery as an officer sees it (the stack's admin principal)."""
    return GalleryStub(channel(stack.addresses["matching"]))


@pytest.fixture(scope="module")
def capture_gallery(stack: LocalStack) -> GalleryStub:
    """The gallery as capture calls it: the only principal that may enrol ``session-*`` subjects."""
    return GalleryStub(channel(stack.addresses["matching"], token=CAPTURE_TOKEN))


@dataclass
class RunningKiosk:
    kiosk: Kiosk
    capture: Capture
    server: GrpcServer

    @property
    def stub(self) -> KioskStub:
        return KioskStub(channel(f"127.0.0.1:{self.server.port}"))

    def stop(self) -> None:
        """As capture's main() stops: the server, the kiosk (open sessions stay in the store), then the producer."""
        self.server.stop(0)
        self.kiosk.close()
        self.capture.close()


def start_kiosk(
    stack: LocalStack,
    kafka: KafkaSettings,
    budget_s: float = BUDGET_S,
    grace_s: float = GRACE_S,
    start: bool = True,
    store_url: str | None = None,
) -> RunningKiosk:
    """A capture replica's kiosk on a real gRPC server; ``store_url``: its gate session store (None: a new one)."""
    settings = CaptureSettings(
        matching_addr=stack.addresses["matching"],
        session_budget_s=budget_s,
        session_grace_s=grace_s,
        default_stop_lists=["stop-a"],
        database_url=store_url or f"sqlite:///{stack.run_dir / f'capture-sessions-{uuid.uuid4().hex[:8]}.db'}",
    )
    capture = Capture(settings, kafka)
    gallery = SessionGallery(settings.matching_addr, settings.gallery_timeout_s, token=CAPTURE_TOKEN)
    kiosk = Kiosk(capture, settings, kafka, gallery)
    server = GrpcServer("127.0.0.1", 0)
    server.add(KioskServicer(kiosk))
    server.start()
    if start:
        kiosk.start()
    return RunningKiosk(kiosk, capture, server)


@contextmanager
def kiosk_running(stack: LocalStack, kafka: KafkaSettings, **settings: Any) -> Iterator[RunningKiosk]:
    running = start_kiosk(stack, kafka, **settings)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def kiosk(stack: LocalStack, kafka: KafkaSettings) -> Iterator[KioskStub]:
    with kiosk_running(stack, kafka) as running:
        yield running.stub


@pytest.fixture(scope="module")
def person(dlib_johns: Path) -> list[Path]:
    return sorted(sorted(p for p in dlib_johns.iterdir() if p.is_dir())[0].glob("*.jpg"))


@pytest.fixture(scope="module")
def traveller(gallery: GalleryStub, person: list[Path]) -> str:
    """An enrolled traveller, for subject claims."""
    enrol(gallery, "traveller-1", frame_bytes(person[-1], 0, 0))
    return "traveller-1"


def enrol(gallery: GalleryStub, subject_id: str, image: bytes) -> None:
    reply = gallery.Enroll(gallery_pb2.EnrollRequest(subject_id=subject_id, images=[image]), timeout=60)
    assert reply.templates_added == 1, reply


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def subject_exists(gallery: GalleryStub, subject_id: str) -> bool:
    try:
        gallery.GetSubject(gallery_pb2.GetSubjectRequest(subject_id=subject_id), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def wait_until_gone(gallery: GalleryStub, subject_id: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not subject_exists(gallery, subject_id):
            return True
        time.sleep(0.1)
    return False


def refused(call: Callable[..., object], request: Message) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    return caught.value


def now_ms() -> int:
    return int(time.time() * 1000) - 1000


def records(
    kafka: KafkaSettings, topic: str, since_ms: int, session_id: str, message_type: type[Message], count: int
) -> list[tuple[bytes, Any]]:
    """The first ``count`` (key, message) pairs of a session on a topic (read without a consumer group)."""
    found = []
    for record in read_topics(kafka, [topic], since_ms, idle_timeout_s=5):
        message = codec.parse(message_type, record.value)
        session = message.frame.session_id if message_type is events_pb2.FrameCaptured else message.session_id
        if session == session_id:
            found.append((record.key, message))
            if len(found) == count:
                break
    return found


def gate_events(kafka: KafkaSettings, since_ms: int, gate_id: str, count: int) -> list[session_pb2.SessionEvent]:
    """The first ``count`` session events of a gate (a session whose id the test does not know)."""
    found = []
    for record in read_topics(kafka, [SESSIONS.name], since_ms, idle_timeout_s=10):
        event = codec.parse(session_pb2.SessionEvent, record.value)
        if event.gate_id == gate_id:
            found.append(event)
            if len(found) == count:
                break
    return found


def publish_decision(kafka: KafkaSettings, gate_id: str, *events: session_pb2.SessionEvent) -> None:
    """What decision publishes: PROGRESS and DECIDED events on the sessions topic, keyed by gate id."""
    producer = make_producer(kafka)
    for event in events:
        producer.send(SESSIONS.name, key=gate_id.encode(), value=event.SerializeToString())
    producer.flush()
    producer.close()


def watch(kiosk: KioskStub, session_id: str, into: list[session_pb2.SessionUpdate]) -> threading.Thread:
    def run() -> None:
        into.extend(kiosk.WatchSession(session_pb2.WatchSessionRequest(session_id=session_id), timeout=30))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def outcome_of(kiosk: KioskStub, session_id: str) -> session_pb2.SessionUpdate:
    """The outcome of an ended session, as a kiosk watching late gets it."""
    updates = list(kiosk.WatchSession(session_pb2.WatchSessionRequest(session_id=session_id), timeout=30))
    assert len(updates) == 1, updates
    return updates[0]


# --- claims that cannot be used -------------------------------------------------------------------------------------


def test_an_unknown_subject_is_refused_saying_so(kiosk: KioskStub) -> None:
    error = refused(kiosk.OpenSession, session_pb2.OpenSessionRequest(gate_id="gate-1", subject_id="nobody-42"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'nobody-42' is not enrolled" in error.details()


@pytest.mark.parametrize("gate_id", ["", "gate 1", "gate:1"])
def test_a_bad_gate_id_is_refused(kiosk: KioskStub, gate_id: str) -> None:
    error = refused(kiosk.OpenSession, session_pb2.OpenSessionRequest(gate_id=gate_id, subject_id="x"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid gate id" in error.details()


def test_a_portrait_without_a_face_is_refused_with_the_gallery_reason(kiosk: KioskStub) -> None:
    blank = png_bytes(Image.new("RGB", (300, 400), (200, 190, 180)))
    error = refused(kiosk.OpenSession, session_pb2.OpenSessionRequest(gate_id="gate-1", portrait=blank))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "no usable face in the portrait: no face found in the image"


def test_a_document_page_with_a_wrong_check_digit_is_refused_with_the_mrz_reason(
    kiosk: KioskStub, face_photos: Path
) -> None:
    page = png_bytes(Image.fromarray(render_page(face_photos / "obama.jpg", (LINE1, LINE2_BAD_CHECK))))
    error = refused(kiosk.OpenSession, session_pb2.OpenSessionRequest(gate_id="gate-1", document_page=page))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("document page refused (mrz_check_failed): ")
    assert "document number check digit is 7, computed 6" in error.details()


def test_a_valid_document_page_gives_the_number_and_a_session_template(
    kiosk: KioskStub, gallery: GalleryStub, face_photos: Path
) -> None:
    page = png_bytes(Image.fromarray(render_page(face_photos / "obama.jpg", (LINE1, LINE2))))
    opened = kiosk.OpenSession(session_pb2.OpenSessionRequest(gate_id="gate-2", document_page=page), timeout=60)
    assert opened.claim_kind == session_pb2.CLAIM_KIND_DOCUMENT and opened.document_number == "L898902C3"
    assert opened.claim_subject_id == f"session-{opened.session_id}"
    assert subject_exists(gallery, opened.claim_subject_id)
    kiosk.CancelSession(session_pb2.CancelSessionRequest(session_id=opened.session_id, reason="test"), timeout=10)
    assert wait_until_gone(gallery, opened.claim_subject_id)


# --- a session from opening to outcome ------------------------------------------------------------------------------


def test_a_portrait_session_announces_itself_publishes_frames_relays_the_outcome_and_forgets_the_face(
    kiosk: KioskStub, gallery: GalleryStub, kafka: KafkaSettings, person: list[Path]
) -> None:
    since = now_ms()
    opened = kiosk.OpenSession(
        session_pb2.OpenSessionRequest(gate_id="gate-3", portrait=frame_bytes(person[-1], 0, 0)), timeout=60
    )
    sid, subject = opened.session_id, opened.claim_subject_id
    assert opened.claim_kind == session_pb2.CLAIM_KIND_PORTRAIT and subject == f"session-{sid}"
    assert subject_exists(gallery, subject)

    sent = [frame_bytes(person[i], 7 * i, 3 * i) for i in range(2)]
    replies = [kiosk.SendFrame(session_pb2.SendFrameRequest(session_id=sid, image=image), timeout=10) for image in sent]
    assert [r.frames_sent for r in replies] == [1, 2]
    assert [r.frame_id for r in replies] == [f"gate-3:{sid}:1", f"gate-3:{sid}:2"]

    ((key, opened_event),) = records(kafka, SESSIONS.name, since, sid, session_pb2.SessionEvent, 1)
    assert key == b"gate-3" and opened_event.kind == Kind.KIND_OPENED
    assert (opened_event.gate_id, opened_event.claim_kind, opened_event.claim_subject_id) == (
        "gate-3",
        session_pb2.CLAIM_KIND_PORTRAIT,
        subject,
    )
    budget = opened_event.deadline.ToNanoseconds() - opened_event.opened_at.ToNanoseconds()
    assert budget == pytest.approx(BUDGET_S * 1e9, abs=1e6)

    frames = records(kafka, FRAMES.name, since, sid, events_pb2.FrameCaptured, 2)
    assert [key for key, _ in frames] == [b"gate-3", b"gate-3"]
    for (_, captured), image, reply in zip(frames, sent, replies, strict=True):
        ref = captured.frame
        assert (ref.frame_id, ref.source_id, ref.purpose, ref.claim_subject_id, list(ref.watchlists)) == (
            reply.frame_id,
            "gate-3",
            types_pb2.PURPOSE_ECHANNEL,
            subject,
            ["stop-a"],
        )
        assert captured.image == image and captured.media_type == "image/jpeg"

    # The progress first: a watcher gets it whether it subscribes before the relay hands it over (live) or after
    # (as the latest progress). Once the watcher has it, it is subscribed, so the outcome cannot pass it by.
    progress = Kind(
        kind=Kind.KIND_PROGRESS,
        session_id=sid,
        gate_id="gate-3",
        update=session_pb2.SessionUpdate(session_id=sid, frames_seen=1),
    )
    decided = Kind(
        kind=Kind.KIND_DECIDED,
        session_id=sid,
        gate_id="gate-3",
        update=session_pb2.SessionUpdate(
            session_id=sid,
            outcome=ACCEPT,
            reasons=["2 good frames verified"],
            frames_seen=2,
            frames_verified=2,
            evidence_frame_ids=[r.frame_id for r in replies],
        ),
    )
    publish_decision(kafka, "gate-3", progress)
    updates = kiosk.WatchSession(session_pb2.WatchSessionRequest(session_id=sid), timeout=30)
    first = next(updates)
    assert (first.outcome, first.frames_seen) == (session_pb2.SESSION_OUTCOME_UNSPECIFIED, 1)
    publish_decision(kafka, "gate-3", decided)
    rest = list(updates)
    assert [u.outcome for u in rest] == [ACCEPT]
    assert rest[0].evidence_frame_ids == [r.frame_id for r in replies]

    error = refused(kiosk.SendFrame, session_pb2.SendFrameRequest(session_id=sid, image=sent[0]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "ended" in error.details()
    assert wait_until_gone(gallery, subject), "the session-scoped template outlived its session"
    assert outcome_of(kiosk, sid).outcome == ACCEPT  # a kiosk watching after the outcome still gets it


def test_a_cancelled_session_is_announced_ends_for_its_watchers_and_forgets_the_face(
    kiosk: KioskStub, gallery: GalleryStub, kafka: KafkaSettings, person: list[Path]
) -> None:
    since = now_ms()
    opened = kiosk.OpenSession(
        session_pb2.OpenSessionRequest(gate_id="gate-4", portrait=frame_bytes(person[-1], 0, 0), stop_lists=["stop-b"]),
        timeout=60,
    )
    updates: list[session_pb2.SessionUpdate] = []
    watcher = watch(kiosk, opened.session_id, updates)  # subscribed before or after the cancellation: the same
    kiosk.CancelSession(
        session_pb2.CancelSessionRequest(session_id=opened.session_id, reason="traveller left"), timeout=10
    )
    watcher.join(timeout=10)
    assert [(u.outcome, list(u.reasons)) for u in updates] == [(CANCELLED, ["traveller left"])]
    events = records(kafka, SESSIONS.name, since, opened.session_id, session_pb2.SessionEvent, 2)
    assert [e.kind for _, e in events] == [Kind.KIND_OPENED, Kind.KIND_CANCELLED]
    assert wait_until_gone(gallery, opened.claim_subject_id)


def test_closing_tells_decision_how_many_frames_were_published(
    kiosk: KioskStub, kafka: KafkaSettings, traveller: str, person: list[Path]
) -> None:
    since = now_ms()
    request = session_pb2.OpenSessionRequest(gate_id="gate-5", subject_id=traveller, stop_lists=["stop-b", "stop-a"])
    opened = kiosk.OpenSession(request, timeout=10)
    sid = opened.session_id
    assert (opened.claim_kind, opened.claim_subject_id) == (session_pb2.CLAIM_KIND_SUBJECT, traveller)
    noise = np.random.default_rng(5).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    too_large = png_bytes(Image.fromarray(noise))  # above the broker's 1 MiB: dead-lettered, never published

    def send(image: bytes) -> session_pb2.SendFrameResponse:
        return kiosk.SendFrame(session_pb2.SendFrameRequest(session_id=sid, image=image), timeout=10)

    first = send(frame_bytes(person[0], 0, 0))
    error = refused(kiosk.SendFrame, session_pb2.SendFrameRequest(session_id=sid, image=too_large))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "frame 2 was not published" in error.details()
    third = send(frame_bytes(person[1], 1, 1))
    assert (first.frames_sent, third.frames_sent) == (1, 2)
    assert third.frame_id == f"gate-5:{sid}:3"  # the failed frame's number is not reused

    kiosk.CloseSession(session_pb2.CloseSessionRequest(session_id=sid), timeout=10)
    error = refused(kiosk.SendFrame, session_pb2.SendFrameRequest(session_id=sid, image=b"\xff\xd8\xff"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in error.details()
    (_, _), (_, closed) = records(kafka, SESSIONS.name, since, sid, session_pb2.SessionEvent, 2)
    assert closed.kind == Kind.KIND_CLOSED and closed.update.frames_seen == 2  # decision waits for two results
    frames = records(kafka, FRAMES.name, since, sid, events_pb2.FrameCaptured, 2)
    # The kiosk's stop list is added to the configured one, which it cannot leave out.
    assert [list(f.frame.watchlists) for _, f in frames] == [["stop-a", "stop-b"]] * 2


def test_without_a_decision_the_traveller_is_referred_and_decision_told_the_session_is_cancelled(
    stack: LocalStack, kafka: KafkaSettings, gallery: GalleryStub, traveller: str
) -> None:
    since = now_ms()
    with kiosk_running(stack, kafka, budget_s=0.5, grace_s=0.5) as running:
        opened = running.stub.OpenSession(
            session_pb2.OpenSessionRequest(gate_id="gate-6", subject_id=traveller), timeout=10
        )
        updates = list(
            running.stub.WatchSession(session_pb2.WatchSessionRequest(session_id=opened.session_id), timeout=30)
        )
        received_at = time.time()
    assert [u.outcome for u in updates] == [REFER]
    assert updates[0].reasons[0].startswith("the decision did not arrive in time")
    assert received_at >= opened.deadline.ToNanoseconds() / 1e9 + 0.5, "referred before the deadline plus the grace"
    (_, _), (key, cancelled) = records(kafka, SESSIONS.name, since, opened.session_id, session_pb2.SessionEvent, 2)
    assert (key, cancelled.kind, cancelled.update.outcome) == (b"gate-6", Kind.KIND_CANCELLED, CANCELLED)
    assert list(cancelled.update.reasons) == [
        "the decision did not arrive in time: the gate referred the traveller to an officer"
    ]
    assert subject_exists(gallery, traveller), "an enrolled traveller's own templates are never touched"


def test_a_graceful_stop_leaves_the_open_sessions_and_their_templates_for_the_next_replica(
    stack: LocalStack, kafka: KafkaSettings, gallery: GalleryStub, person: list[Path]
) -> None:
    since = now_ms()
    store_url = f"sqlite:///{stack.run_dir / 'capture-sessions-graceful-stop.db'}"
    with kiosk_running(stack, kafka, store_url=store_url) as running:
        request = session_pb2.OpenSessionRequest(gate_id="gate-10", portrait=frame_bytes(person[-1], 0, 0))
        opened = running.stub.OpenSession(request, timeout=60)
        running.kiosk.close()  # what capture's main() does on SIGTERM
        assert subject_exists(gallery, opened.claim_subject_id), "the template of a session still open was deleted"
    with GateSessionStore.open(store_url) as store:
        (left,) = store.open_sessions()
    assert (left.session_id, left.closed, left.ended) == (opened.session_id, False, False)
    events = records(kafka, SESSIONS.name, since, opened.session_id, session_pb2.SessionEvent, 2)
    assert [e.kind for _, e in events] == [Kind.KIND_OPENED]  # decision is not told to cancel: the session goes on
    with kiosk_running(stack, kafka, store_url=store_url) as successor:  # the next replica ends it
        request = session_pb2.CancelSessionRequest(session_id=opened.session_id, reason="traveller left")
        successor.stub.CancelSession(request, timeout=10)
        assert wait_until_gone(gallery, opened.claim_subject_id)


def test_requests_for_unknown_sessions(kiosk: KioskStub) -> None:
    frame = refused(kiosk.SendFrame, session_pb2.SendFrameRequest(session_id="nope", image=b"\xff\xd8\xff"))
    assert frame.code() == grpc.StatusCode.FAILED_PRECONDITION
    watched = refused(
        lambda r, timeout: list(kiosk.WatchSession(r, timeout=timeout)),
        session_pb2.WatchSessionRequest(session_id="nope"),
    )
    assert watched.code() == grpc.StatusCode.NOT_FOUND


def test_leftover_session_templates_are_swept_at_start_up(
    stack: LocalStack, kafka: KafkaSettings, gallery: GalleryStub, capture_gallery: GalleryStub, person: list[Path]
) -> None:
    budget_s, grace_s = 1.0, 0.5
    image = frame_bytes(person[-1], 0, 0)
    enrol(capture_gallery, "session-leftover", image)
    created = gallery.GetSubject(gallery_pb2.GetSubjectRequest(subject_id="session-leftover"), timeout=10).created_at
    running = start_kiosk(stack, kafka, budget_s=budget_s, grace_s=grace_s, start=False)  # a replica after a crash
    try:
        # Older than any session of that replica can live; the next template is far younger when the sweep runs.
        time.sleep(max(0.0, created.ToNanoseconds() / 1e9 + budget_s + grace_s + 0.1 - time.time()))
        enrol(capture_gallery, "session-young", image)
        running.kiosk.start()
        assert wait_until_gone(gallery, "session-leftover")
        assert subject_exists(gallery, "session-young"), "a template that may belong to a live session was deleted"
    finally:
        running.stop()
        capture_gallery.DeleteSubject(gallery_pb2.DeleteSubjectRequest(subject_id="session-young"), timeout=10)


# --- sightline gate ---------------------------------------------------------------------------------------------------


def test_the_gate_cancels_its_session_when_a_frame_is_refused(
    kiosk: KioskStub, kafka: KafkaSettings, traveller: str, person: list[Path]
) -> None:
    since = now_ms()
    frames = [frame_bytes(person[0], 0, 0), b"GIF89a: not a frame"]
    with pytest.raises(grpc.RpcError) as failed:
        run_session(kiosk, open_request("gate-7", subject=traveller), frames, fps=20, timeout=30)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    opened, cancelled = gate_events(kafka, since, "gate-7", 2)
    assert (opened.kind, cancelled.kind) == (Kind.KIND_OPENED, Kind.KIND_CANCELLED)
    assert list(cancelled.update.reasons) == ["the gate failed: INVALID_ARGUMENT from capture"]
    assert outcome_of(kiosk, opened.session_id).outcome == CANCELLED


def test_the_gate_cancels_its_session_on_ctrl_c(
    kiosk: KioskStub, kafka: KafkaSettings, traveller: str, person: list[Path]
) -> None:
    def frames() -> Iterator[bytes]:
        yield frame_bytes(person[0], 0, 0)
        raise KeyboardInterrupt  # the operator presses Ctrl-C while the frames are sent

    since = now_ms()
    with pytest.raises(KeyboardInterrupt):
        run_session(kiosk, open_request("gate-8", subject=traveller), frames(), fps=20, timeout=30)
    opened, cancelled = gate_events(kafka, since, "gate-8", 2)
    assert (cancelled.kind, list(cancelled.update.reasons)) == (Kind.KIND_CANCELLED, ["the gate was interrupted"])
    assert outcome_of(kiosk, opened.session_id).outcome == CANCELLED


def test_the_gate_reports_a_broken_watch_and_exits_2(
    stack: LocalStack,
    kafka: KafkaSettings,
    traveller: str,
    person: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    frame = tmp_path / "frame.jpg"
    frame.write_bytes(frame_bytes(person[0], 0, 0))
    since = now_ms()
    codes: list[int] = []
    with kiosk_running(stack, kafka) as running:
        argv = [
            "gate",
            "--subject",
            traveller,
            str(frame),
            "--gate",
            "gate-9",
            "--timeout",
            "60",
            "--capture",
            f"127.0.0.1:{running.server.port}",
        ]
        gate = threading.Thread(target=lambda: codes.append(cli(argv)))
        gate.start()
        _, closed = gate_events(kafka, since, "gate-9", 2)  # the frame is sent and the session closed
        assert closed.kind == Kind.KIND_CLOSED
        running.server.stop(0)  # capture goes away while the gate waits for the outcome
        gate.join(timeout=30)
    assert codes == [2]
    error = capsys.readouterr().err
    said = rf"^error: watching session {closed.session_id} failed: (UNAVAILABLE|CANCELLED): "
    assert re.search(said, error, re.MULTILINE), error
