"""The running side of e-channel sessions in the decision service: session events and match results in, progress and
outcomes out on ``sightline.sessions.v1``.

The decision service consumes two topics. Its matches stage (``Decider``) hands each e-channel result
(``is_session_frame``) to the ``SessionDesk`` besides making the per-frame ``Decision`` as for any frame; a second
stage (``session_stage``, whose processor is ``SessionEvents``) feeds it the session control events capture
publishes (OPENED, CLOSED, CANCELLED; the desk's own PROGRESS and DECIDED events on the same topic are skipped). A
timer thread ticks every ~100 ms, so a session times out even when no more frames come. Those three threads fold
inputs into the sessions under the desk's lock.

For every change of a session the desk saves its state (``store.py``) under that lock, then queues what is to
be told: a KIND_PROGRESS ``SessionEvent`` while undecided, the outcome once. A fourth thread, the announcer, works
through the queue outside the lock, so a broker or database that hangs holds up announcements, never the folding of
results (nor the matches stage, which also serves CCTV). Announcing an outcome is: record the stop-list alert if
there is one (stored and audited by ``AlertRecorder``, then published on ``sightline.alerts.v1``; its id goes on the
update), append the session's one audit record, publish KIND_DECIDED (keyed by gate id), each step flagged in the
store; what fails is retried by the timer, and a restart finishes the announcement from the store without repeating
the audit (the store is the outbox: an outcome is saved before the input that reached it is committed). The store
never overwrites a decided session, so a replayed input, a restart or a second replica cannot decide a session
twice; folding is idempotent per frame id, so a replayed result is not counted twice.

Session events and match results travel on different topics, so a session's first results may arrive before its
OPENED event: they are held (at most ``hold_max``, for at most ``hold_seconds``) and folded in when it comes. Held
results live in memory only: a restart while they wait loses them, which can only cost the session evidence (a
referral by time-out at worst), never accept it.

Stop-list hits at a gate are alerted here, once per session; the per-frame decision engine raises no alert for
e-channel frames (``engine.py``), so a gate's frame never raises an alert twice.

A right-to-erasure notice reaches the desk through ``erase_subject`` (the erasures stage, ``erasure.py``): under the
desk's lock, the store deletes the sessions claiming the subject and the desk forgets its open ones and their held
results, so no later input saves them again. Sessions of the subject open in another replica's memory are refused by
the store when next saved (``SessionStore.save``) and leave that desk then. An outcome reached before the notice and
already queued is still announced (the traveller at the gate is waiting for it), but a stop-list hit on an erased
subject is announced without it: no alert, and no reason naming the subject (``forget_stop_list_hit``).

A malformed control event (no ids, or ids longer than ``limits.ID_CHARS``; an OPENED event with times no gate sends,
``SessionEngine.open``) is refused (dead-lettered) before it reaches the timer, and the timer handles each session on
its own: one session that fails to save cannot hold up the time-outs of the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sightline.common import codec, limits, telemetry
from sightline.common.audit import Action, AuditLog
from sightline.common.codec import outcome_name
from sightline.common.stage import EventProcessor, InputEvent, Output, Stage
from sightline.common.topics import ALERTS, SESSIONS
from sightline.decision.echannel.engine import SessionEngine, SessionState, forget_stop_list_hit
from sightline.decision.echannel.store import SessionStore
from sightline.decision.review.recorder import AlertRecorder
from sightline.v1 import events_pb2, session_pb2, types_pb2

log = logging.getLogger(__name__)

SESSION_STAGE = "decision-sessions"
AUDIT_PURPOSE = "e-channel"
STOP_LIST_PURPOSE = "e-channel stop list"  # a gate's stop-list hit, as its alert is audited
RECENTLY_DECIDED = 10_000  # ids of decided sessions kept in memory, so late results for them are dropped at once
ANNOUNCE_RETRY_SECONDS = 5.0
MAX_AUDIT_REASONS_CHARS = 1000
MAX_QUEUED_PROGRESS = 1000  # progress events waiting for the announcer; beyond, new ones are dropped (informative only)

Kind = session_pb2.SessionEvent.Kind
OWN_KINDS = (session_pb2.SessionEvent.KIND_PROGRESS, session_pb2.SessionEvent.KIND_DECIDED)


class Publisher(Protocol):
    """Where session events and alerts go (``common.audit.TopicPublisher``)."""

    def send(self, topic: str, key: bytes, value: bytes, wait: bool = True) -> None: ...


def is_session_frame(frame: types_pb2.FrameRef) -> bool:
    """An e-channel frame of a session: its result belongs to that session's fusion."""
    return frame.purpose == types_pb2.PURPOSE_ECHANNEL and bool(frame.session_id)


@dataclass(frozen=True)
class _Held:
    result: events_pb2.MatchResult
    held_at: float  # monotonic


@dataclass(frozen=True)
class _Progress:
    """A KIND_PROGRESS event, made under the desk's lock, waiting to be published."""

    session_id: str
    gate_id: str
    event: bytes


@dataclass(frozen=True)
class _Outcome:
    """A decided session to announce; without its state (a retry), what is left to do is read from the store."""

    session_id: str
    state: SessionState | None = None  # decided: it no longer changes, so the announcer may read it unlocked
    update: session_pb2.SessionUpdate | None = None


class SessionDesk:
    """Runs the session engine over the live topics: persists, times out, announces; thread-safe."""

    def __init__(
        self,
        engine: SessionEngine,
        store: SessionStore,
        recorder: AlertRecorder,
        audit: AuditLog,
        publisher: Publisher,
        hold_seconds: float = 2.0,
        hold_max: int = 1000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``monotonic``: the clock of how long results are held and when announcements are retried (deadlines
        follow the engine's wall clock)."""
        self.engine = engine
        self.store = store
        self.recorder = recorder
        self.audit = audit
        self.publisher = publisher
        self.hold_seconds = hold_seconds
        self.hold_max = hold_max
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._open: dict[str, SessionState] = {}
        self._recovered: set[str] = set()  # open sessions loaded at start, re-read from the store when next touched
        self._decided: OrderedDict[str, None] = OrderedDict()
        self._held: OrderedDict[str, list[_Held]] = OrderedDict()  # by session id, oldest first
        self._held_count = 0
        # What the announcer is to publish, and outcomes to announce again (session id -> when, monotonic); under
        # their own lock, never held across I/O.
        self._queued = threading.Condition()
        self._outbox: deque[_Progress | _Outcome] = deque()
        # Open session -> the frames_seen of the last PROGRESS queued: a PROGRESS is told once per count (its
        # CloudEvents id is the count), not again when the close or a tick changes nothing the kiosk sees.
        self._progress_told: dict[str, int] = {}
        self._queued_progress = 0
        self._unannounced: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- life cycle ----------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Resume the sessions a previous run left open, and finish announcing those it decided."""
        with self._lock:
            for state in self.store.load_open():
                self._open[state.session_id] = state
                self._recovered.add(state.session_id)
            unannounced = [stored.state.session_id for stored in self.store.unannounced()]
            for session_id in unannounced:
                self._remember_decided(session_id)
        with self._queued:
            self._unannounced.update(dict.fromkeys(unannounced, 0.0))
        log.info("e-channel sessions recovered", extra={"open": len(self._open), "unannounced": len(unannounced)})

    def start(self, tick_seconds: float = 0.1) -> None:
        """Start the timer thread (time-outs, retries) and the announcer thread."""
        self._threads = [
            threading.Thread(target=self._run_timer, args=(tick_seconds,), name="session-timer", daemon=True),
            threading.Thread(target=self._run_announcer, name="session-announcer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the threads, giving the announcer a few seconds to publish what is queued; an outcome it could not
        announce is in the store, announced by the next start."""
        self._stop.set()
        with self._queued:
            self._queued.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def _run_timer(self, tick_seconds: float) -> None:
        while not self._stop.wait(tick_seconds):
            try:
                self.tick(self.engine.clock())
            except Exception:
                log.exception("session tick failed")

    def _run_announcer(self) -> None:
        stopping = False
        while not stopping:  # after a stop, what is queued goes out once more (join waits up to 5 s for it)
            with self._queued:
                self._queued.wait_for(lambda: self._outbox or self._stop.is_set())
            stopping = self._stop.is_set()
            self.announce_pending()

    # -- inputs --------------------------------------------------------------------------------------------------

    def on_event(self, event: session_pb2.SessionEvent) -> None:
        """A session control event from capture (the desk's own PROGRESS and DECIDED events are skipped)."""
        if event.kind in OWN_KINDS:
            return
        _check_ids(event)
        with self._lock:
            if event.kind == session_pb2.SessionEvent.KIND_OPENED:
                self._opened(event)
                return
            state = self._open_session(event.session_id)
            if state is None:
                log.info(
                    "session event for a session not open here: ignored",
                    extra={"session_id": event.session_id, "kind": codec.enum_label(Kind, event.kind, "")},
                )
            elif event.kind == session_pb2.SessionEvent.KIND_CLOSED:
                at = codec.seconds(event.at) if event.HasField("at") else self.engine.clock()
                self._changed(state, self.engine.request_close(state, at, event.update.frames_seen))
            elif event.kind == session_pb2.SessionEvent.KIND_CANCELLED:
                self._changed(state, self.engine.cancel(state, "; ".join(event.update.reasons)))

    def on_result(self, result: events_pb2.MatchResult) -> None:
        """The match result of one frame of a session (``is_session_frame``)."""
        session_id = result.frame.session_id
        with self._lock:
            state = self._open_session(session_id)
            if state is not None:
                self._apply(state, result)
            elif session_id not in self._decided:
                self._hold(result)

    def erase_subject(self, subject_id: str, erased_at: datetime | None = None) -> int:
        """Right to erasure: delete the sessions claiming the subject (``SessionStore.erase_subject``) and forget
        those this desk has open and the results it holds for them; returns how many sessions were deleted."""
        with self._lock:  # no input folds into one of these sessions, and saves it again, meanwhile
            erased = self.store.erase_subject(subject_id, erased_at)
            for state in [s for s in self._open.values() if s.claim_subject_id == subject_id]:
                self._remember_decided(state.session_id)  # later inputs for it are dropped, not held
            for session_id, items in list(self._held.items()):
                if any(item.result.frame.claim_subject_id == subject_id for item in items):
                    del self._held[session_id]
                    self._held_count -= len(items)
        return erased

    def tick(self, now: float) -> None:
        """Time out sessions past their deadline (``now``, wall clock), close those past their close grace, save
        again a decided session whose save failed, drop stale held results, queue again the announcements that
        failed."""
        with self._lock:
            for state in list(self._open.values()):
                try:  # one session that cannot be saved must not hold up the time-outs of the others
                    self._tick_one(state, now)
                except Exception:
                    log.exception("session tick failed", extra={"session_id": state.session_id})
            self._expire_held()
        self._queue_retries()

    def _tick_one(self, state: SessionState, now: float) -> None:
        if state.decided:  # decided here, but its save failed (a decided state leaves _open once saved)
            self._changed(state, self.engine.update(state, []))
            return
        update = self.engine.tick(state, now)
        if update is not None:
            self._changed(state, update)

    # -- sessions ------------------------------------------------------------------------------------------------

    def _opened(self, event: session_pb2.SessionEvent) -> None:
        if self._open_session(event.session_id) is not None or event.session_id in self._decided:
            return  # a replayed OPENED: the session goes on (or stays decided)
        state = self._open[event.session_id] = self.engine.open(event)
        try:
            self._changed(state, self.engine.update(state, []))
        except BaseException:  # not saved: the OPENED event is processed again, and the timer must not carry it
            self._open.pop(event.session_id, None)
            raise
        held = self._held.pop(event.session_id, [])
        self._held_count -= len(held)
        for item in held:
            self._apply(state, item.result)

    def _open_session(self, session_id: str) -> SessionState | None:
        """The open session with this id, from memory or else the store; None when unknown or already decided.

        A session loaded at start is read again the first time an input touches it: with several replicas, the one
        that owned its partition until a rebalance may have folded more frames in since.
        """
        state = self._open.get(session_id)
        if session_id in self._decided or (state is not None and session_id not in self._recovered):
            return state
        self._recovered.discard(session_id)
        stored = self.store.get(session_id)
        if stored is None:
            self._open.pop(session_id, None)
            self._progress_told.pop(session_id, None)
            return None
        if stored.state.decided:
            self._remember_decided(session_id)
            return None
        self._open[session_id] = stored.state
        return stored.state

    def _apply(self, state: SessionState, result: events_pb2.MatchResult) -> None:
        seen = state.frames_seen
        update = self.engine.on_result(state, result)
        if state.frames_seen != seen:  # unchanged: a replayed frame, or one after the outcome
            self._changed(state, update)

    def _changed(self, state: SessionState, update: session_pb2.SessionUpdate) -> None:
        """Persist the session, then queue what to tell: progress while undecided, the outcome once."""
        if not self.store.save(state):  # decided already, by an earlier run or another replica
            self._remember_decided(state.session_id)
            return
        if not state.decided:
            if self._progress_told.get(state.session_id) == update.frames_seen:
                return
            self._progress_told[state.session_id] = update.frames_seen
            event = self._event(state, session_pb2.SessionEvent.KIND_PROGRESS, update)
            self._queue(_Progress(state.session_id, state.gate_id, event.SerializeToString()))
            return
        self._remember_decided(state.session_id)
        log.info(
            "session decided",
            extra={
                "session_id": state.session_id,
                "gate_id": state.gate_id,
                "outcome": outcome_name(state.outcome),
                "frames_seen": state.frames_seen,
            },
        )
        self._queue(_Outcome(state.session_id, state, update))

    def _remember_decided(self, session_id: str) -> None:
        self._open.pop(session_id, None)
        self._progress_told.pop(session_id, None)
        self._recovered.discard(session_id)
        self._decided[session_id] = None
        self._decided.move_to_end(session_id)
        while len(self._decided) > RECENTLY_DECIDED:
            self._decided.popitem(last=False)

    # -- announcing (the announcer thread, outside the desk's lock) ----------------------------------------------

    def _queue(self, item: _Progress | _Outcome) -> None:
        with self._queued:
            if isinstance(item, _Progress):
                if self._queued_progress >= MAX_QUEUED_PROGRESS:  # the broker is not keeping up: progress can wait
                    return
                self._queued_progress += 1
            self._outbox.append(item)
            self._queued.notify()

    def _take(self) -> _Progress | _Outcome | None:
        with self._queued:
            if not self._outbox:
                return None
            item = self._outbox.popleft()
            if isinstance(item, _Progress):
                self._queued_progress -= 1
            return item

    def announce_pending(self) -> None:
        """Publish what is queued, in order: progress events, and the announcements of decided sessions. The
        announcer thread runs it (``start``); it never holds the desk's lock."""
        while (item := self._take()) is not None:
            if isinstance(item, _Progress):
                self._publish_progress(item)
            else:
                self._announce(item)

    def _queue_retries(self) -> None:
        now = self._monotonic()
        with self._queued:
            due = [session_id for session_id, at in self._unannounced.items() if at <= now]
            for session_id in due:
                del self._unannounced[session_id]  # back in once this attempt fails
        for session_id in due:
            self._queue(_Outcome(session_id))

    def _announce(self, item: _Outcome) -> None:
        """Alert, audit and publish a decided session; what fails is retried by the timer."""
        try:
            if item.state is None or item.update is None:  # a retry: the store says what is left to do
                stored = self.store.get(item.session_id)
                if stored is None or stored.published:
                    return
                state, update, audited = stored.state, self.engine.update(stored.state, []), stored.audited
            else:
                state, update, audited = item.state, item.update, False
            alert = self.engine.stop_list_alert(state)
            if alert is not None:
                # Stored and audited once; a retry gets the stored alert back. None: the hit's subject was erased.
                alert = self.recorder.record(alert, STOP_LIST_PURPOSE, datetime.fromtimestamp(state.opened_at, UTC))
                if alert is None:  # nothing announced names the erased subject: a copy, the queued state is shared
                    state = SessionState.from_dict(state.to_dict())
                    forget_stop_list_hit(state)
                    update = self.engine.update(state, [])
            if alert is not None:
                update.alert_id = alert.alert_id
                self.publisher.send(ALERTS.name, state.gate_id.encode(), alert.SerializeToString(), wait=True)
            if not audited:
                self._audit(state, update)
                self.store.mark_audited(state.session_id)
            self._publish(self._event(state, session_pb2.SessionEvent.KIND_DECIDED, update), wait=True)
            self.store.mark_published(state.session_id)
        except Exception:
            log.warning(
                "session outcome not announced yet; will retry", exc_info=True, extra={"session_id": item.session_id}
            )
            with self._queued:
                self._unannounced[item.session_id] = self._monotonic() + ANNOUNCE_RETRY_SECONDS

    def _audit(self, state: SessionState, update: session_pb2.SessionUpdate) -> None:
        """The session's one audit record: scores and ids, never images or descriptors."""
        liveness = ("passed" if state.liveness_passed else "failed") if state.liveness_assessed else "not assessed"
        details: dict[str, Any] = {
            "session_id": state.session_id,
            "gate_id": state.gate_id,
            "frames_seen": update.frames_seen,
            "frames_verified": update.frames_verified,
            "best_similarity": f"{update.best_similarity:.3f}",
            "best_quality": f"{update.best_quality:.0f}",
            "liveness": liveness,
            "liveness_score": f"{update.liveness_score:.2f}",
            "policy_version": update.policy_version,
            "model_version": update.model_version,
            "elapsed_ms": f"{update.elapsed_ms:.0f}",
            "alert_id": update.alert_id or None,
            "reasons": "; ".join(update.reasons)[:MAX_AUDIT_REASONS_CHARS],
        }
        self.audit.append(
            f"gate:{state.gate_id}",
            Action.VERIFY,
            state.claim_subject_id,
            AUDIT_PURPOSE,
            outcome_name(state.outcome),
            details,
        )

    def _publish_progress(self, item: _Progress) -> None:
        try:  # progress is informative: a lost one is superseded by the next, or by the outcome
            self.publisher.send(SESSIONS.name, item.gate_id.encode(), item.event, wait=False)
            telemetry.EVENTS_PUBLISHED.labels(SESSION_STAGE, SESSIONS.name).inc()
        except Exception:
            log.warning("session progress not published", exc_info=True, extra={"session_id": item.session_id})

    def _publish(self, event: session_pb2.SessionEvent, wait: bool) -> None:
        self.publisher.send(SESSIONS.name, event.gate_id.encode(), event.SerializeToString(), wait=wait)
        telemetry.EVENTS_PUBLISHED.labels(SESSION_STAGE, SESSIONS.name).inc()

    @staticmethod
    def _event(state: SessionState, kind: int, update: session_pb2.SessionUpdate) -> session_pb2.SessionEvent:
        event = session_pb2.SessionEvent(
            kind=kind,
            session_id=state.session_id,
            gate_id=state.gate_id,
            claim_subject_id=state.claim_subject_id,
            update=update,
        )
        event.opened_at.FromNanoseconds(int(state.opened_at * 1e9))
        event.deadline.FromNanoseconds(int(state.deadline * 1e9))
        event.at.CopyFrom(codec.now())
        return event

    # -- results ahead of their session --------------------------------------------------------------------------

    def _hold(self, result: events_pb2.MatchResult) -> None:
        self._held.setdefault(result.frame.session_id, []).append(_Held(result, self._monotonic()))
        self._held_count += 1
        while self._held_count > self.hold_max:  # drop the oldest session's oldest result
            session_id, items = next(iter(self._held.items()))
            items.pop(0)
            self._held_count -= 1
            if not items:
                del self._held[session_id]

    def _expire_held(self) -> None:
        oldest = self._monotonic() - self.hold_seconds
        for session_id, items in list(self._held.items()):
            kept = [item for item in items if item.held_at > oldest]
            if len(kept) < len(items):
                log.info(
                    "results of a session that was never opened here dropped",
                    extra={"session_id": session_id, "results": len(items) - len(kept)},
                )
                self._held_count -= len(items) - len(kept)
                if kept:
                    self._held[session_id] = kept
                else:
                    del self._held[session_id]


def _check_ids(event: session_pb2.SessionEvent) -> None:
    """Refuse a control event without its ids, or with ids longer than any API lets through (``limits.ID_CHARS``):
    they become the session's key, the audit record's principal (``gate:<id>``) and log fields."""
    if not event.session_id or not event.gate_id:
        raise codec.MalformedEvent("a session event needs a session id and a gate id")
    for name in ("session_id", "gate_id", "claim_subject_id"):
        if len(getattr(event, name)) > limits.ID_CHARS:
            raise codec.MalformedEvent(f"session event {name} longer than {limits.ID_CHARS} characters")


class SessionEvents(EventProcessor):
    """The sessions stage's processor: hands each control event of ``sightline.sessions.v1`` to the desk (the desk's
    own PROGRESS and DECIDED events on that topic are skipped there); it publishes nothing."""

    def __init__(self, desk: SessionDesk) -> None:
        self.desk = desk

    def process_event(self, event: InputEvent) -> list[Output]:
        self.desk.on_event(codec.parse(session_pb2.SessionEvent, event.value))
        return []


def session_stage(desk: SessionDesk) -> Stage:
    """The stage that feeds the desk the session control events of ``sightline.sessions.v1``."""
    return Stage(SESSION_STAGE, SESSIONS, [], SessionEvents(desk))
