"""The session desk (the running side of e-channel sessions) over a real SQLite database, review store and audit log.

Kafka is the one thing replaced: the desk's publisher records what it sends (and can refuse, or hang, like a broker
that is down). The desk's announcements go out on its announcer thread; tests that do not start it call
``announce_pending`` themselves (``Desk.flush``). The real decision service process, with the broker, is tested in
tests/integration/test_session_decisions.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_sessions import LIVE, Clock, result

from sightline.common import codec, limits
from sightline.common.audit import AuditLog
from sightline.common.stage import InputEvent, Output
from sightline.common.topics import ALERTS, DECISIONS, SESSIONS
from sightline.decision.echannel.desk import SessionDesk
from sightline.decision.echannel.engine import SessionEngine
from sightline.decision.echannel.store import SessionStore
from sightline.decision.engine import DecisionEngine
from sightline.decision.erasure import Eraser
from sightline.decision.policy import EChannelPolicy, Policy
from sightline.decision.review.recorder import AlertRecorder
from sightline.decision.review.store import ReviewStore
from sightline.decision.service import Decider
from sightline.v1 import events_pb2, session_pb2, types_pb2

Kind = session_pb2.SessionEvent


class RecordingPublisher:
    """Stands in for the Kafka producer: keeps what is sent; refuses the topics in ``down``; while ``flowing`` is
    clear, every send hangs (as on a broker that accepts connections and never answers) and ``hung`` is set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.down: set[str] = set()
        self.flowing, self.hung = threading.Event(), threading.Event()
        self.flowing.set()

    def send(self, topic: str, key: bytes, value: bytes, wait: bool = True) -> None:
        if not self.flowing.is_set():
            self.hung.set()
            self.flowing.wait(timeout=60)
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
        self.monotonic = Clock(0.0)  # how long results are held, when announcements are retried
        self._open()

    def _open(self) -> None:
        self.store, self.audit = SessionStore.open(self.url), AuditLog.open(self.url)
        self.reviews = ReviewStore.open(self.url)
        engine = SessionEngine(Policy(version="policy-test", echannel=EChannelPolicy(min_verified_frames=2)))
        self.desk = SessionDesk(
            engine,
            self.store,
            AlertRecorder(self.reviews, self.audit),
            self.audit,
            self.publisher,
            self.hold_seconds,
            self.hold_max,
            monotonic=self.monotonic,
        )

    def flush(self) -> None:
        """What the announcer thread would do next: publish what the desk queued."""
        self.desk.announce_pending()

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


def opened(
    session_id: str = "s1", deadline: float | None = None, kind: int = Kind.KIND_OPENED
) -> session_pb2.SessionEvent:
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
    desk.flush()
    events = desk.publisher.session_events()
    assert kinds(events) == ["PROGRESS", "PROGRESS", "DECIDED"]
    decided = events[-1].update
    assert decided.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and decided.frames_seen == 2
    assert list(decided.evidence_frame_ids) == ["gate-1:s:1", "gate-1:s:2"] and decided.reasons
    assert all(key == b"gate-1" for topic, key, _ in desk.publisher.sent if topic == SESSIONS.name)
    (record,) = desk.session_audit()
    assert (record.principal, record.action, record.subject_id, record.result) == (
        "gate:gate-1",
        "VERIFY",
        "traveller",
        "ACCEPT",
    )
    assert record.details["frames_verified"] == "2" and record.details["liveness"] == "passed"
    assert record.details["policy_version"] == "policy-test" and record.details["session_id"] == "s1"


def test_results_ahead_of_their_session_are_held_then_folded_in(desk: Desk) -> None:
    for item in live_frames():
        desk.desk.on_result(item)
    desk.flush()
    assert desk.publisher.session_events() == [] and desk.store.get("s1") is None
    desk.desk.on_event(opened())
    desk.flush()
    assert kinds(desk.publisher.session_events()) == ["PROGRESS", "PROGRESS", "DECIDED"]
    assert desk.publisher.session_events()[-1].update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT


def test_held_results_are_bounded_in_age_and_number(tmp_path: Path) -> None:
    made = Desk(f"sqlite:///{tmp_path / 'decision.db'}", hold_seconds=0.05, hold_max=3)
    try:
        for seq in range(1, 6):  # five early results, three kept: the newest
            made.desk.on_result(echannel(result(seq), "early"))
        made.desk.on_result(echannel(result(1), "late"))
        made.monotonic.now += 0.1
        made.desk.on_result(echannel(result(2), "late"))
        made.desk.tick(time.time())  # expires what was held longer than 0.05 s
        made.desk.on_event(opened("early"))
        made.desk.on_event(opened("late"))
        made.flush()
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
    desk.flush()
    (alert,) = desk.publisher.alerts()
    decided = desk.publisher.session_events()[-1].update
    assert decided.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and decided.alert_id == alert.alert_id
    assert alert.subject_id == "wanted" and list(alert.watchlists) == ["stop"] and alert.source_id == "gate-1"
    assert desk.reviews.get(alert.alert_id).status == "PENDING_REVIEW"
    assert [r.action for r in desk.audit.records()] == ["ALERT", "VERIFY"]


def matches_input(item: events_pb2.MatchResult, offset: int) -> InputEvent:
    return InputEvent(key=b"gate-1", value=item.SerializeToString(), topic="m", partition=0, offset=offset)


def decisions_in(outputs: list[Output]) -> list[events_pb2.Decision]:
    return [events_pb2.Decision.FromString(o.value) for o in outputs if o.topic == DECISIONS]


def test_e_channel_frames_never_alert_through_the_per_frame_path(desk: Desk) -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1), alerts=AlertRecorder(desk.reviews, desk.audit))
    desk.desk.on_event(opened())
    outputs = []
    for seq in (1, 2):
        item = echannel(result(seq, stop_hit=True))
        item.frame.claim_subject_id = ""  # even a frame the per-frame engine would search 1:N
        outputs += Decider(engine, desk.desk).process_event(matches_input(item, seq))
    desk.flush()
    assert {o.topic for o in outputs} == {DECISIONS}  # the per-frame decisions, no alert
    decisions = decisions_in(outputs)
    assert [d.outcome for d in decisions] == [events_pb2.OUTCOME_MATCH] * 2  # each names the hit...
    assert all(not d.alert_id and not any("alert" in r for r in d.reasons) for d in decisions)  # ...and no alert
    assert len(desk.publisher.alerts()) == 1  # the session's own


def test_a_hung_broker_holds_up_announcements_not_the_matches_path(desk: Desk) -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1))
    cctv = result(9)
    cctv.frame.purpose, cctv.frame.session_id, cctv.frame.claim_subject_id = types_pb2.PURPOSE_CCTV, "", ""
    inputs = [matches_input(item, offset) for offset, item in enumerate([*live_frames(), cctv])]
    outputs: list[Output] = []

    def matches_path() -> None:
        decider = Decider(engine, desk.desk)
        for event in inputs:
            outputs.extend(decider.process_event(event))

    desk.publisher.flowing.clear()  # the broker hangs: every send blocks
    desk.desk.start(0.02)
    try:
        desk.desk.on_event(opened())
        assert desk.publisher.hung.wait(10)  # the announcer is stuck sending the session's first progress
        worker = threading.Thread(target=matches_path)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive() and desk.publisher.sent == []  # done while the broker still hangs
        assert len(decisions_in(outputs)) == 3  # each frame's decision, the CCTV frame's too
        stored = desk.store.get("s1")  # the outcome is decided and saved, waiting to be announced
        assert stored is not None and stored.state.outcome == session_pb2.SESSION_OUTCOME_ACCEPT
    finally:
        desk.publisher.flowing.set()
        until = time.monotonic() + 10
        while Kind.KIND_DECIDED not in [e.kind for e in desk.publisher.session_events()] and time.monotonic() < until:
            time.sleep(0.02)
        desk.desk.stop()
    assert kinds(desk.publisher.session_events()) == ["PROGRESS", "PROGRESS", "DECIDED"]
    assert len(desk.session_audit()) == 1


def test_a_session_store_failure_does_not_cost_the_frames_own_decision(desk: Desk) -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1))
    desk.desk.on_event(opened())
    decider = Decider(engine, desk.desk)
    decider.process_event(matches_input(echannel(result(1)), 1))
    desk.store.close()  # the database goes away just as the deciding frame comes
    outputs = decider.process_event(matches_input(echannel(result(2, liveness=LIVE)), 2))
    assert [d.frame.frame_id for d in decisions_in(outputs)] == ["gate-1:s:2"]  # not dead-lettered
    desk.desk.store = desk.store = SessionStore.open(desk.url)  # it comes back
    desk.desk.tick(time.time())  # the outcome reached in memory is saved, then announced
    desk.flush()
    decided = desk.publisher.session_events()[-1]
    assert decided.kind == Kind.KIND_DECIDED and decided.update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT
    assert len(desk.session_audit()) == 1 and desk.store.unannounced() == []


def test_a_restart_resumes_open_sessions_and_finishes_announcements(desk: Desk) -> None:
    desk.desk.on_event(opened("s1"))
    desk.desk.on_result(echannel(result(1), "s1"))
    desk.desk.on_event(opened("s2"))
    desk.publisher.down = {SESSIONS.name}  # the broker goes away as s2 is cancelled: stored and audited, not published
    desk.desk.on_event(opened("s2", kind=Kind.KIND_CANCELLED))
    desk.flush()
    desk.publisher.down = set()
    desk.restart()
    desk.desk.tick(time.time())  # the timer's first tick queues what the last run could not announce
    for item in live_frames("s1"):  # frame 1 again (a replay), then frame 2
        desk.desk.on_result(item)
    desk.flush()
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
        other.flush()
        (decided,) = [e.update for e in other.publisher.session_events() if e.kind == Kind.KIND_DECIDED]
        assert decided.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and decided.frames_seen == 3
    finally:
        other.close()


# -- malformed session events, right to erasure of a stop-list subject -------------------------------------------


def test_a_malformed_opened_event_is_refused_and_cannot_wedge_the_timer(desk: Desk) -> None:
    bad = opened("bad")
    bad.deadline.seconds = -(10**11)  # no calendar holds it: every save of such a session would fail
    with pytest.raises(codec.MalformedEvent, match="out of range"):
        desk.desk.on_event(bad)
    endless = opened("endless", deadline=time.time() + 10**7)
    with pytest.raises(codec.MalformedEvent, match="deadline"):
        desk.desk.on_event(endless)
    desk.desk.on_event(opened("s1", deadline=time.time() + 0.2))
    desk.desk.tick(time.time() + 1)  # the good session times out: nothing of the bad ones sits on the timer
    desk.flush()
    decided = [e for e in desk.publisher.session_events() if e.kind == Kind.KIND_DECIDED]
    assert [e.session_id for e in decided] == ["s1"]
    assert desk.store.get("bad") is None and desk.store.get("endless") is None


def test_the_longest_deadline_accepted_is_the_policys(tmp_path: Path) -> None:
    """A gate budget of 15 minutes is an operator's choice (capture's SIGHTLINE_CAPTURE_SESSION_BUDGET_S), not a
    malformed event, once the policy's ``echannel.max_deadline_seconds`` allows it."""
    with pytest.raises(ValueError, match="max_deadline_seconds"):
        EChannelPolicy(budget_seconds=900)  # the default bound (600 s) is below such a budget: said at start-up
    url = f"sqlite:///{tmp_path / 'long.db'}"
    with SessionStore.open(url) as store, ReviewStore.open(url) as reviews, AuditLog.open(url) as audit:
        long_gates = Policy(echannel=EChannelPolicy(budget_seconds=900, max_deadline_seconds=1200))
        desk = SessionDesk(SessionEngine(long_gates), store, AlertRecorder(reviews, audit), audit, RecordingPublisher())
        desk.on_event(opened("slow-gate", deadline=time.time() + 900))
        assert store.get("slow-gate") is not None
        with pytest.raises(codec.MalformedEvent, match="at most 1200 s"):
            desk.on_event(opened("endless", deadline=time.time() + 1300))


@pytest.mark.parametrize("field", ["session_id", "gate_id", "claim_subject_id"])
def test_a_session_event_with_an_over_long_id_is_refused(desk: Desk, field: str) -> None:
    for kind in (Kind.KIND_OPENED, Kind.KIND_CANCELLED):
        event = opened(kind=kind)
        setattr(event, field, "x" * (limits.ID_CHARS + 1))
        with pytest.raises(codec.MalformedEvent, match=f"{field} longer than {limits.ID_CHARS}"):
            desk.desk.on_event(event)
    assert desk.store.load_open() == [] and desk.session_audit() == []


def test_one_session_that_cannot_be_saved_does_not_hold_up_the_others_time_outs(desk: Desk) -> None:
    desk.desk.on_event(opened("s1", deadline=time.time() + 0.2))
    desk.desk.on_event(opened("s2", deadline=time.time() + 0.2))
    desk.desk._open["s1"].opened_at = 10.0**12  # as a state recovered from an older version might be: unsavable
    desk.desk.tick(time.time() + 1)
    desk.flush()
    decided = [e.session_id for e in desk.publisher.session_events() if e.kind == Kind.KIND_DECIDED]
    assert decided == ["s2"]


def test_a_stop_list_hit_on_an_erased_subject_is_neither_kept_nor_announced(desk: Desk) -> None:
    desk.desk.on_event(opened())
    desk.desk.on_result(echannel(result(1, stop_hit=True)))  # referred at once; the announcement is queued
    notice = events_pb2.SubjectErased(subject_id="wanted", reference="ticket-1")
    notice.erased_at.GetCurrentTime()
    Eraser(desk.reviews, desk.desk, desk.audit).process_event(InputEvent(None, notice.SerializeToString(), "e", 0, 0))
    desk.flush()
    assert desk.publisher.alerts() == [] and desk.reviews.list_alerts() == []
    decided = desk.publisher.session_events()[-1]
    assert decided.kind == Kind.KIND_DECIDED and decided.update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert not any("wanted" in r for r in decided.update.reasons), list(decided.update.reasons)
    stored = desk.store.get("s1")
    assert stored is not None and stored.state.stop_list_hit is None and "wanted" not in str(stored.state.to_dict())
    session_record = desk.session_audit()[-1]
    assert "wanted" not in str(session_record.details)


def test_stored_stop_list_hits_on_an_erased_subject_are_deleted(desk: Desk) -> None:
    desk.desk.on_event(opened())
    desk.desk.on_result(echannel(result(1, stop_hit=True)))
    desk.flush()  # announced before the erasure: the alert went out then
    assert len(desk.publisher.alerts()) == 1
    desk.desk.erase_subject("wanted", datetime.now(UTC))
    stored = desk.store.get("s1")
    assert stored is not None and stored.state.stop_list_hit is None and stored.state.stop_lists == []
    assert "wanted" not in str(stored.state.to_dict())
    assert stored.state.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER  # the traveller stays referred
