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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sightline.common.sqlstore import BackendStore, Migration, StoreError, open_backend
from sightline.decision.sessions import SessionState

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
        """Insert or update the session; False (nothing written) when the stored session is already decided."""
        to_db = self._backend.dialect.to_db_time
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO echannel_sessions (session_id, gate_id, state, opened_at, deadline, updated_at, decided,"
                " audited, published) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0) ON CONFLICT (session_id) DO UPDATE"
                " SET state = excluded.state, updated_at = excluded.updated_at, decided = excluded.decided"
                " WHERE echannel_sessions.decided = 0",
                (state.session_id, state.gate_id, json.dumps(state.to_dict(), separators=(",", ":")),
                 to_db(_utc(state.opened_at)), to_db(_utc(state.deadline)), self._now(), int(state.decided)),
            )  # fmt: skip
            return cur.rowcount == 1

    def mark_audited(self, session_id: str) -> None:
        self._set_flag(session_id, "audited")

    def mark_published(self, session_id: str) -> None:
        self._set_flag(session_id, "published")

    def get(self, session_id: str) -> StoredSession | None:
        with self._tx(write=False) as cur:
            row = cur.execute(f"SELECT {_COLUMNS} FROM echannel_sessions WHERE session_id = ?",
                              (session_id,)).fetchone()  # fmt: skip
        return _stored(row) if row is not None else None

    def load_open(self) -> list[SessionState]:
        """Every undecided session, oldest first: what a restarted service resumes (and times out if it must)."""
        with self._tx(write=False) as cur:
            rows = cur.execute(f"SELECT {_COLUMNS} FROM echannel_sessions WHERE decided = 0"
                               " ORDER BY opened_at").fetchall()  # fmt: skip
        return [_stored(row).state for row in rows]

    def unannounced(self) -> list[StoredSession]:
        """Decided sessions whose audit record or KIND_DECIDED event may be missing (the service stopped between)."""
        with self._tx(write=False) as cur:
            rows = cur.execute(f"SELECT {_COLUMNS} FROM echannel_sessions WHERE decided = 1"
                               " AND (audited = 0 OR published = 0) ORDER BY updated_at").fetchall()  # fmt: skip
        return [_stored(row) for row in rows]

    def purge_decided(self, older_than: datetime) -> int:
        """Remove the announced decided sessions last changed before ``older_than``; returns how many."""
        before = self._backend.dialect.to_db_time(older_than.astimezone(UTC))
        with self._tx(write=True) as cur:
            cur.execute("DELETE FROM echannel_sessions WHERE decided = 1 AND audited = 1 AND published = 1"
                        " AND updated_at < ?", (before,))  # fmt: skip
            return cur.rowcount

    def _set_flag(self, session_id: str, column: str) -> None:
        with self._tx(write=True) as cur:
            cur.execute(f"UPDATE echannel_sessions SET {column} = 1 WHERE session_id = ?", (session_id,))


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _stored(row: Any) -> StoredSession:
    state, audited, published = row
    return StoredSession(SessionState.from_dict(json.loads(state)), bool(audited), bool(published))
