"""The kiosk: e-channel gate sessions, from the traveller's claim to the gate's outcome.

A kiosk (the gate's controller) speaks gRPC only. ``OpenSession`` turns its claim into the subject the frames are
verified against (``claims.py``). Capture then announces the session on ``sightline.sessions.v1`` (OPENED, with its
deadline), publishes each ``SendFrame`` image as an e-channel frame (never dropped under load) on the frames topic,
keyed by the gate id like every session event, and announces CLOSED (with the number of frames published) or
CANCELLED. Decision fuses the frames' match results and publishes PROGRESS and DECIDED on the sessions topic; one
background reader of that topic hands them to the kiosks watching (``WatchSession``). When no outcome arrives by the
deadline plus a grace, the kiosk is told so, the traveller is referred to an officer, and decision is told that the
session was cancelled (so that it never decides, and audits, what the gate did not do).

The sessions live in a store every capture replica shares (``session_store.py``; ``session_book.py`` adds what only
this replica knows: its watchers and the frames it is publishing). Any replica serves any request of any session:
a kiosk may be moved to another replica mid-session, and a replica that stops (gracefully or not) leaves its open
sessions to the others, or to itself once restarted: their deadlines run on, and whichever replica finds one overdue
expires it. At start-up the relay first reads the sessions topic back to the oldest open session, so an outcome
published while no replica was reading still reaches its session.

Nothing about the traveller outlives the session: a session-scoped template is deleted when the session ends
(decided, cancelled or expired), by the replica that ended it. Templates left behind (a replica stopped before it
could delete one) are swept at start-up and periodically.
"""

from __future__ import annotations

import functools
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import TYPE_CHECKING

from kafka.errors import KafkaError

from sightline.capture.kiosk.claims import Claim, SessionGallery, resolve_claim
from sightline.capture.kiosk.session_book import SessionBook, Told
from sightline.capture.kiosk.session_store import (
    GateSession,
    GateSessionStore,
    SessionStoreUnavailable,
    TooManySessions,
)
from sightline.capture.settings import CaptureSettings
from sightline.capture.sources import RawFrame
from sightline.common import codec, tracing
from sightline.common.bus import read_topics
from sightline.common.config import KafkaSettings
from sightline.common.rpc import InvalidInput, Unavailable
from sightline.common.topics import SESSIONS
from sightline.v1 import session_pb2, types_pb2

if TYPE_CHECKING:
    from kafka.producer.future import FutureRecordMetadata

    from sightline.capture.service import Capture  # which serves the kiosk (kiosk/servicer.py)

log = logging.getLogger(__name__)

_GATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MEDIA_TYPES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"))
SWEEP_EVERY_S = 0.25
PURGE_EVERY_S = 5.0  # ended sessions past their retention are deleted from the store this often
PUBLISH_TIMEOUT_S = 10.0
RELAY_SKEW_MS = 5000  # record times come from the producer's clock: the relay reads this much further back
CATCH_UP_IDLE_S = 0.5  # the relay's first read ends once the sessions topic is this long without a record
CATCH_UP_MAX_S = 10.0  # sessions are expired at start-up after the relay's catch-up, or this long at the most
LATE_REASON = "the decision did not arrive in time"  # how the kiosk's referral, and decision's cancellation, begin

Event = session_pb2.SessionEvent
Update = session_pb2.SessionUpdate


def media_type_of(image: bytes) -> str:
    for magic, media_type in _MEDIA_TYPES:
        if image.startswith(magic):
            return media_type
    raise InvalidInput("the frame is neither a JPEG nor a PNG image")


def check_gate_id(gate_id: str) -> str:
    if not _GATE_ID.match(gate_id):
        raise InvalidInput(
            f"invalid gate id {gate_id[:40]!r}: use 1-64 letters, digits and . _ - (starting with a letter or digit)"
        )
    return gate_id


def session_stop_lists(requested: Sequence[str], defaults: Sequence[str]) -> list[str]:
    """The watchlists a session's frames are searched on: the configured defaults, plus those the kiosk names.

    A kiosk may add lists, never narrow the defaults (a gate must not be able to leave a stop list out). No default
    means every watchlist, which a kiosk's lists cannot widen: they then change nothing.
    """
    if any(not name.strip() for name in requested):
        raise InvalidInput("stop_lists has an empty name")
    if not defaults:
        return []
    return list(dict.fromkeys([*defaults, *requested]))


def _left(deadline: float) -> float:
    """Seconds until ``deadline`` (monotonic), never negative."""
    return max(0.0, deadline - time.monotonic())


class Kiosk:
    """Sessions of the gates connected to this capture replica: claims, frames, control events and outcomes."""

    def __init__(
        self,
        capture: Capture,
        settings: CaptureSettings,
        kafka: KafkaSettings,
        gallery: SessionGallery | None = None,
        store: GateSessionStore | None = None,
    ) -> None:
        """``store``: None opens the one ``settings.database_url`` names (and closes it with the kiosk)."""
        self._capture = capture
        self._settings = settings
        self._kafka = kafka
        self.gallery = gallery or SessionGallery(settings.matching_addr, settings.gallery_timeout_s)
        self._own_store = store is None
        store = store or GateSessionStore.open(settings.database_url.get_secret_value())
        retention = settings.ended_session_retention_s
        idle = settings.session_budget_s + settings.session_grace_s + retention
        self.book = SessionBook(store, settings.max_sessions, retention, idle)
        self._stop = threading.Event()
        self.caught_up = threading.Event()  # the relay has read the sessions topic up to its start
        self._relay_since_ms = 0
        self._started_at = 0.0
        self._threads: list[threading.Thread] = []
        # Templates are deleted off the caller's thread: the relay must not wait on the gallery between two outcomes.
        self._deleter = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-template-delete")
        self._deleting: set[futures.Future] = set()  # deletions queued or running
        self._undeleted: set[str] = set()  # deletions that failed (or came after close), retried by housekeeping
        self._deletion_lock = threading.Lock()
        self._closing = False

    def start(self) -> None:
        """Resume the open sessions of the store, and start relaying decision's session events to watchers, and the
        expiry and clean-up rounds, until closed."""
        resumed = self.book.open_sessions()
        now_ms = int(time.time() * 1000)
        oldest_ms = int(resumed[0].opened_at * 1000) if resumed else now_ms
        # Back to the oldest open session: its outcome may have been published while no replica was reading.
        self._relay_since_ms = min(now_ms, oldest_ms) - RELAY_SKEW_MS
        self._started_at = time.monotonic()
        if resumed:
            log.info("gate sessions resumed from the store", extra={"open": len(resumed)})
        else:
            self.caught_up.set()  # no session could have missed its outcome
        self._threads = [
            threading.Thread(target=self._relay, daemon=True, name="session-relay"),
            threading.Thread(target=self._housekeeping, daemon=True, name="session-housekeeping"),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """A graceful stop, within ``shutdown_timeout_s``: finish the template deletions queued, stop the threads.

        The open sessions stay in the store, open: another replica (or this one, restarted) continues them, and
        whichever replica finds one overdue expires it. Deletions the time does not allow are left to the next
        start-up's sweep.
        """
        if self._stop.is_set():
            return  # closed already
        deadline = time.monotonic() + self._settings.shutdown_timeout_s
        self._stop.set()
        self._retry_deletions()
        with self._deletion_lock:
            self._closing = True  # from here on a template to delete is left to the sweep
            deleting = set(self._deleting)
        _, not_done = futures.wait(deleting, timeout=_left(deadline))
        with self._deletion_lock:
            left = len(not_done) + len(self._undeleted)
        self._deleter.shutdown(wait=False, cancel_futures=True)
        self.gallery.close()  # a deletion still running fails at once: the process must not outlive the budget
        for thread in self._threads:
            thread.join(timeout=max(_left(deadline), 0.5))
        if left:
            log.warning(
                "session templates not deleted at shutdown; the next start-up sweep deletes them", extra={"count": left}
            )
        if self._own_store:
            self.book.store.close()
        log.info("kiosk stopped; its open sessions stay in the session store")

    # Requests ------------------------------------------------------------------------------------------------------

    def open(self, request: session_pb2.OpenSessionRequest) -> session_pb2.OpenSessionResponse:
        gate_id = check_gate_id(request.gate_id)
        stop_lists = session_stop_lists(request.stop_lists, self._settings.default_stop_lists)
        session_id = uuid.uuid4().hex
        claim = resolve_claim(request, session_id, self.gallery)
        opened_at = time.time()
        session = GateSession(
            session_id, gate_id, claim, stop_lists, opened_at, opened_at + self._settings.session_budget_s
        )
        try:
            self.book.add(session)
        except TooManySessions:
            self._delete_template(claim)
            raise
        try:
            self._announce(session, Event.KIND_OPENED)
        except Unavailable:
            self._end(
                session_id,
                Update(
                    session_id=session_id,
                    outcome=session_pb2.SESSION_OUTCOME_CANCELLED,
                    reasons=["the session could not be announced to decision"],
                ),
            )
            raise
        log.info(
            "session opened",
            extra={"session_id": session_id, "gate_id": gate_id, "claim_kind": session_pb2.ClaimKind.Name(claim.kind)},
        )
        response = session_pb2.OpenSessionResponse(
            session_id=session_id,
            claim_kind=claim.kind,
            claim_subject_id=claim.subject_id,
            document_number=claim.document_number,
        )
        response.deadline.FromNanoseconds(int(session.deadline * 1e9))
        return response

    def send(self, request: session_pb2.SendFrameRequest) -> session_pb2.SendFrameResponse:
        """Publish one frame. Its sequence number is never reused, but only a published frame counts as sent: decision
        waits for the results of that many frames after CLOSED."""
        if not request.image:
            raise InvalidInput("the frame is empty (0 bytes)")
        media_type = media_type_of(request.image)
        session, sequence = self.book.next_frame(request.session_id)
        published = False
        try:
            ref = self._frame_ref(session, sequence)
            raw = RawFrame(ref.frame_id, 0.0, encoded=request.image, media_type=media_type)
            published = self._capture.publish_frame(raw, ref, f"kiosk:{session.gate_id}")  # or BrokerUnavailable
        finally:
            frames_sent = self.book.frame_done(session, published)
        if not published or frames_sent is None:
            raise InvalidInput(f"frame {sequence} was not published (too large?): see the dead-letter topic")
        return session_pb2.SendFrameResponse(frame_id=ref.frame_id, frames_sent=frames_sent)

    @staticmethod
    def _frame_ref(session: GateSession, sequence: int) -> types_pb2.FrameRef:
        return types_pb2.FrameRef(
            frame_id=f"{session.gate_id}:{session.session_id}:{sequence}",
            source_id=session.gate_id,
            sequence=sequence,
            captured_at=codec.now(),
            purpose=types_pb2.PURPOSE_ECHANNEL,
            session_id=session.session_id,
            claim_subject_id=session.claim.subject_id,
            watchlists=session.stop_lists,
        )

    def close_session(self, request: session_pb2.CloseSessionRequest) -> None:
        """No more frames: decision decides with what it has (the frame count tells it how many to wait for)."""
        # A frame still being published (a SendFrame racing this call) is waited for: it must be counted.
        session = self.book.close(request.session_id, wait_s=2 * self._settings.publish_timeout_s)
        if not session.ended:
            self._announce(
                session, Event.KIND_CLOSED, Update(session_id=session.session_id, frames_seen=session.frames_sent)
            )

    def cancel(self, request: session_pb2.CancelSessionRequest) -> None:
        session = self.book.close(request.session_id)
        if session.ended:
            return
        update = self._cancellation(session, request.reason or "cancelled by the kiosk")
        try:
            self._announce(session, Event.KIND_CANCELLED, update)
        except Unavailable as exc:  # decision times the session out on its own; the kiosk is done with it anyway
            log.warning("cancellation not announced", extra={"session_id": session.session_id, "error": str(exc)})
        self._end(session.session_id, update)

    def watch(self, session_id: str, active: Callable[[], bool]) -> Iterator[session_pb2.SessionUpdate]:
        """The session's updates until its outcome (subscribed at once: NotFound is raised here, not when iterated).
        Any replica serves it: the relay of each reads every session's progress and outcome."""
        _, updates = self.book.subscribe(session_id)
        return self._stream(session_id, updates, active)

    def _stream(
        self, session_id: str, updates: queue.SimpleQueue[Told], active: Callable[[], bool]
    ) -> Iterator[session_pb2.SessionUpdate]:
        try:
            while active():
                try:
                    update, final = updates.get(timeout=0.5)  # wakes up now and then to notice a kiosk that went away
                except queue.Empty:
                    continue
                yield update
                if final:
                    return
        finally:
            self.book.unsubscribe(session_id, updates)

    # Session events ------------------------------------------------------------------------------------------------

    def _send_event(
        self, session: GateSession, kind: int, update: session_pb2.SessionUpdate | None = None
    ) -> FutureRecordMetadata:
        """Hand a control event to the producer (sessions topic, keyed by gate id); Unavailable when it refuses it."""
        event = Event(
            kind=kind,
            session_id=session.session_id,
            gate_id=session.gate_id,
            claim_kind=session.claim.kind,
            claim_subject_id=session.claim.subject_id,
            at=codec.now(),
        )
        event.opened_at.FromNanoseconds(int(session.opened_at * 1e9))
        event.deadline.FromNanoseconds(int(session.deadline * 1e9))
        if update is not None:
            event.update.CopyFrom(update)
        try:
            return self._capture.producer.send(
                SESSIONS.name,
                key=session.gate_id.encode(),
                value=event.SerializeToString(),
                headers=tracing.kafka_headers(),
            )
        except KafkaError as exc:
            raise Unavailable(f"the broker did not take the session event: {exc!r}") from None

    def _announce(self, session: GateSession, kind: int, update: session_pb2.SessionUpdate | None = None) -> None:
        """Publish a control event and wait for the broker's acknowledgement; Unavailable when it does not come."""
        future = self._send_event(session, kind, update)
        try:
            future.get(timeout=PUBLISH_TIMEOUT_S)
        except KafkaError as exc:
            raise Unavailable(f"the broker did not take the session event: {exc!r}") from None

    @staticmethod
    def _cancellation(session: GateSession, reason: str) -> session_pb2.SessionUpdate:
        return Update(
            session_id=session.session_id,
            outcome=session_pb2.SESSION_OUTCOME_CANCELLED,
            reasons=[reason],
            frames_seen=session.frames_sent,
        )

    def _relay(self) -> None:
        """Hand decision's PROGRESS and DECIDED events to the sessions and their watchers here.

        One reader for the whole process, outside any consumer group: every replica must see every outcome (a
        session's outcome goes to whichever replica its kiosk talks to). The first read goes back to the oldest open
        session and ends once the topic is idle (``caught_up``); then the reader follows the topic.
        """
        since_ms, started_ms = self._relay_since_ms, int(time.time() * 1000)
        idle_timeout: float | None = CATCH_UP_IDLE_S
        while not self._stop.is_set():
            try:
                for record in read_topics(
                    self._kafka, [SESSIONS.name], since_ms=since_ms, idle_timeout_s=idle_timeout, stop=self._stop.is_set
                ):
                    since_ms = max(since_ms, record.timestamp)  # a re-read after a failure starts here
                    self._on_event(record.value)
                    if record.timestamp >= started_ms:  # a busy topic never goes idle: this is today's traffic
                        self.caught_up.set()
                self.caught_up.set()  # idle (or stopping): everything published before the start has been read
                idle_timeout = None
            except Exception as exc:  # noqa: BLE001 - broker restarting or unreachable: read again shortly
                log.warning("reading the sessions topic failed; retrying", extra={"error": repr(exc)})
                self._stop.wait(2.0)

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

    def _end(self, session_id: str, outcome: session_pb2.SessionUpdate) -> GateSession | None:
        """End the session for its watchers and delete its template; None if it is unknown or has ended already."""
        session = self.book.finish(session_id, outcome)
        if session is None:
            return None  # ended by another replica's relay, or cancelled, or expired before decision's outcome
        log.info(
            "session ended",
            extra={
                "session_id": session_id,
                "gate_id": session.gate_id,
                "outcome": session_pb2.SessionOutcome.Name(outcome.outcome),
            },
        )
        self._delete_template(session.claim)
        return session

    # Expiry and clean-up -------------------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        next_orphan_sweep = next_purge = 0.0
        while not self._stop.wait(SWEEP_EVERY_S):
            now = time.time()
            try:
                self.book.sync()
                if self._may_expire():
                    self._expire(now)
                if now >= next_purge:
                    self.book.forget_ended(now)
                    next_purge = now + PURGE_EVERY_S
                if now >= next_orphan_sweep:
                    swept = self._sweep_orphans(now)
                    next_orphan_sweep = now + (self._settings.orphan_sweep_interval_s if swept else 5.0)
                    self._retry_deletions()
            except SessionStoreUnavailable as exc:
                log.warning("session housekeeping postponed", extra={"error": str(exc)})
            except Exception:
                log.exception("session housekeeping failed")

    def _may_expire(self) -> bool:
        """Not before the relay has caught up at start-up (bounded): an outcome published while this replica was down
        must reach its session before the session is expired as having none."""
        return self.caught_up.is_set() or time.monotonic() - self._started_at > CATCH_UP_MAX_S

    def _expire(self, now: float) -> None:
        """Refer the travellers of sessions whose outcome is overdue, then tell decision they are cancelled.

        Decision would otherwise decide them later (decision down or far behind) and audit an acceptance the gate
        never acted on. The events are not waited for: the next expiry must not wait on the broker.
        """
        expired = [
            session
            for session in self.book.overdue(now, self._settings.session_grace_s)
            if self._end(session.session_id, self._late_outcome(session)) is not None
        ]
        for session in expired:
            reason = f"{LATE_REASON}: the gate referred the traveller to an officer"
            try:
                future = self._send_event(session, Event.KIND_CANCELLED, self._cancellation(session, reason))
            except Unavailable as exc:
                log.warning("expiry not announced", extra={"session_id": session.session_id, "error": str(exc)})
                continue
            future.add_errback(functools.partial(_log_unannounced, session.session_id))

    def _late_outcome(self, session: GateSession) -> session_pb2.SessionUpdate:
        """What the kiosk is told when decision's outcome has not come: refer the traveller, saying why."""
        outcome = Update()
        if (progress := self.book.latest_progress(session.session_id)) is not None:
            outcome.CopyFrom(progress)
        outcome.session_id = session.session_id
        outcome.outcome = session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
        outcome.reasons[:] = [
            f"{LATE_REASON}: no outcome {self._settings.session_grace_s:g} s after the session's "
            "deadline (is the decision service running and keeping up?)"
        ]
        return outcome

    def _delete_template(self, claim: Claim) -> None:
        if claim.session_scoped:
            self._queue_deletion(claim.subject_id)

    def _queue_deletion(self, subject_id: str) -> None:
        with self._deletion_lock:
            if self._closing:
                self._undeleted.add(subject_id)
                return
            future = self._deleter.submit(self._delete_subject, subject_id)
            self._deleting.add(future)
        future.add_done_callback(self._deletion_done)

    def _deletion_done(self, future: futures.Future) -> None:
        with self._deletion_lock:
            self._deleting.discard(future)

    def _delete_subject(self, subject_id: str) -> None:
        try:
            self.gallery.delete(subject_id)
        except (Unavailable, InvalidInput) as exc:
            log.warning(
                "session template not deleted yet; will retry", extra={"subject_id": subject_id, "error": str(exc)}
            )
            with self._deletion_lock:
                self._undeleted.add(subject_id)
            return
        with self._deletion_lock:
            self._undeleted.discard(subject_id)

    def _retry_deletions(self) -> None:
        with self._deletion_lock:
            pending, self._undeleted = self._undeleted, set()
        for subject_id in pending:
            self._queue_deletion(subject_id)

    def _sweep_orphans(self, now: float) -> bool:
        """Delete session-scoped templates older than any session can live (left by a stop mid-session)."""
        older_than = now - self._settings.session_budget_s - self._settings.session_grace_s
        try:
            orphans = set(self.gallery.session_subjects(older_than)) - self.book.active_subjects()
        except Unavailable as exc:
            log.info("session template sweep postponed", extra={"error": str(exc)})
            return False
        for subject_id in sorted(orphans):
            self._queue_deletion(subject_id)
        if orphans:
            log.info("deleting session templates left behind", extra={"count": len(orphans)})
        return True


def _log_unannounced(session_id: str, error: Exception) -> None:
    log.warning("cancellation not announced", extra={"session_id": session_id, "error": repr(error)})
