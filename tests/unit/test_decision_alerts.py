"""Alerts are stored before the engine's state changes (a failed store is retried, never lost), keep their ids over a
restart (a replay maps to the stored alert, never a second one to review), and nothing is published about a subject
erased since its frame was seen. Over real stores: SQLite files another connection holds the write lock of (what a
second writer, a backup or a long purge does), and PostgreSQL whose connection is killed."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_decision_engine import match_result

from sightline.common.audit import Action, AuditLog
from sightline.common.sqlstore import BackendStore
from sightline.common.stage import InputEvent, Output
from sightline.common.topics import ALERTS, DECISIONS
from sightline.common.transient import is_transient
from sightline.decision import service as decision
from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import Policy
from sightline.decision.review.recorder import AlertRecorder
from sightline.decision.review.store import ReviewStore
from sightline.v1 import events_pb2

POLICY = Policy(min_agreeing_frames=2, alert_cooldown_seconds=60)


def event_of(result: events_pb2.MatchResult, offset: int) -> InputEvent:
    return InputEvent(key=b"cam", value=result.SerializeToString(), topic="m", partition=0, offset=offset)


def alerts_in(outputs: list[Output]) -> list[events_pb2.Alert]:
    return [events_pb2.Alert.FromString(o.value) for o in outputs if o.topic == ALERTS]


def decisions_in(outputs: list[Output]) -> list[events_pb2.Decision]:
    return [events_pb2.Decision.FromString(o.value) for o in outputs if o.topic == DECISIONS]


class Decider:
    """The decision stage's matches path over a review store and audit log: ``restart`` loses the memory only."""

    def __init__(self, reviews: ReviewStore, audit: AuditLog) -> None:
        self.reviews, self.audit = reviews, audit
        self.restart()

    def restart(self) -> None:
        self.engine = DecisionEngine(POLICY, alerts=AlertRecorder(self.reviews, self.audit))

    def __call__(self, result: events_pb2.MatchResult, offset: int = 0) -> list[Output]:
        return decision.Decider(self.engine, erased=self.reviews.erased_since).process_event(event_of(result, offset))


@pytest.fixture()
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}") as log:
        yield log


@pytest.fixture()
def reviews(tmp_path: Path) -> Iterator[ReviewStore]:
    with ReviewStore.open(f"sqlite:///{tmp_path / 'review.db'}") as store:
        yield store


@contextmanager
def write_locked(store: BackendStore, path: Path) -> Iterator[None]:
    """Another connection holds the SQLite file's write lock (BEGIN IMMEDIATE: readers go on, writers wait) until
    the block ends. The store waits 0.1 s for it, not its production 30 s, so the test sees the failure at once."""
    with store._backend._lock:  # type: ignore[attr-defined] - the store's one connection, between transactions
        store._backend._conn.execute("PRAGMA busy_timeout = 100")  # type: ignore[attr-defined]
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_an_alert_the_locked_review_store_cannot_take_is_raised_by_the_retry(tmp_path: Path, audit: AuditLog) -> None:
    with ReviewStore.open(f"sqlite:///{tmp_path / 'review.db'}") as reviews:
        run = Decider(reviews, audit)
        run(match_result(1, 100.0, track="cam/t1"), 1)  # one searched face of the track: pending
        with write_locked(reviews, tmp_path / "review.db"), pytest.raises(sqlite3.OperationalError) as failed:
            run(match_result(2, 100.5, track="cam/t1"), 2)  # the MATCH that raises the alert
        assert "database is locked" in str(failed.value)
        assert is_transient(failed.value)  # so the stage processes the frame again, never dead-letters it
        assert reviews.list_alerts() == [] and audit.records(action=Action.ALERT) == []
        retried = run(match_result(2, 100.5, track="cam/t1"), 2)  # the lock is gone: the same frame again
        (alert,) = alerts_in(retried)
        assert decisions_in(retried)[0].alert_id == alert.alert_id  # not "merged into" an alert that exists nowhere
        assert [a.alert.alert_id for a in reviews.list_alerts()] == [alert.alert_id]
        later = decisions_in(run(match_result(3, 101.0, track="cam/t1"), 3))
        assert "alert already raised for track cam/t1" in later[0].reasons[-1] and later[0].alert_id == ""
        assert len(audit.records(action=Action.ALERT)) == 1


def test_a_failed_store_of_an_untracked_alert_starts_no_cool_down(tmp_path: Path, audit: AuditLog) -> None:
    with ReviewStore.open(f"sqlite:///{tmp_path / 'review.db'}") as reviews:
        run = Decider(reviews, audit)
        run(match_result(1, 100.0), 1)
        with write_locked(reviews, tmp_path / "review.db"), pytest.raises(sqlite3.OperationalError):
            run(match_result(2, 100.5), 2)
        # The next frame, even if the failed one were never retried: an alert, not "merged into" one nowhere.
        (alert,) = alerts_in(run(match_result(3, 101.0), 3))
        assert [a.alert.alert_id for a in reviews.list_alerts()] == [alert.alert_id]


def test_an_alert_stored_while_the_audit_log_was_locked_is_audited_by_the_retry(
    tmp_path: Path, reviews: ReviewStore
) -> None:
    with AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}") as audit:
        run = Decider(reviews, audit)
        run(match_result(1, 100.0, track="cam/t1"), 1)
        with write_locked(audit, tmp_path / "audit.db"), pytest.raises(sqlite3.OperationalError) as failed:
            run(match_result(2, 100.5, track="cam/t1"), 2)  # stored for review, but its ALERT record not written
        assert is_transient(failed.value)
        (stored,) = reviews.list_alerts()
        assert not stored.audited and audit.records(action=Action.ALERT) == []
        (alert,) = alerts_in(run(match_result(2, 100.5, track="cam/t1"), 2))
        assert alert.alert_id == stored.alert.alert_id
        (record,) = audit.records(action=Action.ALERT)
        assert record.details["alert_id"] == alert.alert_id and record.result == "PENDING_REVIEW"
        run(match_result(2, 100.5, track="cam/t1"), 2)  # a further replay writes no second record
        assert len(audit.records(action=Action.ALERT)) == 1 and reviews.get(alert.alert_id).audited


def kill_review_connections(postgres_url: str) -> None:
    """What a database restart or a failover does to the decision service's connection: the server ends it."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as admin:
        ended = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s"
        pids = [pid for (pid,) in admin.execute(ended, ("sightline-decision",)).fetchall()]
        assert pids, "the review store has no connection to end"
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        until = time.monotonic() + 5
        while admin.execute(ended, ("sightline-decision",)).fetchall() and time.monotonic() < until:
            time.sleep(0.02)


@pytest.mark.postgres
def test_an_alert_whose_store_fails_is_raised_when_its_frame_is_retried(
    pg_schema_url: str, postgres_url: str, audit: AuditLog
) -> None:
    import psycopg

    with ReviewStore.open(pg_schema_url) as reviews:
        run = Decider(reviews, audit)
        run(match_result(1, 100.0, track="cam/t1"), 1)  # one searched face: pending
        kill_review_connections(postgres_url)
        with pytest.raises(psycopg.OperationalError):  # transient: the stage processes the frame again
            run(match_result(2, 100.5, track="cam/t1"), 2)
        retried = run(match_result(2, 100.5, track="cam/t1"), 2)  # the store reconnects
        (alert,) = alerts_in(retried)
        assert decisions_in(retried)[0].alert_id == alert.alert_id
        assert reviews.get(alert.alert_id).status == "PENDING_REVIEW"
        later = run(match_result(3, 101.0, track="cam/t1"), 3)
        assert alerts_in(later) == [] and "alert already raised for track cam/t1" in decisions_in(later)[0].reasons[-1]
        assert [a.alert.alert_id for a in reviews.list_alerts()] == [alert.alert_id]
        assert [r.action for r in audit.records(action=Action.ALERT)] == ["ALERT"]


@pytest.mark.postgres
def test_an_untracked_alert_whose_store_fails_starts_no_cool_down(
    pg_schema_url: str, postgres_url: str, audit: AuditLog
) -> None:
    import psycopg

    with ReviewStore.open(pg_schema_url) as reviews:
        run = Decider(reviews, audit)
        run(match_result(1, 100.0), 1)
        kill_review_connections(postgres_url)
        with pytest.raises(psycopg.OperationalError):
            run(match_result(2, 100.5), 2)
        # The next frame (the failed one dead-lettered, or retried later): not "merged into" an alert nowhere.
        (alert,) = alerts_in(run(match_result(3, 101.0), 3))
        assert reviews.get(alert.alert_id).alert.subject_id == "alice"


def test_a_replay_after_a_restart_maps_a_tracks_frames_to_the_stored_alert(
    reviews: ReviewStore, audit: AuditLog
) -> None:
    run = Decider(reviews, audit)
    run(match_result(1, 100.0, track="cam/t1"), 1)
    (alert,) = alerts_in(run(match_result(2, 100.5, track="cam/t1"), 2))
    reviews.review(alert.alert_id, "reviewer-a", "CONFIRM")
    run.restart()  # offsets were committed up to frame 1: frames 2 and 3 come again, the memory is gone
    replayed = run(match_result(2, 100.5, track="cam/t1"), 2) + run(match_result(3, 101.0, track="cam/t1"), 3)
    assert {a.alert_id for a in alerts_in(replayed)} <= {alert.alert_id}
    assert {d.alert_id for d in decisions_in(replayed)} <= {alert.alert_id, ""}
    assert [a.alert.alert_id for a in reviews.list_alerts()] == [alert.alert_id]  # no second alert to review
    assert reviews.get(alert.alert_id).confirmations == 1  # its review goes on
    assert len(audit.records(action=Action.ALERT)) == 1


def test_a_replay_after_a_restart_keeps_an_untracked_faces_cool_down(reviews: ReviewStore, audit: AuditLog) -> None:
    run = Decider(reviews, audit)
    run(match_result(1, 100.0), 1)
    (alert,) = alerts_in(run(match_result(2, 100.5), 2))
    run.restart()
    replayed = run(match_result(2, 100.5), 2) + run(match_result(3, 101.0), 3)
    assert alerts_in(replayed) == []
    assert f"alert merged into {alert.alert_id[:12]}" in decisions_in(replayed)[-1].reasons[-1]
    assert [a.alert.alert_id for a in reviews.list_alerts()] == [alert.alert_id]


def test_nothing_naming_an_erased_subject_is_published_after_the_notice(reviews: ReviewStore, audit: AuditLog) -> None:
    run = Decider(reviews, audit)
    run(match_result(1, time.time() - 5), 1)
    reviews.erase_subject("alice", datetime.now(UTC))  # the notice is applied; frame 2 was in flight
    late = run(match_result(2, time.time() - 4), 2)
    withheld = decisions_in(late)  # each withheld: its place in the frame's account, nothing about the subject
    assert [(d.outcome, d.subject_id, d.alert_id) for d in withheld] == [(events_pb2.OUTCOME_WITHHELD, "", "")]
    assert alerts_in(late) == [] and reviews.list_alerts() == []
    claim = match_result(3, time.time() - 3, subject="", claim="alice", verified_distance=0.3)
    claimed = decisions_in(run(claim, 3))  # a claim of the subject names it too
    assert [(d.outcome, d.frame.claim_subject_id) for d in claimed] == [(events_pb2.OUTCOME_WITHHELD, "")]
    others = run(match_result(4, time.time() - 3, subject="bob"), 4)
    assert [d.subject_id for d in decisions_in(others)] == ["bob"]  # other subjects are decided as ever
