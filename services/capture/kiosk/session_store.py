"""The gate sessions of every capture replica, in one database: what any replica needs to continue a session.

One row per session, keyed by session id, in capture's own database (``SIGHTLINE_CAPTURE_DATABASE_URL``: a SQLite
file by default, PostgreSQL for several replicas), so that a kiosk may be served by any replica and a restart does
not lose or time out a session. A row holds the gate, the claim (its kind and subject id, never the portrait or the
document page it came from: those went to the gallery, as a session-scoped template, and are not kept here), the stop
lists, the opening and the deadline, the frame counters, whether the session is closed, and once it has ended its
outcome (a ``SessionUpdate``: ids, counts and scores) and when. No image, chip, descriptor or template is stored.

Frame sequence numbers are handed out here, atomically (``number_frame``), so frame ids stay unique and in order
whichever replica a kiosk's frames reach. A session ends once (``finish``: the first outcome stands, whoever brings
it); ended rows are purged after the retention (``purge_ended``). What only one replica can know (the kiosks
watching through it, its frames being published, the latest progress it relayed) stays in that replica's memory
(``session_book.py``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sightline.capture.kiosk.claims import Claim
from sightline.common.rpc import Unavailable
from sightline.common.sqlstore import POSTGRES, BackendStore, Cursor, Migration, StoreError, open_backend
from sightline.v1 import session_pb2

_PG_MIGRATION_LOCK = 0x4761_7465  # "Gate"; the same for every replica migrating the table
_IN_CHUNK = 500  # ids per IN (...) list

MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "gate sessions: claim, stop lists, times, frame counters, outcome",
        (
            "CREATE TABLE gate_sessions (session_id {key} PRIMARY KEY, gate_id {key} NOT NULL,"
            " claim_kind INTEGER NOT NULL, claim_subject_id {key} NOT NULL, session_scoped INTEGER NOT NULL,"
            " stop_lists TEXT NOT NULL, opened_at_us {bigint} NOT NULL, deadline_us {bigint} NOT NULL,"
            " frames_numbered INTEGER NOT NULL DEFAULT 0, frames_sent INTEGER NOT NULL DEFAULT 0,"
            " closed INTEGER NOT NULL DEFAULT 0, outcome {bytes}, ended_at_us {bigint})",
            # Open sessions (ended_at_us IS NULL) by deadline: the expiry round; ended ones by time: the purge.
            "CREATE INDEX gate_sessions_ended_idx ON gate_sessions (ended_at_us, deadline_us)",
        ),
    ),
]
_COLUMNS = (
    "session_id, gate_id, claim_kind, claim_subject_id, session_scoped, stop_lists, opened_at_us, deadline_us,"
    " frames_numbered, frames_sent, closed, outcome, ended_at_us"
)


class GateStoreError(StoreError):
    """The gate session database cannot be opened (bad URL, schema newer than this build)."""


class SessionStoreUnavailable(Unavailable):
    """The gate session database did not answer; the kiosk's call fails with UNAVAILABLE and may be retried."""


class SessionNotOpen(RuntimeError):
    """The session is unknown, closed or ended; becomes FAILED_PRECONDITION."""


class TooManySessions(RuntimeError):
    """The open session limit is reached; becomes RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class GateSession:
    """A gate session as the store holds it (a snapshot: the counters and the state may move on)."""

    session_id: str
    gate_id: str
    claim: Claim
    stop_lists: list[str]
    opened_at: float  # epoch seconds
    deadline: float
    frames_numbered: int = 0  # sequence numbers handed out: published, failed, or being published
    frames_sent: int = 0  # published on the frames topic (decision waits for that many results after CLOSED)
    closed: bool = False
    outcome: session_pb2.SessionUpdate | None = None  # the final update, once the session has ended
    ended_at: float = 0.0

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    @property
    def state(self) -> str:
        return "ended" if self.ended else "closed" if self.closed else "open"


class GateSessionStore(BackendStore):
    """Gate sessions in SQLite or PostgreSQL, shared by the capture replicas; thread-safe (one lock, one connection).

    A call whose database does not answer raises ``SessionStoreUnavailable``.
    """

    closed_error = GateStoreError
    what = "gate session store"

    @classmethod
    def open(cls, url: str) -> GateSessionStore:
        """The store at ``url``, creating or upgrading its table."""
        backend = open_backend(url, what="gate session", application_name="sightline-capture", error=GateStoreError)
        return cls(backend)._migrated(MIGRATIONS, "gate_session_schema_version", _PG_MIGRATION_LOCK, "gate session")

    def add(self, session: GateSession, max_open: int) -> None:
        """Store a new session; TooManySessions when ``max_open`` sessions have not ended yet (over all replicas)."""
        with self._tx(write=True) as cur:
            # PostgreSQL's READ COMMITTED lets two replicas count at once: the limit may be passed by one or two.
            (open_now,) = cur.execute("SELECT COUNT(*) FROM gate_sessions WHERE ended_at_us IS NULL").fetchone()
            if open_now >= max_open:
                raise TooManySessions(f"{max_open} gate sessions are open; try again when some have ended")
            cur.execute(
                "INSERT INTO gate_sessions (session_id, gate_id, claim_kind, claim_subject_id, session_scoped,"
                " stop_lists, opened_at_us, deadline_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session.session_id,
                    session.gate_id,
                    session.claim.kind,
                    session.claim.subject_id,
                    int(session.claim.session_scoped),
                    json.dumps(session.stop_lists),
                    _us(session.opened_at),
                    _us(session.deadline),
                ),
            )

    def get(self, session_id: str) -> GateSession | None:
        with self._tx(write=False) as cur:
            return _select(cur, session_id)

    def number_frame(self, session_id: str) -> tuple[GateSession | None, int]:
        """The session and the next frame sequence number, taken atomically; number 0 (nothing taken) when the session
        is unknown (None), closed or ended."""
        with self._tx(write=True) as cur:
            cur.execute(
                "UPDATE gate_sessions SET frames_numbered = frames_numbered + 1"
                " WHERE session_id = ? AND closed = 0 AND ended_at_us IS NULL",
                (session_id,),
            )
            numbered = cur.rowcount == 1
            session = _select(cur, session_id)
        return session, session.frames_numbered if numbered and session is not None else 0

    def count_published(self, session_id: str) -> int:
        """One more of the session's frames is on the frames topic; the number published so far."""
        with self._tx(write=True) as cur:
            cur.execute("UPDATE gate_sessions SET frames_sent = frames_sent + 1 WHERE session_id = ?", (session_id,))
            row = cur.execute("SELECT frames_sent FROM gate_sessions WHERE session_id = ?", (session_id,)).fetchone()
        return int(row[0]) if row is not None else 0

    def close_session(self, session_id: str) -> GateSession | None:
        """No more frames may be numbered; the session (None when unknown)."""
        with self._tx(write=True) as cur:
            cur.execute("UPDATE gate_sessions SET closed = 1 WHERE session_id = ?", (session_id,))
            return _select(cur, session_id)

    def finish(
        self, session_id: str, outcome: session_pb2.SessionUpdate, ended_at: float
    ) -> tuple[bool, GateSession | None]:
        """End the session with ``outcome`` unless it has ended already: whether this call ended it, and the session
        as stored afterwards (its outcome is the one that stands; None when the session is unknown)."""
        with self._tx(write=True) as cur:
            cur.execute(
                "UPDATE gate_sessions SET outcome = ?, ended_at_us = ?, closed = 1"
                " WHERE session_id = ? AND ended_at_us IS NULL",
                (outcome.SerializeToString(), _us(ended_at), session_id),
            )
            ended_here = cur.rowcount == 1
            return ended_here, _select(cur, session_id)

    def open_sessions(self) -> list[GateSession]:
        """The sessions that have not ended (closed ones included: they wait for their outcome), oldest first."""
        with self._tx(write=False) as cur:
            rows = cur.execute(
                f"SELECT {_COLUMNS} FROM gate_sessions WHERE ended_at_us IS NULL ORDER BY opened_at_us"
            ).fetchall()
        return [_session(row) for row in rows]

    def overdue(self, deadline_before: float) -> list[GateSession]:
        """The sessions that have not ended and whose deadline is before ``deadline_before``."""
        with self._tx(write=False) as cur:
            rows = cur.execute(
                f"SELECT {_COLUMNS} FROM gate_sessions WHERE ended_at_us IS NULL AND deadline_us < ?"
                " ORDER BY deadline_us",
                (_us(deadline_before),),
            ).fetchall()
        return [_session(row) for row in rows]

    def ended_among(self, session_ids: Sequence[str]) -> list[GateSession]:
        """Those of the sessions that have ended."""
        found: list[GateSession] = []
        ids = list(session_ids)
        with self._tx(write=False) as cur:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = cur.execute(
                    f"SELECT {_COLUMNS} FROM gate_sessions WHERE session_id IN ({marks}) AND ended_at_us IS NOT NULL",
                    chunk,
                ).fetchall()
                found += [_session(row) for row in rows]
        return found

    def active_subjects(self) -> set[str]:
        """The claimed subjects of the sessions that have not ended (their templates are in use)."""
        with self._tx(write=False) as cur:
            rows = cur.execute("SELECT claim_subject_id FROM gate_sessions WHERE ended_at_us IS NULL").fetchall()
        return {row[0] for row in rows}

    def purge_ended(self, ended_before: float) -> int:
        """Delete the sessions that ended before ``ended_before``; how many."""
        with self._tx(write=True) as cur:
            return cur.execute("DELETE FROM gate_sessions WHERE ended_at_us < ?", (_us(ended_before),)).rowcount

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Cursor]:
        try:
            with super()._tx(write) as cur:
                yield cur
        except Exception as exc:
            if self._is_database_error(exc):
                raise SessionStoreUnavailable(f"the gate session store did not answer: {exc}") from exc
            raise

    def _is_database_error(self, exc: Exception) -> bool:
        if isinstance(exc, sqlite3.Error | StoreError):
            return True
        if self._backend.dialect is POSTGRES:
            import psycopg  # only a PostgreSQL store has it loaded (SQLite-only deployments need no libpq)

            return isinstance(exc, psycopg.Error)
        return False


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


def _select(cur: Cursor, session_id: str) -> GateSession | None:
    row = cur.execute(f"SELECT {_COLUMNS} FROM gate_sessions WHERE session_id = ?", (session_id,)).fetchone()
    return _session(row) if row is not None else None


def _session(row: Any) -> GateSession:
    (
        session_id,
        gate_id,
        claim_kind,
        claim_subject_id,
        session_scoped,
        stop_lists,
        opened_at_us,
        deadline_us,
        frames_numbered,
        frames_sent,
        closed,
        outcome,
        ended_at_us,
    ) = row
    return GateSession(
        session_id=session_id,
        gate_id=gate_id,
        claim=Claim(int(claim_kind), claim_subject_id, session_scoped=bool(session_scoped)),
        stop_lists=list(json.loads(stop_lists)),
        opened_at=opened_at_us / 1e6,
        deadline=deadline_us / 1e6,
        frames_numbered=int(frames_numbered),
        frames_sent=int(frames_sent),
        closed=bool(closed),
        outcome=None if outcome is None else session_pb2.SessionUpdate.FromString(bytes(outcome)),
        ended_at=0.0 if ended_at_us is None else ended_at_us / 1e6,
    )
