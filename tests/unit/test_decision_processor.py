"""Decision's processor (``Decider``, an ``EventProcessor``) over a real review store and audit log (SQLite): per
match result, its decisions on the decisions topic and its alerts on the alerts topic, keyed by source; the alert it
publishes is the one stored for review; nothing about an erased subject; a result that does not parse fails alone.

The alert store's failures and retries are tests/unit/test_decision_alerts.py; the e-channel path through the
session desk is tests/unit/test_session_stage.py.
"""

from __future__ import annotations

from test_decision_alerts import audit, event_of, reviews  # noqa: F401 - audit, reviews: fixtures, shared
from test_decision_engine import match_result

from sightline.common import codec
from sightline.common.audit import Action, AuditLog
from sightline.common.stage import InputEvent, Output
from sightline.common.topics import ALERTS, DECISIONS, MATCHES
from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import Policy
from sightline.decision.review.recorder import AlertRecorder
from sightline.decision.review.store import ReviewStore
from sightline.decision.service import Decider
from sightline.v1 import events_pb2


def test_each_match_result_gives_its_decisions_and_alerts_and_a_bad_one_fails_alone(
    reviews: ReviewStore,
    audit: AuditLog,
) -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1), alerts=AlertRecorder(reviews, audit))
    reviews.erase_subject("bob")  # after every frame below was seen
    no_face = match_result(3, 100.2, source="cam-c")
    del no_face.faces[:]
    events = [
        event_of(match_result(1, 100.0, source="cam-a"), 1),
        InputEvent(b"cam-x", b"\xff\xfe not a match result", MATCHES.name, 0, 2),
        event_of(match_result(2, 100.1, subject="bob", source="cam-b"), 3),
        event_of(no_face, 4),
        event_of(match_result(4, 100.3, subject="", source="cam-d", claim="bob", verified_distance=0.2), 5),
    ]

    results = Decider(engine, erased=reviews.erased_since).process(events)

    assert len(results) == len(events)
    first = results[0]
    assert not isinstance(first, BaseException), first
    assert [(o.topic, o.key) for o in first] == [(DECISIONS, b"cam-a"), (ALERTS, b"cam-a")]
    decision, alert = events_pb2.Decision.FromString(first[0].value), events_pb2.Alert.FromString(first[1].value)
    assert (decision.outcome, decision.subject_id, decision.alert_id) == (
        events_pb2.OUTCOME_MATCH,
        "alice",
        alert.alert_id,
    )
    assert [stored.alert.alert_id for stored in reviews.list_alerts()] == [alert.alert_id], "stored for review"
    assert len(audit.records(action=Action.ALERT)) == 1
    assert isinstance(results[1], codec.MalformedEvent)
    erased: list[Output] = []
    for result in (results[2], results[4]):
        assert not isinstance(result, BaseException), result
        erased += result
    withheld = [events_pb2.Decision.FromString(o.value) for o in erased]
    assert [o.topic for o in erased] == [DECISIONS, DECISIONS], "no alert about an erased subject (matched or claimed)"
    assert [(d.outcome, d.subject_id, d.frame.claim_subject_id, d.distance) for d in withheld] == [
        (events_pb2.OUTCOME_WITHHELD, "", "", 0.0)
    ] * 2, "each decision withheld: its place in the frame's account, and nothing said of the subject"
    faceless = results[3]
    assert not isinstance(faceless, BaseException), faceless
    assert [(o.topic, o.key) for o in faceless] == [(DECISIONS, b"cam-c")], "a frame without faces: its one record"
    record = events_pb2.Decision.FromString(faceless[0].value)
    assert (record.outcome, record.subject_id, record.frame.frame_id) == (events_pb2.OUTCOME_NO_FACE, "", "cam-c:3")
