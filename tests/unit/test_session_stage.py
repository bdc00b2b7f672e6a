"""The session desk (the running side of e-channel sessions) over a real SQLite database, review store and audit log.

Kafka is the one thing replaced: the desk's publisher records what it sends (and can refuse, like a broker that is
down). The real decision service process, with the broker, is tested in tests/integration/test_session_decisions.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sightline.common.audit import AuditLog
from sightline.common.stage import InputEvent
from sightline.common.topics import ALERTS, DECISIONS, SESSIONS
from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import Policy
from sightline.decision.review import AlertRecorder, ReviewStore
from sightline.decision.service import decide
from sightline.decision.session_stage import SessionDesk
from sightline.decision.session_store import SessionStore
from sightline.decision.sessions import EChannelPolicy, SessionEngine
from sightline.v1 import events_pb2, session_pb2, types_pb2
from test_sessions import LIVE, result

Kind = session_pb2.SessionEvent


class RecordingPublisher:
    """Stands in for the Kafka producer: keeps what is sent; refuses the topics in ``down``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.down: set[str] = set()

    def send(self, topic: str, key: bytes, value: bytes, wait: bool = True) -> None:
        if topic in self.down:
            raise ConnectionError(f"broker refused {topic}")
        self.sent.append((topic, key, value))

    def session_events(self) -> list[session_pb2.SessionEvent]:
        return [session_pb2.SessionEvent.FromString(v) for t, _, v in self.sent if t == SESSIONS.name]

    def alerts(self) -> list[events_pb2.Alert]:
        return [events_pb2.Alert.FromString(v) for t, _, v in self.sent if t == ALERTS.name]


class Desk:
    """A desk and everything it writes to, on one SQLite file; ``restart`` is a new process on the same database."""

    def __init__(self, url: str, hold_seconds: float = 2.0, hold_max: int = 100) -> None:
        self.url, self.hold_seconds, self.hold_max = url, hold_seconds, hold_max
        self.publisher = RecordingPublisher()
        self._open()

    def _open(self) -> None:
        self.store, self.audit = SessionStore.open(self.url), AuditLog.open(self.url)
        self.reviews = ReviewStore.open(self.url)
        engine = SessionEngine(EChannelPolicy(min_verified_frames=2), "policy-test")
        self.desk = SessionDesk(engine, self.store, AlertRecorder(self.reviews, self.audit), self.audit, self.publisher,
                                self.hold_seconds, self.hold_max)  # fmt: skip

    def restart(self) -> None:
        self.close()
        self._open()
        self.desk.recover()

    def close(self) -> None:
        for store in (self.store, self.audit, self.reviews):
            store.close()

    def session_audit(self) -> list[object]:
        return [r for r in self.audit.records() if r.purpose == "e-channel"]


@pytest.fixture()
def desk(tmp_path: Path) -> Iterator[Desk]:
    made = Desk(f"sqlite:///{tmp_path / 'decision.db'}")
    yield made
    made.close()


def opened(session_id: str = "s1", deadline: float | None = None,
           kind: int = Kind.KIND_OPENED) -> session_pb2.SessionEvent:  # fmt: skip
    event = session_pb2.SessionEvent(kind=kind, session_id=session_id, gate_id="gate-1", claim_subject_id="traveller")
    now = time.time()
    event.opened_at.FromNanoseconds(int(now * 1e9))
    event.deadline.FromNanoseconds(int((deadline or now + 60) * 1e9))
    return event


def echannel(item: events_pb2.MatchResult, session_id: str = "s1") -> events_pb2.MatchResult:
    item.frame.purpose, item.frame.session_id = types_pb2.PURPOSE_ECHANNEL, session_id
    return item


def live_frames(session_id: str = "s1") -> list[events_pb2.MatchResult]:
    return [echannel(result(1), session_id), echannel(result(2, liveness=LIVE), session_id)]


def kinds(events: list[session_pb2.SessionEvent]) -> list[str]:
    return [Kind.Kind.Name(e.kind).removeprefix("KIND_") for e in events]


def test_an_accepted_session_is_announced_once_and_audited_once(desk: Desk) -> None:
    desk.desk.on_event(opened())
    for item in live_frames():
        desk.desk.on_result(item)
    for item in live_frames():  # replayed after a restart that came before the offsets were committed
        desk.desk.on_result(item)
    desk.desk.on_event(opened())  # a replayed OPENED does not reopen it
    events = desk.publisher.session_events()
    assert kinds(events) == ["PROGRESS", "PROGRESS", "DECIDED"]
    decided = events[-1].update
    assert decided.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and decided.frames_seen == 2
    assert list(decided.evidence_frame_ids) == ["gate-1:s:1", "gate-1:s:2"] and decided.reasons
    assert all(key == b"gate-1" for topic, key, _ in desk.publisher.sent if topic == SESSIONS.name)
    (record,) = desk.session_audit()
    assert (record.principal, record.action, record.subject_id, record.result) == ("gate:gate-1", "VERIFY",
                                                                                   "traveller", "ACCEPT")  # fmt: skip
    assert record.details["frames_verified"] == "2" and record.details["liveness"] == "passed"
    assert record.details["policy_version"] == "policy-test" and record.details["session_id"] == "s1"


def test_results_ahead_of_their_session_are_held_then_folded_in(desk: Desk) -> None:
    for item in live_frames():
        desk.desk.on_result(item)
    assert desk.publisher.session_events() == [] and desk.store.get("s1") is None
    desk.desk.on_event(opened())
    assert kinds(desk.publisher.session_events()) == ["PROGRESS", "PROGRESS", "DECIDED"]
    assert desk.publisher.session_events()[-1].update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT


def test_held_results_are_bounded_in_age_and_number(tmp_path: Path) -> None:
    made = Desk(f"sqlite:///{tmp_path / 'decision.db'}", hold_seconds=0.05, hold_max=3)
    try:
        for seq in range(1, 6):  # five early results, three kept: the newest
            made.desk.on_result(echannel(result(seq), "early"))
        made.desk.on_result(echannel(result(1), "late"))
        time.sleep(0.1)
        made.desk.on_result(echannel(result(2), "late"))
        made.desk.tick(time.time())  # expires what was held longer than 0.05 s
        made.desk.on_event(opened("early"))
        made.desk.on_event(opened("late"))
        frames = {e.session_id: e.update.frames_seen for e in made.publisher.session_events()}
        assert frames == {"early": 0, "late": 1}
    finally:
        made.close()


def test_the_timer_refers_a_session_without_frames(desk: Desk) -> None:
    desk.desk.on_event(opened(deadline=time.time() + 0.2))
    desk.desk.start(0.02)
    try:
        deadline = time.monotonic() + 5
        while len(desk.publisher.session_events()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        desk.desk.stop()
    events = desk.publisher.session_events()
    assert kinds(events) == ["PROGRESS", "DECIDED"]
    assert events[-1].update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert events[-1].update.reasons[0].startswith("time-out after 0.2 s: 0 of 2 verified frames")


def test_a_stop_list_hit_raises_one_stored_alert_named_on_the_outcome(desk: Desk) -> None:
    desk.desk.on_event(opened())
    desk.desk.on_result(echannel(result(1, stop_hit=True)))
    desk.desk.on_result(echannel(result(1, stop_hit=True)))
    (alert,) = desk.publisher.alerts()
    decided = desk.publisher.session_events()[-1].update
    assert decided.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and decided.alert_id == alert.alert_id
    assert alert.subject_id == "wanted" and list(alert.watchlists) == ["stop"] and alert.source_id == "gate-1"
    assert desk.reviews.get(alert.alert_id).status == "PENDING_REVIEW"
    assert [r.action for r in desk.audit.records()] == ["ALERT", "VERIFY"]


def test_e_channel_frames_never_alert_through_the_per_frame_path(desk: Desk) -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1))
    recorder = AlertRecorder(desk.reviews, desk.audit)
    desk.desk.on_event(opened())
    outputs = []
    for seq in (1, 2):
        item = echannel(result(seq, stop_hit=True))
        item.frame.claim_subject_id = ""  # even a frame the per-frame engine would search 1:N
        event = InputEvent(key=b"gate-1", value=item.SerializeToString(), topic="m", partition=0, offset=seq)
        outputs += decide(engine, event, recorder, desk.desk)
    assert {o.topic for o in outputs} == {DECISIONS}  # the per-frame decisions, no alert
    assert len(desk.publisher.alerts()) == 1  # the session's own


def test_a_restart_resumes_open_sessions_and_finishes_announcements(desk: Desk) -> None:
    desk.desk.on_event(opened("s1"))
    desk.desk.on_result(echannel(result(1), "s1"))
    desk.desk.on_event(opened("s2"))
    desk.publisher.down = {SESSIONS.name}  # the broker goes away as s2 is cancelled: stored and audited, not published
    desk.desk.on_event(opened("s2", kind=Kind.KIND_CANCELLED))
    desk.publisher.down = set()
    desk.restart()
    desk.desk.tick(time.time())  # the timer's first tick announces what the last run could not
    for item in live_frames("s1"):  # frame 1 again (a replay), then frame 2
        desk.desk.on_result(item)
    decided = {e.session_id: e.update for e in desk.publisher.session_events() if e.kind == Kind.KIND_DECIDED}
    assert decided["s2"].outcome == session_pb2.SESSION_OUTCOME_CANCELLED
    assert decided["s1"].outcome == session_pb2.SESSION_OUTCOME_ACCEPT and decided["s1"].frames_seen == 2
    assert sorted(r.details["session_id"] for r in desk.session_audit()) == ["s1", "s2"]  # each audited once
    assert desk.store.unannounced() == [] and desk.store.load_open() == []


def test_a_replica_taking_over_a_session_reads_what_the_previous_owner_folded_in(desk: Desk) -> None:
    desk.desk.on_event(opened())
    desk.desk.on_result(echannel(result(1)))
    other = Desk(desk.url)  # a second replica starts: it loads the open session as it is now
    try:
        other.desk.recover()
        desk.desk.on_result(echannel(result(2)))  # the first replica still owns the partition and folds frame 2
        other.desk.on_result(echannel(result(3, liveness=LIVE)))  # then a rebalance hands the gate to the second
        (decided,) = [e.update for e in other.publisher.session_events() if e.kind == Kind.KIND_DECIDED]
        assert decided.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and decided.frames_seen == 3
    finally:
        other.close()
