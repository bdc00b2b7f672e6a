"""E-channel session decisions against a real decision service process and broker.

The tests play capture (OPENED, CLOSED events on the sessions topic) and matching (each frame's MatchResult, with its
1:1 verification, stop-list candidates, quality and detection's liveness verdict, on the matches topic), and read what
the decision service publishes on the sessions and alerts topics and writes in its audit log.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sightline.common.audit import AuditLog, AuditRecord
from sightline.common.bus import make_producer, read_topics
from sightline.common.config import KafkaSettings
from sightline.common.topics import ALERTS, MATCHES, SESSIONS
from sightline.tooling.localstack import LocalStack
from sightline.v1 import events_pb2, session_pb2, types_pb2

Kind = session_pb2.SessionEvent
NOT_YET = types_pb2.LivenessResult(assessed=False, frames=1, reasons=["need 10 frames, have 1"])
# Assessed on the session's first ten good frames, sequences 1 to 10, as detection would.
LIVE = types_pb2.LivenessResult(assessed=True, passed=True, score=0.8, frames=10, first_sequence=1, last_sequence=10)
POLICY = """\
version: "gates-test"
echannel:
  min_verified_frames: 3
  max_mismatch_frames: 2
  budget_seconds: 30
  close_grace_seconds: 0.5
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    run_dir = tmp_path_factory.mktemp("sessions")
    policy = run_dir / "policy.yaml"
    policy.write_text(POLICY)
    # The audit chain in the decision database, whichever of the two settings this build reads it from.
    database = f"sqlite:///{run_dir / 'decision.db'}"
    env = {"SIGHTLINE_DECISION_DATABASE_URL": database, "SIGHTLINE_AUDIT_DATABASE_URL": database}
    with LocalStack(run_dir, ports="auto", services=("decision",), policy_file=policy, env=env) as running:
        running.start(timeout=120)
        yield running


@pytest.fixture(scope="module")
def kafka(stack: LocalStack) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=stack.bootstrap_servers, session_timeout_ms=2000, heartbeat_interval_ms=500)


class Gate:
    """One kiosk's session as capture and matching would put it on the topics."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.gate_id = f"gate-{uuid.uuid4().hex[:6]}"
        self.session_id = uuid.uuid4().hex
        self.started_ms = int(time.time() * 1000) - 1000

    def send(self, topic: str, message: object) -> None:
        producer = make_producer(self.kafka)
        producer.send(topic, key=self.gate_id.encode(), value=message.SerializeToString())  # type: ignore[attr-defined]
        producer.flush(10)
        producer.close()

    def control(self, kind: int, budget_s: float = 60.0, frames_sent: int = 0, reason: str = "") -> None:
        event = session_pb2.SessionEvent(
            kind=kind, session_id=self.session_id, gate_id=self.gate_id, claim_subject_id="traveller"
        )
        now = time.time()
        event.opened_at.FromNanoseconds(int(now * 1e9))
        event.deadline.FromNanoseconds(int((now + budget_s) * 1e9))
        event.at.FromNanoseconds(int(now * 1e9))
        event.update.frames_seen = frames_sent
        event.update.reasons.extend([reason] if reason else [])
        self.send(SESSIONS.name, event)

    def frame(
        self, seq: int, *, liveness: types_pb2.LivenessResult = NOT_YET, verified: bool = True, stop_hit: bool = False
    ) -> None:
        """One frame's match result: the traveller's face verified (or not) against the claim."""
        frame = types_pb2.FrameRef(
            frame_id=f"{self.gate_id}:{self.session_id}:{seq}",
            source_id=self.gate_id,
            sequence=seq,
            purpose=types_pb2.PURPOSE_ECHANNEL,
            session_id=self.session_id,
            claim_subject_id="traveller",
            watchlists=["stop"],
        )
        frame.captured_at.GetCurrentTime()
        result = events_pb2.MatchResult(frame=frame, model_name="dlib_resnet_v1", model_version="1")
        face = result.faces.add(face_index=0, box=types_pb2.Box(x1=200, y1=100, x2=400, y2=300), liveness=liveness)
        face.quality.score = 80.0
        distance = 0.35 if verified else 0.8
        face.verification.CopyFrom(
            types_pb2.Verification(
                subject_id="traveller",
                subject_found=True,
                verified=verified,
                distance=distance,
                similarity=1 - distance / 1.2,
            )
        )
        if stop_hit:
            face.candidates.add(subject_id="wanted", distance=0.3, similarity=0.75, watchlists=["stop"])
        self.send(MATCHES.name, result)

    def events(
        self, until: int = Kind.KIND_DECIDED, timeout: float = 30.0, frames_seen: int | None = None
    ) -> list[session_pb2.SessionEvent]:
        """This session's events from decision, once one of kind ``until`` (with ``frames_seen``, if given) is in."""
        seen: list[session_pb2.SessionEvent] = []

        def reached() -> bool:
            return any(e.kind == until and (frames_seen is None or e.update.frames_seen == frames_seen) for e in seen)

        deadline = time.monotonic() + timeout
        for record in read_topics(
            self.kafka, [SESSIONS.name], since_ms=self.started_ms, stop=lambda: reached() or time.monotonic() > deadline
        ):
            event = session_pb2.SessionEvent.FromString(record.value)
            if event.session_id == self.session_id and event.kind in (Kind.KIND_PROGRESS, Kind.KIND_DECIDED):
                assert record.key == self.gate_id.encode()
                seen.append(event)
        assert reached(), f"no {Kind.Kind.Name(until)} for the session within {timeout} s: {seen}"
        return seen

    def outcome(self) -> session_pb2.SessionUpdate:
        events = self.events()
        (decided,) = [e for e in events if e.kind == Kind.KIND_DECIDED]
        return decided.update


def audit_records(stack: LocalStack, gate: Gate) -> list[AuditRecord]:
    """The audit records of the gate's session, read from the decision service's own database."""
    with AuditLog.open(f"sqlite:///{Path(stack.run_dir) / 'decision.db'}", create=False) as audit:
        records = audit.records(action="VERIFY", principal=f"gate:{gate.gate_id}", limit=1000)
    return [r for r in records if r.details.get("session_id") == gate.session_id]


def test_a_live_traveller_matching_the_claim_is_accepted(stack: LocalStack, kafka: KafkaSettings) -> None:
    gate = Gate(kafka)
    gate.control(Kind.KIND_OPENED)
    for seq in (1, 2, 3):
        gate.frame(seq, liveness=LIVE if seq == 3 else NOT_YET)
    outcome = gate.outcome()
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_ACCEPT, list(outcome.reasons)
    assert outcome.frames_seen == outcome.frames_verified == 3
    assert list(outcome.evidence_frame_ids) == [f"{gate.gate_id}:{gate.session_id}:{seq}" for seq in (1, 2, 3)]
    assert outcome.reasons[0] == "3 good frames verified against the claim (3 needed)"
    assert outcome.reasons[1] == "liveness passed (score 0.80)"
    assert outcome.policy_version == "gates-test" and outcome.model_version == "dlib_resnet_v1:1"
    (record,) = audit_records(stack, gate)
    assert (record.principal, record.subject_id, record.purpose, record.result) == (
        f"gate:{gate.gate_id}",
        "traveller",
        "e-channel",
        "ACCEPT",
    )
    assert record.details["frames_verified"] == "3" and record.details["liveness"] == "passed"
    assert record.details["best_similarity"] == f"{1 - 0.35 / 1.2:.3f}"


def test_a_face_that_does_not_match_the_claim_is_referred(stack: LocalStack, kafka: KafkaSettings) -> None:
    gate = Gate(kafka)
    gate.control(Kind.KIND_OPENED)
    gate.frame(1, verified=False)
    gate.frame(2, verified=False)
    outcome = gate.outcome()
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert "does not match the claim on 2 good frames" in outcome.reasons[0] and outcome.frames_verified == 0
    assert [r.result for r in audit_records(stack, gate)] == ["REFER_TO_OFFICER"]


def test_a_session_without_frames_times_out(stack: LocalStack, kafka: KafkaSettings) -> None:
    gate = Gate(kafka)
    gate.control(Kind.KIND_OPENED, budget_s=1.0)
    outcome = gate.outcome()  # no frame, no close: only decision's timer can end it
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert outcome.reasons[0] == "time-out after 1 s: 0 of 3 verified frames, liveness not yet assessed"
    assert [r.result for r in audit_records(stack, gate)] == ["REFER_TO_OFFICER"]


def test_a_stop_list_hit_refers_and_raises_an_alert(stack: LocalStack, kafka: KafkaSettings) -> None:
    gate = Gate(kafka)
    gate.control(Kind.KIND_OPENED)
    gate.frame(1, stop_hit=True)
    outcome = gate.outcome()
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and outcome.alert_id
    assert outcome.reasons[0].startswith("stop-list hit: wanted on stop")
    alerts = [
        events_pb2.Alert.FromString(r.value)
        for r in read_topics(kafka, [ALERTS.name], since_ms=gate.started_ms, idle_timeout_s=1.0)
    ]
    (alert,) = [a for a in alerts if a.source_id == gate.gate_id]
    assert alert.alert_id == outcome.alert_id and alert.subject_id == "wanted"
    assert alert.status == events_pb2.ALERT_STATUS_PENDING_REVIEW and list(alert.watchlists) == ["stop"]
    (record,) = audit_records(stack, gate)
    assert record.details["alert_id"] == alert.alert_id


def test_a_closed_session_waits_for_its_last_frames(stack: LocalStack, kafka: KafkaSettings) -> None:
    gate = Gate(kafka)
    gate.control(Kind.KIND_OPENED)
    gate.frame(1)
    gate.control(Kind.KIND_CLOSED, frames_sent=3)  # two frames still in the pipeline when the kiosk closes
    gate.frame(2)
    gate.frame(3, liveness=LIVE)
    outcome = gate.outcome()
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and outcome.frames_seen == 3


def test_frames_outside_the_liveness_window_are_not_accepted(stack: LocalStack, kafka: KafkaSettings) -> None:
    gate = Gate(kafka)
    gate.control(Kind.KIND_OPENED)
    earlier = types_pb2.LivenessResult()
    earlier.CopyFrom(LIVE)
    earlier.first_sequence, earlier.last_sequence = 20, 29  # a verdict on other frames than these
    for seq in (1, 2, 3):
        gate.frame(seq, liveness=earlier)
    gate.control(Kind.KIND_CLOSED, frames_sent=3)
    outcome = gate.outcome()
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and outcome.frames_verified == 3
    assert outcome.reasons[0] == (
        "session closed: 0 of 3 verified frames, liveness passed (3 more verified outside "
        "frames 20-29, which liveness assessed)"
    )


def test_a_cancelled_session_ends_with_the_kiosks_reason(stack: LocalStack, kafka: KafkaSettings) -> None:
    gate = Gate(kafka)
    gate.control(Kind.KIND_OPENED)
    gate.frame(1)
    gate.events(until=Kind.KIND_PROGRESS, frames_seen=1)
    gate.control(Kind.KIND_CANCELLED, reason="traveller left the gate")
    outcome = gate.outcome()
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_CANCELLED
    assert list(outcome.reasons) == ["traveller left the gate"]
    assert [r.result for r in audit_records(stack, gate)] == ["CANCELLED"]


@pytest.mark.parametrize("stop", ["restart", "crash"])
def test_a_session_survives_a_restart_of_the_decision_service(
    stack: LocalStack, kafka: KafkaSettings, stop: str
) -> None:
    gate = Gate(kafka)
    gate.control(Kind.KIND_OPENED)
    gate.frame(1)
    gate.frame(2)
    gate.events(until=Kind.KIND_PROGRESS, frames_seen=2)  # both folded in (and saved) before the restart
    if stop == "crash":  # no time to commit offsets: frames 1 and 2 come again after the restart
        os.kill(stack.pids["decision"], signal.SIGKILL)
    stack.restart("decision")
    gate.frame(3, liveness=LIVE)
    outcome = gate.outcome()
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_ACCEPT, list(outcome.reasons)
    assert outcome.frames_seen == outcome.frames_verified == 3  # the frames before the restart count, once
    assert len(audit_records(stack, gate)) == 1
