"""Decision service: match results in, decisions and alerts out, following the configured policy.

Consumes ``sightline.matches.v1``; publishes one ``Decision`` per face to ``sightline.decisions.v1`` and an ``Alert``
for review to ``sightline.alerts.v1`` when a watchlist subject is confirmed on enough frames. An alert is never an
automatic action: it starts PENDING_REVIEW, is stored for review before it is published, and reviewers confirm
(two different reviewers) or reject it through the ReviewService on this service's gRPC port (``review.py``). Alerts
and review actions are written to the audit log (``common/audit.py``), served by the AuditService.
"""

from __future__ import annotations

import logging
import threading

from sightline.common import codec, telemetry
from sightline.common.audit import AuditLog, AuditServicer, TopicPublisher, audit_topic_publisher
from sightline.common.config import KafkaSettings
from sightline.common.runtime import Servicer, run_service
from sightline.common.stage import InputEvent, Output, Stage, one_at_a_time
from sightline.common.topics import ALERTS, DECISIONS, MATCHES
from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import load_policy
from sightline.decision.review import AlertRecorder, ReviewServicer, ReviewStore, alert_publisher
from sightline.decision.settings import DecisionSettings
from sightline.v1 import audit_pb2_grpc, events_pb2, review_pb2_grpc

SERVICE = "decision"
log = logging.getLogger(__name__)


def decide(engine: DecisionEngine, event: InputEvent, recorder: AlertRecorder | None = None) -> list[Output]:
    result = codec.parse(events_pb2.MatchResult, event.value)
    decisions, alerts = engine.decide(result)
    if recorder is not None:
        # Stored (and audited) before it is published: a reviewer can always find an alert an integrator saw.
        alerts = [recorder.record(alert) for alert in alerts]
    key = result.frame.source_id.encode()
    telemetry.END_TO_END_LATENCY.labels(SERVICE).observe(codec.seconds_since(result.frame.captured_at))
    return [Output(DECISIONS, key, d.SerializeToString()) for d in decisions] + [
        Output(ALERTS, key, a.SerializeToString()) for a in alerts
    ]


def main() -> None:
    settings, kafka = DecisionSettings(), KafkaSettings()
    policy = load_policy(settings.policy_file)
    log.info("policy loaded", extra={"policy_version": policy.version})
    url = settings.database_url.get_secret_value()
    publisher = TopicPublisher(kafka)
    audit = AuditLog.open(url, publish=audit_topic_publisher(publisher))
    reviews = ReviewStore.open(url, settings.suppression_seconds)
    engine = DecisionEngine(policy, suppressed=reviews.suppressed)
    recorder = AlertRecorder(reviews, audit)
    review_servicer = ReviewServicer(reviews, audit, alert_publisher(publisher))
    # Status changes a previous run stored but could not publish go out now, without holding up the start.
    threading.Thread(target=review_servicer.flush_outbox, name="alert-outbox", daemon=True).start()
    servicers = [
        Servicer(review_pb2_grpc.add_ReviewServiceServicer_to_server, review_servicer, "sightline.v1.ReviewService"),
        Servicer(audit_pb2_grpc.add_AuditServiceServicer_to_server, AuditServicer(audit), "sightline.v1.AuditService"),
    ]
    stage = Stage(SERVICE, MATCHES, [DECISIONS, ALERTS], one_at_a_time(lambda event: decide(engine, event, recorder)))

    def close() -> None:
        publisher.close()
        reviews.close()
        audit.close()

    run_service(SERVICE, settings, kafka, servicers, [stage], on_stop=close)
