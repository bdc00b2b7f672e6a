"""The e-channel sessions the decision service is fusing, persisted so that they survive a restart.

One row per session, keyed by session id, in the decision database (the same URL as the review store and the audit
log, its own tables and schema-version table): the ``SessionState`` as JSON (ids, counts and scores, never an image or
a descriptor), the gate, the session's times and three flags:

- ``decided``: the outcome is reached. A decided row is never overwritten (``save`` refuses it), so however many
  replays, restarts or replicas there are, a session is decided once;
- ``audited`` and ``published``: its one audit record is written, its KIND_DECIDED event is on the sessions topic.
  A decided session still missing either is announced again after a restart (``unannounced``): a small outbox.

``load_open`` gives the undecided sessions back at start-up; ``purge_decided`` removes announced sessions past their
retention (keep it longer than the sessions topic's, so that a replayed OPENED finds its session decided).

``erase_subject`` (right to erasure) deletes the sessions whose claim is the subject, decided or not, and remembers the
subject and the erasure's time until ``purge_decided`` passes it: from then on ``save`` refuses (and deletes) a session
of that claim opened before the erasure, however it comes back: held in the memory of another replica, or opened
again by a replayed OPENED event. Other travellers' sessions whose stop-list hit was the subject keep their outcome
but lose the hit (``stop_subject_id`` finds them; ``save`` drops such a hit too when it comes back from memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sightline.common.sqlstore import BackendStore, Cursor, Migration, StoreError, open_backend
from sightline.decision.echannel.engine import SessionState, forget_stop_list_hit
from sightline.decision.review.store import ERASURE_GRACE, note_erasure

_PG_MIGRATION_LOCK = 0x5365_7373  # "Sess"; the same for every replica migrating the session table
_COLUMNS = "state, audited, published"

MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "e-channel sessions: state as JSON, decided and announcement flags",
        (
            "CREATE TABLE echannel_sessions (session_id {key} PRIMARY KEY, gate_id {key} NOT NULL,"
            " state TEXT NOT NULL, opened_at {timestamp} NOT NULL, deadline {timestamp} NOT NULL,"
            " updated_at {timestamp} NOT NULL, decided INTEGER NOT NULL, audited INTEGER NOT NULL,"
            " published INTEGER NOT NULL)",
            "CREATE INDEX echannel_sessions_decided_idx ON echannel_sessions (decided, updated_at)",
        ),
    ),
    Migration(
        2,
        "right to erasure: sessions by claimed subject, erased subjects",
        (
            "ALTER TABLE echannel_sessions ADD COLUMN claim_subject_id {key} NOT NULL DEFAULT ''",
            "CREATE INDEX echannel_sessions_claim_idx ON echannel_sessions (claim_subject_id)",
            "CREATE TABLE echannel_erasures (subject_id {key} PRIMARY KEY, erased_at {timestamp} NOT NULL)",
        ),
        by_dialect={  # the claims of the sessions stored before, from their state
            "sqlite": (
                "UPDATE echannel_sessions"
                " SET claim_subject_id = COALESCE(json_extract(state, '$.claim_subject_id'), '')",
            ),
            "postgresql": (
                "UPDATE echannel_sessions SET claim_subject_id = COALESCE(state::json ->> 'claim_subject_id', '')",
            ),
        },
    ),
    Migration(
        3,
        "right to erasure: sessions by the stop-list subject they hit",
        (
            "ALTER TABLE echannel_sessions ADD COLUMN stop_subject_id {key} NOT NULL DEFAULT ''",
            "CREATE INDEX echannel_sessions_stop_idx ON echannel_sessions (stop_subject_id)",
        ),
        by_dialect={  # the hits of the sessions stored before, from their state
            "sqlite": (
                "UPDATE echannel_sessions"
                " SET stop_subject_id = COALESCE(json_extract(state, '$.stop_list_hit[0]'), '')",
            ),
            "postgresql": (
                "UPDATE echannel_sessions SET stop_subject_id = COALESCE(state::json -> 'stop_list_hit' ->> 0, '')",
            ),
        },
    ),
]


class SessionStoreError(StoreError):
    """The session database cannot be opened or used."""


@dataclass(frozen=True)
class StoredSession:
    state: SessionState
    audited: bool
    published: bool


class SessionStore(BackendStore):
    """E-channel session states in SQLite or PostgreSQL; thread-safe (one lock, one connection)."""

    closed_error = SessionStoreError
    what = "session store"

    @classmethod
    def open(cls, url: str) -> SessionStore:
        """The session store at ``url``, creating or upgrading its table."""
        store = cls(open_backend(url, what="session", application_name="sightline-decision", error=SessionStoreError))
        return store._migrated(MIGRATIONS, "echannel_session_schema_version", _PG_MIGRATION_LOCK, "session")

    def save(self, state: SessionState) -> bool:
        """Insert or update the session; False (nothing written) when the stored session is already decided, or when
        its claimed subject was erased after it opened (its row, if any, is deleted then)."""
        to_db = self._backend.dialect.to_db_time
        with self._tx(write=True) as cur:
            if self._erased_after(cur, state.claim_subject_id, _utc(state.opened_at)):
                cur.execute("DELETE FROM echannel_sessions WHERE session_id = ?", (state.session_id,))
                return False
            if state.stop_list_hit and self._erased_after(cur, state.stop_list_hit[0], _utc(state.opened_at)):
                forget_stop_list_hit(state)  # a hit on a subject erased meanwhile is neither kept nor announced
            cur.execute(
                "INSERT INTO echannel_sessions (session_id, gate_id, claim_subject_id, stop_subject_id, state,"
                " opened_at, deadline, updated_at, decided, audited, published)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0) ON CONFLICT (session_id) DO UPDATE"
                " SET state = excluded.state, stop_subject_id = excluded.stop_subject_id,"
                " updated_at = excluded.updated_at, decided = excluded.decided WHERE echannel_sessions.decided = 0",
                (
                    state.session_id,
                    state.gate_id,
                    state.claim_subject_id,
                    _stop_subject(state),
                    _json(state),
                    to_db(_utc(state.opened_at)),
                    to_db(_utc(state.deadline)),
                    self._now(),
                    int(state.decided),
                ),
            )
            return cur.rowcount == 1

    def mark_audited(self, session_id: str) -> None:
        self._set_flag(session_id, "audited")

    def mark_published(self, session_id: str) -> None:
        self._set_flag(session_id, "published")

    def get(self, session_id: str) -> StoredSession | None:
        with self._tx(write=False) as cur:
            row = cur.execute(
                f"SELECT {_COLUMNS} FROM echannel_sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
        return _stored(row) if row is not None else None

    def load_open(self) -> list[SessionState]:
        """Every undecided session, oldest first: what a restarted service resumes (and times out if it must)."""
        with self._tx(write=False) as cur:
            rows = cur.execute(
                f"SELECT {_COLUMNS} FROM echannel_sessions WHERE decided = 0 ORDER BY opened_at"
            ).fetchall()
        return [_stored(row).state for row in rows]

    def unannounced(self) -> list[StoredSession]:
        """Decided sessions whose audit record or KIND_DECIDED event may be missing (the service stopped between)."""
        with self._tx(write=False) as cur:
            rows = cur.execute(
                f"SELECT {_COLUMNS} FROM echannel_sessions WHERE decided = 1"
                " AND (audited = 0 OR published = 0) ORDER BY updated_at"
            ).fetchall()
        return [_stored(row) for row in rows]

    def purge_decided(self, older_than: datetime) -> int:
        """Remove the announced decided sessions last changed before ``older_than``; returns how many. Erasure markers
        older than that go too: the sessions topic no longer holds an event from before such an erasure."""
        before = self._backend.dialect.to_db_time(older_than.astimezone(UTC))
        with self._tx(write=True) as cur:
            cur.execute(
                "DELETE FROM echannel_sessions WHERE decided = 1 AND audited = 1 AND published = 1 AND updated_at < ?",
                (before,),
            )
            purged = cur.rowcount
            cur.execute("DELETE FROM echannel_erasures WHERE erased_at < ?", (before,))
            return purged

    def erase_subject(self, subject_id: str, erased_at: datetime | None = None) -> int:
        """Right to erasure: delete every session claiming the subject, decided or not, in one transaction; returns
        how many.

        ``erased_at`` is when the subject was erased (the notice's time; default now). It is remembered, so that
        ``save`` refuses the subject's sessions opened before it, and so that a replayed notice (not newer than the
        last one applied) deletes nothing: a session claiming the subject by then opened after its erasure, for a
        subject enrolled again. The session desk's own copy in memory is dropped by ``SessionDesk.erase_subject``.
        """
        with self._tx(write=True) as cur:
            if not note_erasure(cur, self._backend.dialect, "echannel_erasures", subject_id, erased_at):
                return 0
            erased = cur.execute("DELETE FROM echannel_sessions WHERE claim_subject_id = ?", (subject_id,)).rowcount
            self._forget_stop_list_hits(cur, subject_id)
            return erased

    def _forget_stop_list_hits(self, cur: Cursor, subject_id: str) -> None:
        """Remove the subject from the stop-list hits of other travellers' sessions (``forget_stop_list_hit``); the
        sessions themselves stay, they are the other travellers'."""
        rows = cur.execute(
            "SELECT session_id, state FROM echannel_sessions WHERE stop_subject_id = ?", (subject_id,)
        ).fetchall()
        for session_id, text in rows:
            state = SessionState.from_dict(json.loads(text))
            forget_stop_list_hit(state)
            cur.execute(
                "UPDATE echannel_sessions SET state = ?, stop_subject_id = '' WHERE session_id = ?",
                (_json(state), session_id),
            )

    def _erased_after(self, cur: Cursor, subject_id: str, opened_at: datetime) -> bool:
        """Whether the subject was erased after a session claiming it opened (or up to ERASURE_GRACE before)."""
        row = cur.execute("SELECT erased_at FROM echannel_erasures WHERE subject_id = ?", (subject_id,)).fetchone()
        return row is not None and self._backend.dialect.from_db_time(row[0]) + ERASURE_GRACE >= opened_at

    def _set_flag(self, session_id: str, column: str) -> None:
        with self._tx(write=True) as cur:
            cur.execute(f"UPDATE echannel_sessions SET {column} = 1 WHERE session_id = ?", (session_id,))


def _json(state: SessionState) -> str:
    return json.dumps(state.to_dict(), separators=(",", ":"))


def _stop_subject(state: SessionState) -> str:
    return state.stop_list_hit[0] if state.stop_list_hit else ""


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _stored(row: Any) -> StoredSession:
    state, audited, published = row
    return StoredSession(SessionState.from_dict(json.loads(state)), bool(audited), bool(published))
