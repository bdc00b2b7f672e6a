"""Decision service: match results in, decisions and alerts out, following the configured policy.

Consumes ``sightline.matches.v1``; publishes one ``Decision`` per face to ``sightline.decisions.v1`` and an ``Alert``
for review to ``sightline.alerts.v1`` when a watchlist subject is confirmed on enough frames. E-channel (gate)
sessions are fused beside that: a second stage consumes ``sightline.sessions.v1`` and the session results of the
matches topic go to the same ``SessionDesk``, which publishes progress and outcomes on the sessions topic
(``echannel/desk.py``, docs/echannel.md). A third stage consumes the right-to-erasure notices matching publishes on
``sightline.erasures.v1`` (``Eraser``): the subject's alerts, reviews, feedback and sessions are deleted, and the
erasure is audited (``erasure.py``). Each of the three stages runs an ``EventProcessor`` (common/stage.py):
``Decider`` here, ``SessionEvents`` (``echannel/desk.py``) and ``Eraser``.

An alert is never an automatic action: it starts PENDING_REVIEW, is stored for review before it is published, and
reviewers confirm (two different reviewers) or reject it through the ReviewService on this service's gRPC port
(``review/``). Alerts, review actions, decided sessions and erasures are written to the audit log
(``common/audit.py``), served by the AuditService.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sightline.common import codec, telemetry
from sightline.common.audit import AuditLog, AuditServicer, TopicPublisher, audit_topic_publisher
from sightline.common.config import KafkaSettings
from sightline.common.retention import PurgeSchedule, RetentionSettings
from sightline.common.runtime import Servicer, run_service
from sightline.common.stage import EventProcessor, InputEvent, Output, Stage
from sightline.common.topics import ALERTS, DECISIONS, MATCHES
from sightline.decision.echannel.desk import SessionDesk, is_session_frame, session_stage
from sightline.decision.echannel.engine import SessionEngine
from sightline.decision.echannel.store import SessionStore
from sightline.decision.engine import DecisionEngine
from sightline.decision.erasure import erasure_stage
from sightline.decision.policy import Policy, load_policy
from sightline.decision.review.recorder import AlertRecorder
from sightline.decision.review.servicer import ReviewServicer, alert_publisher
from sightline.decision.review.store import ReviewStore
from sightline.decision.settings import DecisionSettings
from sightline.v1 import events_pb2, types_pb2

SERVICE = "decision"
SESSION_RESULT_NOT_FOLDED = "session_result_not_folded"  # the EVENTS_FAILED reason of a result its session missed
log = logging.getLogger(__name__)
Erased = Callable[
    [str, datetime], bool
]  # (subject id, when a frame was seen): erased since? (ReviewStore.erased_since)


class Decider(EventProcessor):
    """The matches stage's processor: the decisions and alerts of one match result.

    The engine records each alert it raises before anything else (stored and audited, so a reviewer can always find
    an alert an integrator saw; a store failure raises, and the result is processed again). ``sessions``: the desk a
    gate frame's result is also handed to (``echannel/desk.py``). ``erased(subject_id, seen_at)``: whether a subject
    was erased after a frame seen then (``ReviewStore.erased_since``); a decision naming one (a result in flight at
    the erasure) is not published.
    """

    def __init__(
        self, engine: DecisionEngine, sessions: SessionDesk | None = None, erased: Erased | None = None
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.erased = erased

    def process_event(self, event: InputEvent) -> list[Output]:
        result = codec.parse(events_pb2.MatchResult, event.value)
        decisions, alerts = self.engine.decide(result)  # a gate's frames get no alert here: their session raises it
        if self.sessions is not None and is_session_frame(result.frame):
            _fold_into_session(self.sessions, result)
        if self.erased is not None:
            decisions = _published(decisions, result.frame, self.erased)
            alerts = [a for a in alerts if any(d.alert_id == a.alert_id for d in decisions)]
        key = result.frame.source_id.encode()
        return [Output(DECISIONS, key, d.SerializeToString()) for d in decisions] + [
            Output(ALERTS, key, a.SerializeToString()) for a in alerts
        ]


def _published(
    decisions: list[events_pb2.Decision], frame: types_pb2.FrameRef, erased: Erased
) -> list[events_pb2.Decision]:
    """The decisions, those naming a subject erased since the frame was seen (its match or its claim) withheld: right
    to erasure means nothing more is said about the subject once the notice is applied, however late a result
    arrives. A withheld decision is replaced by a WITHHELD record that says only that, so the frame stays
    accounted for."""
    seen_at = frame.captured_at.ToDatetime(UTC) if frame.HasField("captured_at") else datetime.now(UTC)
    gone = {
        name for name in {frame.claim_subject_id, *(d.subject_id for d in decisions)} - {""} if erased(name, seen_at)
    }
    if not gone:
        return decisions
    claim_gone = frame.claim_subject_id in gone
    published = [_withheld(d) if claim_gone or d.subject_id in gone else d for d in decisions]
    log.info(
        "decisions naming an erased subject withheld",
        extra={
            "frame_id": frame.frame_id,
            "withheld": sum(d.outcome == events_pb2.OUTCOME_WITHHELD for d in published),
        },
    )
    return published


WITHHELD = events_pb2.OUTCOME_WITHHELD


def _withheld(decision: events_pb2.Decision) -> events_pb2.Decision:
    """The record that stands for a withheld decision: its id, frame (without the claim) and face, nothing more."""
    frame = types_pb2.FrameRef()
    frame.CopyFrom(decision.frame)
    frame.ClearField("claim_subject_id")
    frame.ClearField("watchlists")
    return events_pb2.Decision(
        decision_id=decision.decision_id,
        frame=frame,
        face_index=decision.face_index,
        outcome=events_pb2.OUTCOME_WITHHELD,
        reasons=["withheld: it concerned a subject erased since the frame was seen"],
        policy_version=decision.policy_version,
        model_version=decision.model_version,
        decided_at=decision.decided_at,
    )


def _fold_into_session(sessions: SessionDesk, result: events_pb2.MatchResult) -> None:
    """Hand a gate frame's result to its session. A failure there (the session store unreachable) must not
    dead-letter the frame's per-frame decision: it is logged and counted, and the session, short of this frame's
    evidence, is at worst referred by time-out."""
    try:
        sessions.on_result(result)
    except Exception:
        log.exception(
            "e-channel result not folded into its session",
            extra={"session_id": result.frame.session_id, "frame_id": result.frame.frame_id},
        )
        telemetry.EVENTS_FAILED.labels(SERVICE, SESSION_RESULT_NOT_FOLDED).inc()


def main() -> None:
    settings, kafka = DecisionSettings(), KafkaSettings()
    policy = load_policy(settings.policy_file)
    log.info("policy loaded", extra={"policy_version": policy.version})
    url = settings.database_url.get_secret_value()
    publisher = TopicPublisher(kafka)
    audit = AuditLog.open_configured(publish=audit_topic_publisher(publisher))  # the chain shared with matching
    reviews = ReviewStore.open(url, settings.suppression_seconds)
    recorder = AlertRecorder(reviews, audit)
    engine = DecisionEngine(policy, suppressed=reviews.suppressed, alerts=recorder)
    review_servicer = ReviewServicer(reviews, audit, alert_publisher(publisher))
    # Status changes a previous run stored but could not publish go out now, without holding up the start.
    threading.Thread(target=review_servicer.flush_outbox, name="alert-outbox", daemon=True).start()
    servicers = [
        Servicer.of(review_servicer),
        Servicer.of(AuditServicer(audit)),
    ]
    session_store = SessionStore.open(url)
    sessions = start_sessions(settings, policy, session_store, recorder, audit, publisher)
    stage = Stage(SERVICE, MATCHES, [DECISIONS, ALERTS], Decider(engine, sessions, reviews.erased_since))

    purge = purge_schedule(reviews, session_store)
    purge.start()

    def close() -> None:
        purge.stop()
        sessions.stop()
        publisher.close()
        reviews.close()
        session_store.close()
        audit.close()

    stages = [stage, session_stage(sessions), erasure_stage(reviews, sessions, audit)]
    run_service(SERVICE, settings, kafka, servicers, stages, on_stop=close, audit=audit)


def purge_schedule(reviews: ReviewStore, sessions: SessionStore) -> PurgeSchedule:
    """Alerts with their reviews, and decided sessions, deleted once past their retention (common/retention.py).

    A decided session is kept an hour longer than its events stay on the sessions topic, so an OPENED event replayed
    from the topic always finds its session already decided.
    """
    limits = RetentionSettings()
    return PurgeSchedule(
        SERVICE,
        {
            "alerts": (timedelta(days=limits.alerts_days), reviews.purge),
            "sessions": (timedelta(hours=limits.sessions_hours + 1), sessions.purge_decided),
        },
        limits.purge_interval_s,
    )


def start_sessions(
    settings: DecisionSettings,
    policy: Policy,
    store: SessionStore,
    recorder: AlertRecorder,
    audit: AuditLog,
    publisher: TopicPublisher,
) -> SessionDesk:
    """The e-channel session desk, with the sessions a previous run left open, and its timer and announcer running."""
    desk = SessionDesk(
        SessionEngine(policy),
        store,
        recorder,
        audit,
        publisher,
        settings.session_hold_seconds,
        settings.session_hold_max,
    )
    desk.recover()
    desk.start(settings.session_tick_seconds)
    return desk
