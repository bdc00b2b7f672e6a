"""The ids a subscriber has handled, kept where a restart finds them: the deduplication half of ``Subscriber``.

Sightline delivers at least once: a stage that restarts publishes the same events again with the same ``ce_id``, and
a subscriber that restarts reads again what it had not committed. Each (group, topic, id) is recorded here as
``started`` before the handler runs and ``done`` after it returns; a ``done`` id is never handed over again, a
``started`` one is handed over again marked ``redelivered`` (the handler was running when the process stopped).
Rows are kept for the topic's retention after they were last seen, then purged: a record older than that is gone
from the topic, so it cannot come back.

A SQLite file by default (``<store_dir>/<group>.sqlite``); any ``sqlite:///`` or ``postgresql://`` URL works
(``common/sqlstore.py``), e.g. one PostgreSQL database shared by every member of a group.
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import datetime
from enum import Enum
from pathlib import Path

from sightline.common.sqlstore import BackendStore, Cursor, Migration, StoreError, open_backend

SCHEMA = (
    Migration(
        1,
        "handled event ids per group and topic",
        (
            "CREATE TABLE seen_events (group_id {key} NOT NULL, topic {key} NOT NULL, event_id {key} NOT NULL, "
            "state TEXT NOT NULL, keep_until {timestamp} NOT NULL, PRIMARY KEY (group_id, topic, event_id))",
            "CREATE INDEX seen_events_keep_until ON seen_events (keep_until)",
        ),
    ),
)
SCHEMA_TABLE = "seen_events_schema"
LOCK_KEY = 0x5EE1_1D5  # PostgreSQL advisory lock of this store's migrations


class SeenStoreError(StoreError):
    """The handled-id store cannot be opened or used."""


class Handled(str, Enum):
    """What the store knows of an event id."""

    NEW = "new"
    STARTED = "started"  # handed to the handler, which had not returned when last seen
    DONE = "done"


class SeenStore(BackendStore):
    """Handled ids of one consumer group."""

    closed_error = SeenStoreError
    what = "subscriber id store"

    def __init__(self, location: str | Path, group: str) -> None:
        """``location``: a file path (SQLite) or a database URL."""
        text = str(location)
        if "://" not in text:
            path = Path(text).expanduser()
            _write_ahead_log(path)
            text = f"sqlite:///{path}"
        super().__init__(open_backend(text, what=self.what, error=SeenStoreError))
        self.group = group
        self.description = self._backend.description
        self._migrated(SCHEMA, SCHEMA_TABLE, LOCK_KEY, self.what)

    def state(self, topic: str, event_id: str) -> Handled:
        with self._tx(write=False) as cur:
            return self._state(cur, topic, event_id)

    def begin(self, topic: str, event_id: str, keep_until: datetime) -> Handled:
        """What the store knew of the event, and, unless it was done, the event recorded as started (the handler is
        about to get it); a done event is kept until ``keep_until`` (a republished copy may come back as long). One
        transaction, so a record costs one write here and one in ``finish``."""
        with self._tx(write=True) as cur:
            known = self._state(cur, topic, event_id)
            if known is Handled.DONE:
                cur.execute(
                    "UPDATE seen_events SET keep_until = ? WHERE group_id = ? AND topic = ? AND event_id = ?",
                    (self._time(keep_until), self.group, topic, event_id),
                )
            else:
                self._put(cur, topic, event_id, Handled.STARTED, keep_until)
            return known

    def finish(self, topic: str, event_id: str, keep_until: datetime) -> None:
        """The handler returned."""
        with self._tx(write=True) as cur:
            self._put(cur, topic, event_id, Handled.DONE, keep_until)

    def purge(self, now: datetime) -> int:
        """Drop the ids kept until before ``now``; how many."""
        with self._tx(write=True) as cur:
            return cur.execute(
                "DELETE FROM seen_events WHERE group_id = ? AND keep_until < ?", (self.group, self._time(now))
            ).rowcount

    def count(self) -> int:
        with self._tx(write=False) as cur:
            return int(cur.execute("SELECT COUNT(*) FROM seen_events WHERE group_id = ?", (self.group,)).fetchone()[0])

    def _state(self, cur: Cursor, topic: str, event_id: str) -> Handled:
        row = cur.execute(
            "SELECT state FROM seen_events WHERE group_id = ? AND topic = ? AND event_id = ?",
            (self.group, topic, event_id),
        ).fetchone()
        return Handled(row[0]) if row else Handled.NEW

    def _put(self, cur: Cursor, topic: str, event_id: str, state: Handled, keep_until: datetime) -> None:
        cur.execute(
            "INSERT INTO seen_events (group_id, topic, event_id, state, keep_until) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (group_id, topic, event_id) DO UPDATE SET state = excluded.state, "
            "keep_until = excluded.keep_until",
            (self.group, topic, event_id, state.value, self._time(keep_until)),
        )

    def _time(self, at: datetime) -> object:
        return self._backend.dialect.to_db_time(at)


def _write_ahead_log(path: Path) -> None:
    """Put a SQLite store in WAL mode, a property of the file that every later connection keeps: a commit then costs
    one fsync of the log instead of the rollback journal's several (about 5x more commits per second here), with
    the same durability."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as error:
        raise SeenStoreError(f"cannot open the subscriber id store {path}: {error}") from None
