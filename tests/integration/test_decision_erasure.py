"""The right to erasure in a real decision service process: a ``SubjectErased`` notice on the erasures topic removes
the subject's alerts, reviews and "not this person" feedback from what the ReviewService shows, leaves other subjects
alone, and is audited once per notice handled; a replayed notice erases nothing more, and a result of a frame seen
before the erasure that arrives after it raises no alert.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from test_review_flow import alert_events, kafka, match_result, wait_for  # noqa: F401 - kafka: a fixture

from sightline.common.bus import make_producer
from sightline.common.config import KafkaSettings
from sightline.common.rpc import channel
from sightline.common.topics import ALERTS, DECISIONS, ERASURES, MATCHES
from sightline.tooling.localstack import LocalStack
from sightline.v1 import audit_pb2, audit_pb2_grpc, events_pb2, review_pb2, review_pb2_grpc

ERASED, KEPT = "erased-subject", "kept-subject"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    run_dir = tmp_path_factory.mktemp("erasure")
    env = {
        "SIGHTLINE_DECISION_DATABASE_URL": f"sqlite:///{run_dir / 'decision.db'}",
        "SIGHTLINE_AUDIT_DATABASE_URL": f"sqlite:///{run_dir / 'audit.db'}",
    }
    with LocalStack(run_dir, ports="auto", services=("decision",), env=env) as running:
        running.start(timeout=120)
        yield running


def publish(kafka: KafkaSettings, topic: str, key: str, messages: list[object]) -> None:
    producer = make_producer(kafka)
    for message in messages:
        producer.send(topic, key=key.encode(), value=message.SerializeToString())  # type: ignore[attr-defined]
    producer.flush(10)
    producer.close()


def raise_alert(kafka: KafkaSettings, source: str, subject: str, captured_at: float) -> None:
    """Two agreeing frames of ``subject`` on the matches topic: the default policy's MATCH, and an alert."""
    publish(
        kafka, MATCHES.name, source, [match_result(source, seq, captured_at + seq * 0.2, subject) for seq in (1, 2)]
    )


def notice(subject: str, reference: str) -> events_pb2.SubjectErased:
    """What matching publishes once ``sightline erase SUBJECT --reference CASE`` has erased the gallery's copy."""
    made = events_pb2.SubjectErased(subject_id=subject, templates_removed=2, watchlists=["watch"], reference=reference)
    made.erased_at.GetCurrentTime()
    return made


def erase_records(audit: audit_pb2_grpc.AuditServiceStub, count: int) -> list[audit_pb2.AuditRecord]:
    """The decision service's ERASE records about the erased subject, once there are ``count`` of them."""
    request = audit_pb2.ListAuditRecordsRequest(
        action=audit_pb2.AUDIT_ACTION_ERASE, principal="service:decision", subject_id=ERASED, page_size=100
    )
    deadline = time.monotonic() + 60
    while len(records := list(audit.ListAuditRecords(request, timeout=10).records)) < count:
        assert time.monotonic() < deadline, f"timed out waiting for {count} ERASE record(s): {records}"
        time.sleep(0.5)
    assert len(records) == count, records
    return records


def test_an_erasure_notice_removes_the_subjects_alerts_reviews_and_feedback(
    stack: LocalStack, kafka: KafkaSettings
) -> None:
    address = stack.addresses["decision"]
    review = review_pb2_grpc.ReviewServiceStub(channel(address))  # the stack's local-admin: every role
    audit = audit_pb2_grpc.AuditServiceStub(channel(address))
    now = time.time()
    for source, subject in (("cam-x1", ERASED), ("cam-x2", ERASED), ("cam-y", KEPT)):
        raise_alert(kafka, source, subject, now)
    raised = {
        source: alert_events(kafka, source, [events_pb2.ALERT_STATUS_PENDING_REVIEW])[0]
        for source in ("cam-x1", "cam-x2", "cam-y")
    }
    review.ReviewAlert(
        review_pb2.ReviewAlertRequest(
            alert_id=raised["cam-x2"].alert_id,
            action=review_pb2.REVIEW_ACTION_REJECT,
            not_this_person=True,
            comment="lookalike",
        ),
        timeout=10,
    )
    feedback = review.ListFeedback(review_pb2.ListFeedbackRequest(), timeout=10)
    assert [f.subject_id for f in feedback.feedback] == [ERASED]

    erasure = notice(ERASED, "DSAR-2026-0117")
    publish(kafka, ERASURES.name, ERASED, [erasure])
    (record,) = erase_records(audit, 1)
    assert (record.principal, record.purpose, record.result) == (
        "service:decision",
        "right to erasure",
        "erased: 2 alerts, 1 suppression, 0 sessions",
    )
    assert dict(record.details) | {"erased_at": ""} == {
        "alerts": "2",
        "reviews": "1",
        "suppressions": "1",
        "sessions": "0",
        "reference": "DSAR-2026-0117",
        "erased_at": "",
    }

    listed = review.ListAlerts(review_pb2.ListAlertsRequest(page_size=100), timeout=10).alerts
    assert [(a.alert.alert_id, a.alert.subject_id) for a in listed] == [(raised["cam-y"].alert_id, KEPT)]
    assert listed[0].alert.status == events_pb2.ALERT_STATUS_PENDING_REVIEW
    for source in ("cam-x1", "cam-x2"):
        with pytest.raises(grpc.RpcError) as gone:
            review.GetAlert(review_pb2.GetAlertRequest(alert_id=raised[source].alert_id), timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert not review.ListFeedback(review_pb2.ListFeedbackRequest(), timeout=10).feedback

    # The same notice again (a replay): audited again, nothing more to erase, the other subject still untouched.
    publish(kafka, ERASURES.name, ERASED, [erasure])
    replayed = erase_records(audit, 2)[1]
    assert replayed.result == "erased: 0 alerts, 0 suppressions, 0 sessions"
    assert replayed.details["reference"] == "DSAR-2026-0117"

    # A frame seen before the erasure whose result arrives after it (a backlog on the matches topic) raises no alert,
    # and its decision, naming the subject, is withheld (a WITHHELD record in its place);
    # a later frame of the same camera (same partition, so
    # decided after them) marks the point by which they were handled.
    raise_alert(kafka, "cam-x3", ERASED, erasure.erased_at.seconds - 10)
    publish(kafka, MATCHES.name, "cam-x3", [match_result("cam-x3", 3, time.time(), KEPT)])
    seen = wait_for(
        kafka,
        DECISIONS.name,
        events_pb2.Decision.FromString,
        lambda seen: any(d.frame.frame_id == "cam-x3:3" for d in seen),
    )
    camera = [d for d in seen if d.frame.source_id == "cam-x3"]
    assert [d.subject_id for d in camera if d.outcome != events_pb2.OUTCOME_WITHHELD] == [KEPT]
    withheld = [d for d in camera if d.outcome == events_pb2.OUTCOME_WITHHELD]
    assert withheld and all(not (d.subject_id or d.distance or d.track_id or d.alert_id) for d in withheld)
    alerts = wait_for(kafka, ALERTS.name, events_pb2.Alert.FromString, lambda seen: True)
    assert not [a for a in alerts if a.source_id == "cam-x3"]
    listed = review.ListAlerts(review_pb2.ListAlertsRequest(page_size=100), timeout=10).alerts
    assert [a.alert.subject_id for a in listed] == [KEPT]
    assert audit.VerifyChain(audit_pb2.VerifyChainRequest(), timeout=10).intact
