"""The e-channel session store on real databases: round trips, decided sessions never overwritten, restart recovery,
the announcement outbox, retention.

Each test runs on a SQLite file and, marked ``postgres``, on PostgreSQL (a schema of its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from sightline.common.audit import AuditLog
from sightline.decision.review import ReviewStore
from sightline.decision.session_store import SessionStore, SessionStoreError
from sightline.decision.sessions import SessionEngine, SessionState
from sightline.v1 import session_pb2
from test_sessions import LIVE, make_engine, opened, result


@pytest.fixture()
def store(store_url: str) -> Iterator[SessionStore]:
    with SessionStore.open(store_url) as opened:
        yield opened


@pytest.fixture()
def engine() -> SessionEngine:
    return make_engine()


def test_a_session_round_trips_mid_way_and_resumes(store: SessionStore, engine: SessionEngine) -> None:
    state = opened(engine)
    for seq in (1, 2):
        engine.on_result(state, result(seq))
    assert store.save(state)
    (resumed,) = store.load_open()
    assert resumed == state and resumed.verified == state.verified and resumed is not state
    update = engine.on_result(resumed, result(3, liveness=LIVE))
    assert update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and update.frames_seen == 3


def test_a_decided_session_is_never_overwritten(store: SessionStore, engine: SessionEngine) -> None:
    state = opened(engine)
    store.save(state)
    stale = SessionState.from_dict(state.to_dict())  # what a second replica (or an earlier run) still holds
    engine.on_result(state, result(1, stop_hit=True))
    assert state.decided and store.save(state)
    assert not store.save(stale) and not store.save(state)  # neither the undecided copy nor a second decision
    stored = store.get("s1")
    assert stored is not None and stored.state.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert store.load_open() == [] and store.get("unknown") is None


def test_unannounced_outcomes_are_found_until_audited_and_published(store: SessionStore, engine: SessionEngine) -> None:
    state = opened(engine)
    engine.cancel(state)
    store.save(state)
    (pending,) = store.unannounced()
    assert pending.state.session_id == "s1" and not pending.audited and not pending.published
    store.mark_audited("s1")
    (half,) = store.unannounced()
    assert half.audited and not half.published
    store.mark_published("s1")
    assert store.unannounced() == []


def test_purge_removes_only_announced_decided_sessions_past_retention(store: SessionStore,
                                                                      engine: SessionEngine) -> None:  # fmt: skip
    announced, unannounced, still_open = opened(engine, "a"), opened(engine, "b"), opened(engine, "c")
    for state in (announced, unannounced):
        engine.cancel(state)
    for state in (announced, unannounced, still_open):
        store.save(state)
    store.mark_audited("a")
    store.mark_published("a")
    assert store.purge_decided(datetime.now(UTC) - timedelta(hours=1)) == 0  # all younger than an hour
    assert store.purge_decided(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert store.get("a") is None and store.get("b") is not None and [s.session_id for s in store.load_open()] == ["c"]


def test_sessions_share_the_decision_database_with_reviews_and_audit(store_url: str, engine: SessionEngine) -> None:
    with ReviewStore.open(store_url), AuditLog.open(store_url), SessionStore.open(store_url) as sessions:
        sessions.save(opened(engine))
    with SessionStore.open(store_url) as reopened:  # migrations already applied: a no-op
        assert [s.session_id for s in reopened.load_open()] == ["s1"]


def test_a_closed_store_and_a_bad_url_fail_clearly() -> None:
    with pytest.raises(SessionStoreError, match="unsupported session URL scheme 'mysql'"):
        SessionStore.open("mysql://db/x")
    store = SessionStore.open("sqlite:///:memory:")
    store.close()
    with pytest.raises(SessionStoreError, match="session store is closed"):
        store.load_open()
