"""The kiosk API (capture's KioskService) on a real gRPC server, with the real gallery (detection, embedding and
matching processes), the real broker and real photos.

Decision's side of the contract is played here by publishing what decision publishes (PROGRESS and DECIDED events on
the sessions topic); the whole loop with the real decision service is tests/e2e/test_gate.py.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from PIL import Image

from e2e.test_echannel_frames import frame_bytes
from integration.test_document_reading import LINE1, LINE2, LINE2_BAD_CHECK, render_page
from sightline.capture.kiosk import Kiosk, KioskServicer
from sightline.capture.service import Capture
from sightline.capture.settings import CaptureSettings
from sightline.common import codec
from sightline.common.bus import make_producer, read_topics
from sightline.common.config import KafkaSettings
from sightline.common.localstack import LocalStack
from sightline.common.rpc import GrpcServer, channel
from sightline.common.topics import FRAMES, SESSIONS
from sightline.v1 import events_pb2, gallery_pb2, gallery_pb2_grpc, session_pb2, session_pb2_grpc, types_pb2

BUDGET_S, GRACE_S = 4.0, 1.0
KioskStub = session_pb2_grpc.KioskServiceStub
GalleryStub = gallery_pb2_grpc.GalleryServiceStub


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("kiosk"), ports="auto",
                    services=("detection", "embedding", "matching")) as running:  # fmt: skip
        running.start(timeout=120)
        yield running


@pytest.fixture(scope="module")
def kafka(stack: LocalStack) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=stack.bootstrap_servers, fetch_max_wait_ms=25)


@pytest.fixture(scope="module")
def gallery(stack: LocalStack) -> GalleryStub:
    return GalleryStub(channel(stack.addresses["matching"]))


def start_kiosk(stack: LocalStack, kafka: KafkaSettings, stop: threading.Event) -> tuple[GrpcServer, Kiosk]:
    settings = CaptureSettings(matching_addr=stack.addresses["matching"], session_budget_s=BUDGET_S,
                               session_grace_s=GRACE_S, default_stop_lists=["stop-a"])  # fmt: skip
    kiosk = Kiosk(Capture(settings, kafka), settings, kafka)
    server = GrpcServer("127.0.0.1", 0)
    server.add(session_pb2_grpc.add_KioskServiceServicer_to_server, KioskServicer(kiosk), "sightline.v1.KioskService")
    server.start()
    kiosk.start(stop)
    return server, kiosk


@pytest.fixture(scope="module")
def kiosk(stack: LocalStack, kafka: KafkaSettings) -> Iterator[KioskStub]:
    stop = threading.Event()
    server, _ = start_kiosk(stack, kafka, stop)
    yield KioskStub(channel(f"127.0.0.1:{server.port}"))
    stop.set()
    server.stop(0)


@pytest.fixture(scope="module")
def person(dlib_johns: Path) -> list[Path]:
    return sorted(sorted(p for p in dlib_johns.iterdir() if p.is_dir())[0].glob("*.jpg"))


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


def records(kafka: KafkaSettings, topic: str, since_ms: int, session_id: str, message_type: type[Message],
            count: int) -> list[tuple[bytes, Any]]:  # fmt: skip
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


def test_a_document_page_with_a_wrong_check_digit_is_refused_with_the_mrz_reason(kiosk: KioskStub,
                                                                                face_photos: Path) -> None:
    page = png_bytes(Image.fromarray(render_page(face_photos / "obama.jpg", (LINE1, LINE2_BAD_CHECK))))
    error = refused(kiosk.OpenSession, session_pb2.OpenSessionRequest(gate_id="gate-1", document_page=page))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("document page refused (mrz_check_failed): ")
    assert "document number check digit is 7, computed 6" in error.details()


def test_a_valid_document_page_gives_the_number_and_a_session_template(kiosk: KioskStub, gallery: GalleryStub,
                                                                     face_photos: Path) -> None:
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
    since = int(time.time() * 1000) - 1000
    opened = kiosk.OpenSession(session_pb2.OpenSessionRequest(gate_id="gate-3", portrait=frame_bytes(person[-1], 0, 0)),
                               timeout=60)  # fmt: skip
    sid, subject = opened.session_id, opened.claim_subject_id
    assert opened.claim_kind == session_pb2.CLAIM_KIND_PORTRAIT and subject == f"session-{sid}"
    assert subject_exists(gallery, subject)

    sent = [frame_bytes(person[i], 7 * i, 3 * i) for i in range(2)]
    replies = [kiosk.SendFrame(session_pb2.SendFrameRequest(session_id=sid, image=image), timeout=10) for image in sent]
    assert [r.frames_sent for r in replies] == [1, 2]
    assert [r.frame_id for r in replies] == [f"gate-3:{sid}:1", f"gate-3:{sid}:2"]

    (key, opened_event), = records(kafka, SESSIONS.name, since, sid, session_pb2.SessionEvent, 1)
    assert key == b"gate-3" and opened_event.kind == session_pb2.SessionEvent.KIND_OPENED
    assert (opened_event.gate_id, opened_event.claim_kind, opened_event.claim_subject_id) == (
        "gate-3", session_pb2.CLAIM_KIND_PORTRAIT, subject)
    budget = opened_event.deadline.ToNanoseconds() - opened_event.opened_at.ToNanoseconds()
    assert budget == pytest.approx(BUDGET_S * 1e9, abs=1e6)

    frames = records(kafka, FRAMES.name, since, sid, events_pb2.FrameCaptured, 2)
    assert [key for key, _ in frames] == [b"gate-3", b"gate-3"]
    for (_, captured), image, reply in zip(frames, sent, replies, strict=True):
        ref = captured.frame
        assert (ref.frame_id, ref.source_id, ref.purpose, ref.claim_subject_id, list(ref.watchlists)) == (
            reply.frame_id, "gate-3", types_pb2.PURPOSE_ECHANNEL, subject, ["stop-a"])
        assert captured.image == image and captured.media_type == "image/jpeg"

    updates: list[session_pb2.SessionUpdate] = []
    watcher = watch(kiosk, sid, updates)
    time.sleep(0.3)
    progress = session_pb2.SessionEvent(kind=session_pb2.SessionEvent.KIND_PROGRESS, session_id=sid, gate_id="gate-3",
                                        update=session_pb2.SessionUpdate(session_id=sid, frames_seen=1))  # fmt: skip
    decided = session_pb2.SessionEvent(kind=session_pb2.SessionEvent.KIND_DECIDED, session_id=sid, gate_id="gate-3",
                                       update=session_pb2.SessionUpdate(
                                           session_id=sid, outcome=session_pb2.SESSION_OUTCOME_ACCEPT,
                                           reasons=["2 good frames verified"], frames_seen=2, frames_verified=2,
                                           evidence_frame_ids=[r.frame_id for r in replies]))  # fmt: skip
    publish_decision(kafka, "gate-3", progress, decided)
    watcher.join(timeout=10)
    assert not watcher.is_alive()
    assert [u.outcome for u in updates] == [session_pb2.SESSION_OUTCOME_UNSPECIFIED, session_pb2.SESSION_OUTCOME_ACCEPT]
    assert updates[-1].evidence_frame_ids == [r.frame_id for r in replies]

    error = refused(kiosk.SendFrame, session_pb2.SendFrameRequest(session_id=sid, image=sent[0]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "ended" in error.details()
    assert wait_until_gone(gallery, subject), "the session-scoped template outlived its session"
    late: list[session_pb2.SessionUpdate] = []
    watch(kiosk, sid, late).join(timeout=10)  # a kiosk watching after the outcome still gets it
    assert [u.outcome for u in late] == [session_pb2.SESSION_OUTCOME_ACCEPT]


def test_a_cancelled_session_is_announced_ends_for_its_watchers_and_forgets_the_face(
    kiosk: KioskStub, gallery: GalleryStub, kafka: KafkaSettings, person: list[Path]
) -> None:
    since = int(time.time() * 1000) - 1000
    opened = kiosk.OpenSession(session_pb2.OpenSessionRequest(gate_id="gate-4", portrait=frame_bytes(person[-1], 0, 0),
                                                              stop_lists=["stop-b"]), timeout=60)  # fmt: skip
    updates: list[session_pb2.SessionUpdate] = []
    watcher = watch(kiosk, opened.session_id, updates)
    kiosk.CancelSession(session_pb2.CancelSessionRequest(session_id=opened.session_id, reason="traveller left"),
                        timeout=10)  # fmt: skip
    watcher.join(timeout=10)
    cancelled = (session_pb2.SESSION_OUTCOME_CANCELLED, ["traveller left"])
    assert [(u.outcome, list(u.reasons)) for u in updates] == [cancelled]
    events = records(kafka, SESSIONS.name, since, opened.session_id, session_pb2.SessionEvent, 2)
    kinds = [session_pb2.SessionEvent.KIND_OPENED, session_pb2.SessionEvent.KIND_CANCELLED]
    assert [e.kind for _, e in events] == kinds
    assert wait_until_gone(gallery, opened.claim_subject_id)


def test_closing_tells_decision_how_many_frames_to_wait_for(kiosk: KioskStub, gallery: GalleryStub,
                                                            kafka: KafkaSettings, person: list[Path]) -> None:
    gallery.Enroll(gallery_pb2.EnrollRequest(subject_id="traveller-close", images=[frame_bytes(person[-1], 0, 0)]),
                   timeout=60)  # fmt: skip
    since = int(time.time() * 1000) - 1000
    request = session_pb2.OpenSessionRequest(gate_id="gate-5", subject_id="traveller-close")
    opened = kiosk.OpenSession(request, timeout=10)
    assert (opened.claim_kind, opened.claim_subject_id) == (session_pb2.CLAIM_KIND_SUBJECT, "traveller-close")
    for i in range(3):
        kiosk.SendFrame(session_pb2.SendFrameRequest(session_id=opened.session_id, image=frame_bytes(person[i], i, i)),
                        timeout=10)  # fmt: skip
    kiosk.CloseSession(session_pb2.CloseSessionRequest(session_id=opened.session_id), timeout=10)
    error = refused(kiosk.SendFrame, session_pb2.SendFrameRequest(session_id=opened.session_id, image=b"\xff\xd8\xff"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in error.details()
    (_, _), (_, closed) = records(kafka, SESSIONS.name, since, opened.session_id, session_pb2.SessionEvent, 2)
    assert closed.kind == session_pb2.SessionEvent.KIND_CLOSED and closed.update.frames_seen == 3


def test_without_a_decision_the_kiosk_is_told_it_did_not_arrive_in_time(kiosk: KioskStub, gallery: GalleryStub,
                                                                          person: list[Path]) -> None:
    gallery.Enroll(gallery_pb2.EnrollRequest(subject_id="traveller-late", images=[frame_bytes(person[-1], 0, 0)]),
                   timeout=60)  # fmt: skip
    request = session_pb2.OpenSessionRequest(gate_id="gate-6", subject_id="traveller-late")
    opened = kiosk.OpenSession(request, timeout=10)
    started = time.monotonic()
    updates = list(kiosk.WatchSession(session_pb2.WatchSessionRequest(session_id=opened.session_id), timeout=30))
    waited = time.monotonic() - started
    assert [u.outcome for u in updates] == [session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER]
    assert updates[0].reasons[0].startswith("the decision did not arrive in time")
    assert BUDGET_S + GRACE_S - 0.5 < waited < BUDGET_S + GRACE_S + 5
    assert subject_exists(gallery, "traveller-late"), "an enrolled traveller's own templates are never touched"


def test_requests_for_unknown_sessions(kiosk: KioskStub) -> None:
    frame = refused(kiosk.SendFrame, session_pb2.SendFrameRequest(session_id="nope", image=b"\xff\xd8\xff"))
    assert frame.code() == grpc.StatusCode.FAILED_PRECONDITION
    watched = refused(lambda r, timeout: list(kiosk.WatchSession(r, timeout=timeout)),
                      session_pb2.WatchSessionRequest(session_id="nope"))  # fmt: skip
    assert watched.code() == grpc.StatusCode.NOT_FOUND


def test_leftover_session_templates_are_swept_at_start_up(stack: LocalStack, kafka: KafkaSettings, gallery: GalleryStub,
                                                          person: list[Path]) -> None:
    image = frame_bytes(person[-1], 0, 0)
    gallery.Enroll(gallery_pb2.EnrollRequest(subject_id="session-leftover", images=[image]), timeout=60)
    time.sleep(BUDGET_S + GRACE_S + 0.5)  # older than any session can live
    gallery.Enroll(gallery_pb2.EnrollRequest(subject_id="session-young", images=[image]), timeout=60)
    stop = threading.Event()
    server, _ = start_kiosk(stack, kafka, stop)  # a capture replica starting after a crash
    try:
        assert wait_until_gone(gallery, "session-leftover")
        assert subject_exists(gallery, "session-young"), "a template that may belong to a live session was deleted"
    finally:
        stop.set()
        server.stop(0)
