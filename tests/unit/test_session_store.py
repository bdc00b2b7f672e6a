"""The e-channel session store on real databases: round trips, decided sessions never overwritten, restart recovery,
the announcement outbox, retention, the right to erasure (in the store and in the session desk's memory).

Each test runs on a SQLite file and, marked ``postgres``, on PostgreSQL (a schema of its own).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_session_stage import Desk, echannel
from test_session_stage import opened as opened_event
from test_sessions import LIVE, make_engine, opened, result

from sightline.common.audit import AuditLog
from sightline.common.sqlstore import open_backend
from sightline.decision.echannel.engine import SessionEngine, SessionState
from sightline.decision.echannel.store import _PG_MIGRATION_LOCK, MIGRATIONS, SessionStore, SessionStoreError
from sightline.decision.review.store import ERASURE_GRACE, ReviewStore
from sightline.v1 import session_pb2


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


def test_purge_removes_only_announced_decided_sessions_past_retention(
    store: SessionStore, engine: SessionEngine
) -> None:
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


def test_sessions_share_the_decision_database_with_reviews_and_audit(
    store_url: str, engine: SessionEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shared (PostgreSQL) audit log opens only with a configured keyring, as in production.
    monkeypatch.setenv("SIGHTLINE_AUDIT_KEYS", f"session-test:{base64.b64encode(secrets.token_bytes(32)).decode()}")
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


def claiming(engine: SessionEngine, session_id: str, subject: str, at: float = 100.0) -> SessionState:
    state = opened(engine, session_id, at)
    state.claim_subject_id = subject
    return state


def test_erasing_a_subject_deletes_its_sessions_decided_or_not(store: SessionStore, engine: SessionEngine) -> None:
    undecided, decided, other = claiming(engine, "a", "obama"), claiming(engine, "b", "obama"), opened(engine, "c")
    engine.cancel(decided)
    for state in (undecided, decided, other):
        store.save(state)
    store.mark_audited("b")
    assert store.erase_subject("obama") == 2
    assert store.get("a") is None and store.get("b") is None and store.get("c") is not None
    assert [s.session_id for s in store.load_open()] == ["c"] and store.unannounced() == []
    assert store.erase_subject("nobody") == 0


def test_an_erased_subjects_session_is_never_saved_again(store: SessionStore, engine: SessionEngine) -> None:
    erased_at = datetime.now(UTC)
    before = claiming(engine, "a", "obama", at=erased_at.timestamp() - 30)
    store.save(before)
    assert store.erase_subject("obama", erased_at) == 1
    # What another replica still holds in memory, or a replayed OPENED, cannot bring it back.
    engine.on_result(before, result(1))
    assert not store.save(before) and store.get("a") is None
    # The subject enrolled again: a session opened after the erasure (and its grace) is kept, and the same notice
    # replayed does not erase it.
    after = claiming(engine, "b", "obama", at=(erased_at + ERASURE_GRACE).timestamp() + 1)
    assert store.save(after) and store.erase_subject("obama", erased_at) == 0 and store.get("b") is not None
    assert store.purge_decided(erased_at + timedelta(seconds=1)) == 0  # the erasure is forgotten past retention
    assert store.save(claiming(engine, "c", "obama", at=erased_at.timestamp() - 30))


def test_sessions_stored_before_the_erasure_migration_are_found_by_their_claim(
    store_url: str, engine: SessionEngine
) -> None:
    old = SessionStore(open_backend(store_url))._migrated(
        MIGRATIONS[:1], "echannel_session_schema_version", _PG_MIGRATION_LOCK, "session"
    )
    state = claiming(engine, "a", "obama")
    with old, old._tx(write=True) as cur:  # a row as version 1 wrote it
        at = old._backend.dialect.to_db_time(datetime.now(UTC))
        cur.execute(
            "INSERT INTO echannel_sessions (session_id, gate_id, state, opened_at, deadline, updated_at,"
            " decided, audited, published) VALUES (?, ?, ?, ?, ?, ?, 0, 0, 0)",
            ("a", "gate-1", json.dumps(state.to_dict()), at, at, at),
        )
    with SessionStore.open(store_url) as upgraded:
        assert upgraded.erase_subject("obama") == 1 and upgraded.get("a") is None


def test_the_desk_forgets_an_erased_subjects_open_session(tmp_path: Path) -> None:
    desk = Desk(f"sqlite:///{tmp_path / 'decision.db'}")
    try:
        desk.desk.on_event(opened_event("s1"))  # claims "traveller"
        desk.desk.on_result(echannel(result(1), "s1"))
        other = opened_event("s2")
        other.claim_subject_id = "someone-else"
        desk.desk.on_event(other)
        desk.desk.on_result(echannel(result(9), "s3"))  # held: its session is not open yet
        late_opened = opened_event("s3")  # opened before the erasure, its event delayed on the sessions topic
        assert desk.desk.erase_subject("traveller") == 1 and desk.store.get("s1") is None

        desk.desk.on_result(echannel(result(2, liveness=LIVE), "s1"))  # late results: dropped, not saved again
        desk.desk.on_event(opened_event("s1"))  # a replayed OPENED: not reopened
        desk.desk.on_event(late_opened)  # refused by the store: its held result is gone too
        desk.desk.tick(time.time() + 3600)  # past every deadline: nothing of the erased sessions comes back
        assert desk.store.get("s1") is None and desk.store.get("s3") is None
        assert desk.store.get("s2") is not None
        desk.flush()
        assert {e.session_id for e in desk.publisher.session_events() if e.claim_subject_id == "traveller"} == {"s1"}
        assert [r.purpose for r in desk.audit.records()] == ["e-channel"]  # s2's time-out; nothing for s1 or s3
    finally:
        desk.close()


def test_another_replicas_copy_of_an_erased_session_leaves_its_desk(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'decision.db'}"
    owner, other = Desk(url), Desk(url)
    try:
        owner.desk.on_event(opened_event("s1"))
        assert other.desk.erase_subject("traveller") == 1  # the replica that got the notice does not hold s1
        owner.desk.on_result(echannel(result(1), "s1"))  # the owner's next save is refused: s1 leaves its memory
        owner.desk.tick(time.time() + 3600)
        assert owner.store.get("s1") is None and owner.store.load_open() == []
    finally:
        owner.close()
        other.close()
