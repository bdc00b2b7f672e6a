"""Capture's KioskService: e-channel gate sessions, from the traveller's claim to the gate's outcome.

A kiosk (the gate's controller) speaks gRPC only. ``OpenSession`` turns its claim into the subject the frames are
verified against: an enrolled traveller (checked in the gallery), or a session-scoped template enrolled from the chip
portrait or from the portrait of a photographed data page (whose MRZ gives the document number). Capture then announces
the session on ``sightline.sessions.v1`` (OPENED, with its deadline), publishes each ``SendFrame`` image as an
e-channel frame (never dropped under load) on the frames topic, keyed by the gate id like every session event, and
announces CLOSED or CANCELLED. Decision fuses the frames' match results and publishes PROGRESS and DECIDED on the
sessions topic; one background reader of that topic hands them to the kiosks watching (``WatchSession``). When no
outcome arrives by the deadline plus a grace, the kiosk is told so and the traveller is referred to an officer.

Nothing about the traveller outlives the session: a session-scoped template is deleted when the session ends
(decided, cancelled or expired), and leftovers of a capture process that stopped mid-session are swept at start-up and
periodically. Sessions live in this process's memory (bounded, expiring): a kiosk keeps talking to the replica it
opened its session on (one gRPC channel does).
"""

from __future__ import annotations

import functools
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import numpy as np
from kafka.errors import KafkaError

from sightline.common import codec, tracing
from sightline.common.bus import read_topics
from sightline.common.config import KafkaSettings
from sightline.common.images import ImageError, decode_image, encode_jpeg
from sightline.common.rpc import InvalidInput, NotFound, Unavailable, channel, rpc_errors
from sightline.common.topics import SESSIONS
from sightline.capture.settings import CaptureSettings
from sightline.capture.sources import RawFrame
from sightline.v1 import gallery_pb2, gallery_pb2_grpc, session_pb2, session_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from sightline.capture.service import Capture  # which registers this module's servicer

log = logging.getLogger(__name__)

SESSION_SUBJECT_PREFIX = "session-"
_GATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MEDIA_TYPES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"))
PORTRAIT_MARGIN = 0.35  # of the portrait's size, kept around it when it is cut out of the page
SWEEP_EVERY_S = 0.25
PUBLISH_TIMEOUT_S = 10.0

Event = session_pb2.SessionEvent
Update = session_pb2.SessionUpdate
Context = grpc.ServicerContext


class SessionNotOpen(RuntimeError):
    """The session is unknown here, closed or ended; becomes FAILED_PRECONDITION."""


class TooManySessions(RuntimeError):
    """The in-memory session limit is reached; becomes RESOURCE_EXHAUSTED."""


# --- claims --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    kind: int  # session_pb2.ClaimKind
    subject_id: str
    document_number: str = ""
    session_scoped: bool = False  # a template enrolled for this session only, deleted when it ends


class SessionGallery:
    """The gallery calls a session needs: check a subject, enrol and delete session-scoped templates."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self._address = address
        self._timeout = timeout_s
        self._stub = gallery_pb2_grpc.GalleryServiceStub(channel(address))

    def check_enrolled(self, subject_id: str) -> None:
        try:
            self._stub.GetSubject(gallery_pb2.GetSubjectRequest(subject_id=subject_id), timeout=self._timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise InvalidInput(f"subject {subject_id!r} is not enrolled: a subject claim needs an enrolled "
                                   "traveller") from None  # fmt: skip
            raise self._error(exc) from None

    def enroll_portrait(self, subject_id: str, image: bytes, session_id: str) -> None:
        """Enrol the session's reference face; InvalidInput naming the gallery's reason when it has no usable face."""
        purpose = f"e-channel session {session_id} (deleted when it ends)"
        request = gallery_pb2.EnrollRequest(subject_id=subject_id, images=[image], purpose=purpose)
        try:
            reply = self._stub.Enroll(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        if not reply.templates_added:
            reason = reply.results[0].reason if reply.results else "no face found"
            raise InvalidInput(f"no usable face in the portrait: {reason}")

    def delete(self, subject_id: str) -> None:
        try:
            self._stub.DeleteSubject(gallery_pb2.DeleteSubjectRequest(subject_id=subject_id), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def session_subjects(self, older_than: float) -> list[str]:
        """Ids of session-scoped subjects created before ``older_than`` (epoch seconds)."""
        found, after = [], SESSION_SUBJECT_PREFIX
        while True:
            # Keyset pagination by subject id (the page token is the last id): starting right after the prefix
            # reads only the session-scoped subjects, however large the gallery.
            request = gallery_pb2.ListSubjectsRequest(page_size=500, page_token=after)
            try:
                reply = self._stub.ListSubjects(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                raise self._error(exc) from None
            for subject in reply.subjects:
                if not subject.subject_id.startswith(SESSION_SUBJECT_PREFIX):
                    return found
                if subject.created_at.ToNanoseconds() / 1e9 < older_than:
                    found.append(subject.subject_id)
            if not reply.next_page_token:
                return found
            after = reply.next_page_token

    def _error(self, exc: grpc.RpcError) -> Exception:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput(exc.details())
        if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return Unavailable(f"the gallery (matching at {self._address}) refused capture's call: {exc.details()} "
                               "(capture's token needs the enroller role for session templates)")  # fmt: skip
        return Unavailable(f"gallery (matching at {self._address}): {exc.code().name}: {exc.details()}")


def resolve_claim(request: session_pb2.OpenSessionRequest, session_id: str, gallery: SessionGallery) -> Claim:
    """The subject the session's frames are verified against; InvalidInput saying why a claim cannot be used."""
    which = request.WhichOneof("claim")
    scoped_id = f"{SESSION_SUBJECT_PREFIX}{session_id}"
    if which == "subject_id":
        gallery.check_enrolled(request.subject_id)
        return Claim(session_pb2.CLAIM_KIND_SUBJECT, request.subject_id)
    if which == "portrait":
        gallery.enroll_portrait(scoped_id, request.portrait, session_id)
        return Claim(session_pb2.CLAIM_KIND_PORTRAIT, scoped_id, session_scoped=True)
    if which == "document_page":
        portrait, document_number = read_document_claim(request.document_page)
        gallery.enroll_portrait(scoped_id, portrait, session_id)
        return Claim(session_pb2.CLAIM_KIND_DOCUMENT, scoped_id, document_number, session_scoped=True)
    raise InvalidInput("no claim: set subject_id, portrait or document_page")


def read_document_claim(page: bytes) -> tuple[bytes, str]:
    """The portrait (cut out of the page, JPEG) and the document number of a photographed data page."""
    from sightline.capture.document import read_document  # OCR is heavy: loaded on the first document claim

    try:
        rgb = decode_image(page)
    except ImageError as exc:
        raise InvalidInput(f"document page: {exc}") from None
    try:
        reading = read_document(rgb)
    except RuntimeError as exc:  # rapidocr missing from this install
        raise Unavailable(f"document reading is not available here: {exc}") from None
    if not reading.ok:
        raise InvalidInput(f"document page refused ({reading.error}): {'; '.join(reading.errors)}")
    assert reading.portrait_box is not None and reading.claim is not None
    return encode_jpeg(_portrait_crop(rgb, reading.portrait_box), 95), reading.claim


def _portrait_crop(rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The portrait with some of the page around it (the face detector needs context)."""
    x1, y1, x2, y2 = box
    mx, my = PORTRAIT_MARGIN * (x2 - x1), PORTRAIT_MARGIN * (y2 - y1)
    height, width = rgb.shape[:2]
    return rgb[max(int(y1 - my), 0) : min(int(y2 + my), height), max(int(x1 - mx), 0) : min(int(x2 + mx), width)]


def media_type_of(image: bytes) -> str:
    for magic, media_type in _MEDIA_TYPES:
        if image.startswith(magic):
            return media_type
    raise InvalidInput("the frame is neither a JPEG nor a PNG image")


def check_gate_id(gate_id: str) -> str:
    if not _GATE_ID.match(gate_id):
        raise InvalidInput(f"invalid gate id {gate_id[:40]!r}: use 1-64 letters, digits and . _ - (starting with a "
                           "letter or digit)")  # fmt: skip
    return gate_id


# --- sessions in memory ------------------------------------------------------------------------------------------


@dataclass
class GateSession:
    session_id: str
    gate_id: str
    claim: Claim
    stop_lists: list[str]
    opened_at: float  # epoch seconds
    deadline: float
    frames_sent: int = 0
    closed: bool = False
    outcome: session_pb2.SessionUpdate | None = None  # the final update, once the session has ended
    ended_at: float = 0.0
    progress: session_pb2.SessionUpdate | None = None
    watchers: list[queue.SimpleQueue] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.outcome is not None


class SessionBook:
    """Open sessions and recently ended ones (for kiosks that watch late), with their watchers; thread-safe."""

    def __init__(self, max_sessions: int, retention_s: float) -> None:
        self._sessions: dict[str, GateSession] = {}
        self._lock = threading.Lock()
        self._max = max_sessions
        self._retention = retention_s

    def add(self, session: GateSession) -> None:
        with self._lock:
            if sum(not s.ended for s in self._sessions.values()) >= self._max:
                raise TooManySessions(f"{self._max} sessions are open on this capture replica")
            self._sessions[session.session_id] = session

    def next_frame(self, session_id: str) -> tuple[GateSession, int]:
        """The session and the sequence number of its next frame, if frames may still be sent to it."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.closed or session.ended:
                state = "unknown on this capture replica" if session is None else "ended" if session.ended else "closed"
                raise SessionNotOpen(f"session {session_id!r} is {state}: no more frames can be sent to it")
            session.frames_sent += 1
            return session, session.frames_sent

    def close(self, session_id: str) -> GateSession:
        with self._lock:
            session = self._get(session_id)
            session.closed = True
            return session

    def subscribe(self, session_id: str) -> tuple[GateSession, queue.SimpleQueue]:
        """A queue of the session's updates, starting with its outcome (if it has ended) or its latest progress."""
        updates: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            session = self._get(session_id)
            latest = session.outcome or session.progress
            if latest is not None:
                updates.put(latest)
            if not session.ended:
                session.watchers.append(updates)
            return session, updates

    def unsubscribe(self, session: GateSession, updates: queue.SimpleQueue) -> None:
        with self._lock:
            if updates in session.watchers:
                session.watchers.remove(updates)

    def progress(self, session_id: str, update: session_pb2.SessionUpdate) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.ended:
                return
            session.progress = update
            for watcher in session.watchers:
                watcher.put(update)

    def finish(self, session_id: str, outcome: session_pb2.SessionUpdate) -> GateSession | None:
        """End the session with its outcome and tell its watchers; None if it is unknown here or already ended."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.ended:
                return None
            session.outcome, session.ended_at, session.closed = outcome, time.time(), True
            for watcher in session.watchers:
                watcher.put(outcome)
            session.watchers.clear()
            return session

    def overdue(self, now: float, grace_s: float) -> list[GateSession]:
        """Sessions still waiting for their outcome past the deadline plus the grace."""
        with self._lock:
            return [s for s in self._sessions.values() if not s.ended and now > s.deadline + grace_s]

    def forget_ended(self, now: float) -> None:
        with self._lock:
            for stale in [k for k, s in self._sessions.items() if s.ended and now - s.ended_at > self._retention]:
                del self._sessions[stale]

    def active_subjects(self) -> set[str]:
        with self._lock:
            return {s.claim.subject_id for s in self._sessions.values() if not s.ended}

    def _get(self, session_id: str) -> GateSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"session {session_id!r} is unknown on this capture replica (ended long ago, or opened "
                           "on another one)")  # fmt: skip
        return session


# --- the kiosk ---------------------------------------------------------------------------------------------------


class Kiosk:
    """Sessions of the gates connected to this capture replica: claims, frames, control events and outcomes."""

    def __init__(self, capture: Capture, settings: CaptureSettings, kafka: KafkaSettings,
                 gallery: SessionGallery | None = None) -> None:  # fmt: skip
        self._capture = capture
        self._settings = settings
        self._kafka = kafka
        self.gallery = gallery or SessionGallery(settings.matching_addr, settings.gallery_timeout_s)
        self.book = SessionBook(settings.max_sessions, settings.ended_session_retention_s)
        # Templates are deleted off the caller's thread: the relay must not wait on the gallery between two outcomes.
        self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-template-delete")
        self._undeleted: set[str] = set()
        self._undeleted_lock = threading.Lock()

    def start(self, stop: threading.Event) -> None:
        """Start relaying decision's session events to watchers, and the expiry and clean-up rounds, until ``stop``."""
        threading.Thread(target=self._relay, args=(stop,), daemon=True, name="session-relay").start()
        threading.Thread(target=self._housekeeping, args=(stop,), daemon=True, name="session-housekeeping").start()

    # Requests ------------------------------------------------------------------------------------------------------

    def open(self, request: session_pb2.OpenSessionRequest) -> session_pb2.OpenSessionResponse:
        gate_id = check_gate_id(request.gate_id)
        if any(not name.strip() for name in request.stop_lists):
            raise InvalidInput("stop_lists has an empty name")
        session_id = uuid.uuid4().hex
        claim = resolve_claim(request, session_id, self.gallery)
        opened_at = time.time()
        stop_lists = list(request.stop_lists) or list(self._settings.default_stop_lists)
        session = GateSession(session_id, gate_id, claim, stop_lists, opened_at,
                              opened_at + self._settings.session_budget_s)  # fmt: skip
        try:
            self.book.add(session)
        except TooManySessions:
            self._delete_template(claim)
            raise
        try:
            self._announce(session, Event.KIND_OPENED)
        except Unavailable:
            self._end(session_id, Update(session_id=session_id, outcome=session_pb2.SESSION_OUTCOME_CANCELLED,
                                         reasons=["the session could not be announced to decision"]))  # fmt: skip
            raise
        log.info("session opened", extra={"session_id": session_id, "gate_id": gate_id,
                                           "claim_kind": session_pb2.ClaimKind.Name(claim.kind)})  # fmt: skip
        response = session_pb2.OpenSessionResponse(session_id=session_id, claim_kind=claim.kind,
                                                   claim_subject_id=claim.subject_id,
                                                   document_number=claim.document_number)  # fmt: skip
        response.deadline.FromNanoseconds(int(session.deadline * 1e9))
        return response

    def send(self, request: session_pb2.SendFrameRequest) -> session_pb2.SendFrameResponse:
        if not request.image:
            raise InvalidInput("the frame is empty (0 bytes)")
        media_type = media_type_of(request.image)
        session, sequence = self.book.next_frame(request.session_id)
        ref = types_pb2.FrameRef(
            frame_id=f"{session.gate_id}:{session.session_id}:{sequence}", source_id=session.gate_id,
            sequence=sequence, captured_at=codec.now(), purpose=types_pb2.PURPOSE_ECHANNEL,
            session_id=session.session_id, claim_subject_id=session.claim.subject_id, watchlists=session.stop_lists,
        )  # fmt: skip
        raw = RawFrame(ref.frame_id, 0.0, encoded=request.image, media_type=media_type)
        if not self._capture.publish_frame(raw, ref, f"kiosk:{session.gate_id}"):
            raise InvalidInput(f"frame {sequence} was not published (too large?): see the dead-letter topic")
        return session_pb2.SendFrameResponse(frame_id=ref.frame_id, frames_sent=sequence)

    def close(self, request: session_pb2.CloseSessionRequest) -> None:
        """No more frames: decision decides with what it has (the frame count tells it how many to wait for)."""
        session = self.book.close(request.session_id)
        if not session.ended:
            self._announce(session, Event.KIND_CLOSED, Update(session_id=session.session_id,
                                                              frames_seen=session.frames_sent))  # fmt: skip

    def cancel(self, request: session_pb2.CancelSessionRequest) -> None:
        session = self.book.close(request.session_id)
        if session.ended:
            return
        reason = request.reason or "cancelled by the kiosk"
        update = Update(session_id=session.session_id, outcome=session_pb2.SESSION_OUTCOME_CANCELLED, reasons=[reason],
                        frames_seen=session.frames_sent)  # fmt: skip
        try:
            self._announce(session, Event.KIND_CANCELLED, update)
        except Unavailable as exc:  # decision times the session out on its own; the kiosk is done with it anyway
            log.warning("cancellation not announced", extra={"session_id": session.session_id, "error": str(exc)})
        self._end(session.session_id, update)

    def watch(self, session_id: str, active: Callable[[], bool]) -> Iterator[session_pb2.SessionUpdate]:
        """The session's updates until its outcome (subscribed at once: NotFound is raised here, not when iterated)."""
        session, updates = self.book.subscribe(session_id)
        return self._stream(session, updates, active)

    def _stream(self, session: GateSession, updates: queue.SimpleQueue,
                active: Callable[[], bool]) -> Iterator[session_pb2.SessionUpdate]:  # fmt: skip
        try:
            while active():
                try:
                    update = updates.get(timeout=0.5)  # wakes up now and then to notice a kiosk that went away
                except queue.Empty:
                    continue
                yield update
                if update is session.outcome:
                    return
        finally:
            self.book.unsubscribe(session, updates)

    # Session events ------------------------------------------------------------------------------------------------

    def _announce(self, session: GateSession, kind: int, update: session_pb2.SessionUpdate | None = None) -> None:
        """Publish a control event on the sessions topic, keyed by gate id; Unavailable when the broker refuses it."""
        event = Event(kind=kind, session_id=session.session_id, gate_id=session.gate_id, claim_kind=session.claim.kind,
                      claim_subject_id=session.claim.subject_id, at=codec.now())  # fmt: skip
        event.opened_at.FromNanoseconds(int(session.opened_at * 1e9))
        event.deadline.FromNanoseconds(int(session.deadline * 1e9))
        if update is not None:
            event.update.CopyFrom(update)
        try:
            self._capture.producer.send(SESSIONS.name, key=session.gate_id.encode(), value=event.SerializeToString(),
                                        headers=tracing.kafka_headers()).get(timeout=PUBLISH_TIMEOUT_S)  # fmt: skip
        except KafkaError as exc:
            raise Unavailable(f"the broker did not take the session event: {exc!r}") from None

    def _relay(self, stop: threading.Event) -> None:
        """Hand decision's PROGRESS and DECIDED events to the watchers of this replica's sessions.

        One reader for the whole process, outside any consumer group: every replica must see every outcome (a
        session's outcome goes to the replica its kiosk talks to).
        """
        since_ms = int(time.time() * 1000) - 5000  # record times come from decision's clock: allow some skew
        while not stop.is_set():
            try:
                for record in read_topics(self._kafka, [SESSIONS.name], since_ms=since_ms, stop=stop.is_set):
                    since_ms = max(since_ms, record.timestamp)  # a re-read after a failure starts here
                    self._on_event(record.value)
            except Exception as exc:  # noqa: BLE001 - broker restarting or unreachable: read again shortly
                log.warning("reading the sessions topic failed; retrying", extra={"error": repr(exc)})
                stop.wait(2.0)

    def _on_event(self, value: bytes) -> None:
        try:
            event = codec.parse(Event, value)
        except codec.MalformedEvent as exc:
            log.warning("malformed session event skipped", extra={"error": str(exc)})
            return
        if event.kind == Event.KIND_DECIDED:
            self._end(event.session_id, event.update)
        elif event.kind == Event.KIND_PROGRESS:
            self.book.progress(event.session_id, event.update)

    def _end(self, session_id: str, outcome: session_pb2.SessionUpdate) -> None:
        session = self.book.finish(session_id, outcome)
        if session is None:
            return  # another replica's session, or already ended (cancelled, expired) before decision's outcome
        log.info("session ended", extra={"session_id": session_id, "gate_id": session.gate_id,
                                          "outcome": session_pb2.SessionOutcome.Name(outcome.outcome)})  # fmt: skip
        self._delete_template(session.claim)

    # Expiry and clean-up -------------------------------------------------------------------------------------------

    def _housekeeping(self, stop: threading.Event) -> None:
        next_orphan_sweep = 0.0
        while not stop.wait(SWEEP_EVERY_S):
            now = time.time()
            try:
                for session in self.book.overdue(now, self._settings.session_grace_s):
                    self._end(session.session_id, self._late_outcome(session))
                self.book.forget_ended(now)
                if now >= next_orphan_sweep:
                    swept = self._sweep_orphans(now)
                    next_orphan_sweep = now + (self._settings.orphan_sweep_interval_s if swept else 5.0)
                    self._retry_deletions()
            except Exception:  # noqa: BLE001 - one failed round must not end expiry for good
                log.exception("session housekeeping failed")

    def _late_outcome(self, session: GateSession) -> session_pb2.SessionUpdate:
        """What the kiosk is told when decision's outcome has not come: refer the traveller, saying why."""
        outcome = Update()
        if session.progress is not None:
            outcome.CopyFrom(session.progress)
        outcome.session_id = session.session_id
        outcome.outcome = session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
        outcome.reasons[:] = [f"the decision did not arrive in time: no outcome {self._settings.session_grace_s:g} s "
                              "after the session's deadline (is the decision service running and keeping up?)"]
        return outcome

    def _delete_template(self, claim: Claim) -> None:
        if claim.session_scoped:
            self._deleter.submit(self._delete_subject, claim.subject_id)

    def _delete_subject(self, subject_id: str) -> None:
        try:
            self.gallery.delete(subject_id)
        except (Unavailable, InvalidInput) as exc:
            log.warning("session template not deleted yet; will retry", extra={"subject_id": subject_id,
                                                                               "error": str(exc)})  # fmt: skip
            with self._undeleted_lock:
                self._undeleted.add(subject_id)
            return
        with self._undeleted_lock:
            self._undeleted.discard(subject_id)

    def _retry_deletions(self) -> None:
        with self._undeleted_lock:
            pending, self._undeleted = self._undeleted, set()
        for subject_id in pending:
            self._deleter.submit(self._delete_subject, subject_id)

    def _sweep_orphans(self, now: float) -> bool:
        """Delete session-scoped templates older than any session can live (left by a stop mid-session)."""
        older_than = now - self._settings.session_budget_s - self._settings.session_grace_s
        try:
            orphans = set(self.gallery.session_subjects(older_than)) - self.book.active_subjects()
        except Unavailable as exc:
            log.info("session template sweep postponed", extra={"error": str(exc)})
            return False
        for subject_id in sorted(orphans):
            self._deleter.submit(self._delete_subject, subject_id)
        if orphans:
            log.info("deleting session templates left behind", extra={"count": len(orphans)})
        return True


# --- gRPC ----------------------------------------------------------------------------------------------------------

_STATUS = {SessionNotOpen: grpc.StatusCode.FAILED_PRECONDITION, TooManySessions: grpc.StatusCode.RESOURCE_EXHAUSTED}


def _kiosk_errors(method):  # type: ignore[no-untyped-def]
    """The kiosk's own failures as their gRPC status, with the message (InvalidInput/NotFound/Unavailable:
    ``rpc_errors``)."""

    @functools.wraps(method)
    def wrapper(self, request, context):  # type: ignore[no-untyped-def]
        try:
            return method(self, request, context)
        except (SessionNotOpen, TooManySessions) as exc:
            context.abort(_STATUS[type(exc)], str(exc))

    return wrapper


class KioskServicer(session_pb2_grpc.KioskServiceServicer):
    def __init__(self, kiosk: Kiosk) -> None:
        self._kiosk = kiosk

    @rpc_errors
    @_kiosk_errors
    def OpenSession(self, request: session_pb2.OpenSessionRequest, context: Context) -> session_pb2.OpenSessionResponse:
        return self._kiosk.open(request)

    @rpc_errors
    @_kiosk_errors
    def SendFrame(self, request: session_pb2.SendFrameRequest, context: Context) -> session_pb2.SendFrameResponse:
        return self._kiosk.send(request)

    @rpc_errors
    @_kiosk_errors
    def CloseSession(self, request: session_pb2.CloseSessionRequest,
                     context: Context) -> session_pb2.CloseSessionResponse:  # fmt: skip
        self._kiosk.close(request)
        return session_pb2.CloseSessionResponse()

    @rpc_errors
    @_kiosk_errors
    def CancelSession(self, request: session_pb2.CancelSessionRequest,
                      context: Context) -> session_pb2.CancelSessionResponse:  # fmt: skip
        self._kiosk.cancel(request)
        return session_pb2.CancelSessionResponse()

    @rpc_errors
    @_kiosk_errors
    def WatchSession(self, request: session_pb2.WatchSessionRequest, context: Context) -> Iterator[Update]:
        return self._kiosk.watch(request.session_id, context.is_active)
