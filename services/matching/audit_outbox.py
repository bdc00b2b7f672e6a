"""The gallery's audit outbox: a gallery write and its audit record commit together, then reach the audit log in order,
each exactly once.

The audit chain is its own database (``common/audit.py``), so a write to the gallery and an append to the chain are
two transactions, and a process that dies (or an audit database that is down) between them would leave a write
nobody audited. Instead each write puts its records (``AuditEntry``) in the ``audit_outbox`` table of the gallery
database, inside the write's own transaction (``put``, called by ``GalleryStore``): the write and its records commit
or roll back together, by construction. An entry is checked before it goes in (``AuditEntry``), so a record the log
would refuse rolls the write back rather than blocking the outbox later.

``AuditOutboxRelay`` (a thread per replica, started with the gallery's servicers, stopped with the gallery) appends
the rows to the audit log in outbox order and deletes them. Outbox ids are taken from a counter in ``gallery_state``
whose row lock the writer holds until it commits, so id order is commit order, even for replicas sharing a PostgreSQL
gallery. Each row carries a random key, under which the log appends at most once (``AuditLog.append``'s
``idempotency_key``): a relay that crashes between the append and the delete, or two replicas' relays draining the
same rows, append nothing twice. The record's time is the append's (the chain's times never go back); the write's own
commit time is in its details (``written_at``).

A write call waits (``OutboxPolicy.wait_s``, briefly) for the relay to append its records, so in normal operation
they are in the chain when the call returns. While the audit log cannot be written, the relay retries with backoff
and write calls return without waiting: gallery writes go on, their records safe in the outbox, and
``sightline_audit_outbox_records`` / ``sightline_audit_outbox_oldest_seconds`` say how many wait and for how long.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, Self

from sightline.common import telemetry
from sightline.common.audit import (
    LEGACY_DETAIL,
    MAX_FIELD_CHARS,
    Action,
    AuditLog,
    AuditRecord,
    clean_details,
    format_time,
)
from sightline.common.sqlstore import Cursor
from sightline.common.transient import Backoff

log = logging.getLogger(__name__)

SERVICE = "matching"
WRITTEN_AT = "written_at"  # the detail a relayed record gets: when its gallery write committed
KEY_PREFIX = "gallery-outbox:"  # idempotency keys of relayed records, apart from any other writer's
_COLUMNS = "id, record_key, written_at, principal, action, subject_id, purpose, result, details"


@dataclass(frozen=True)
class AuditEntry:
    """One audit record a gallery write commits with it; checked here, as the audit log will check it."""

    principal: str
    action: Action
    subject_id: str = ""
    purpose: str = ""
    result: str = "ok"
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))
        object.__setattr__(self, "details", clean_details(self.details))
        for name in ("principal", "subject_id", "purpose", "result"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS or (name == "principal" and not value):
                raise ValueError(f"audit {name} must be a string of at most {MAX_FIELD_CHARS} characters")
        for reserved in (WRITTEN_AT, LEGACY_DETAIL):
            if reserved in self.details:
                raise ValueError(f"audit detail {reserved!r} is reserved")


@dataclass(frozen=True)
class OutboxRow:
    """A record waiting in the outbox: its place (``id``), its idempotency key and when its write committed."""

    id: int
    key: str
    written_at: datetime
    entry: AuditEntry

    @property
    def idempotency_key(self) -> str:
        return KEY_PREFIX + self.key


@dataclass(frozen=True)
class OutboxState:
    """What waits in the outbox: the oldest rows (at most the limit asked), how many in all, since when, and the
    last id handed out (rows up to it have committed, or never will)."""

    rows: list[OutboxRow]
    depth: int
    oldest: datetime | None
    last_id: int


# -- the table, on a cursor of the gallery database ----------------------------------------------------------------

MIGRATION_STATEMENTS = (
    "CREATE TABLE audit_outbox (id {bigint} PRIMARY KEY, record_key TEXT NOT NULL, written_at {timestamp} NOT NULL,"
    " principal TEXT NOT NULL, action TEXT NOT NULL, subject_id TEXT NOT NULL, purpose TEXT NOT NULL,"
    " result TEXT NOT NULL, details TEXT NOT NULL)",
    "ALTER TABLE gallery_state ADD COLUMN audit_outbox_last {bigint} NOT NULL DEFAULT 0",
)


def put(cur: Cursor, entries: Sequence[AuditEntry], written_at: Any) -> None:
    """Adds the entries, in order, inside the caller's write transaction (``written_at`` in the database's form).

    The counter's row stays locked until the caller commits: a later writer's ids are higher and commit later."""
    if not entries:
        return
    row = cur.execute(
        "UPDATE gallery_state SET audit_outbox_last = audit_outbox_last + ? WHERE id = 1 RETURNING audit_outbox_last",
        (len(entries),),
    ).fetchone()
    first = int(row[0]) - len(entries) + 1
    cur.executemany(
        f"INSERT INTO audit_outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                first + offset,
                uuid.uuid4().hex,
                written_at,
                entry.principal,
                entry.action.value,
                entry.subject_id,
                entry.purpose,
                entry.result,
                json.dumps(dict(entry.details), sort_keys=True, separators=(",", ":"), ensure_ascii=False),
            )
            for offset, entry in enumerate(entries)
        ],
    )


def pending(cur: Cursor, limit: int, from_db_time: Any) -> OutboxState:
    """The oldest ``limit`` rows, with the outbox's depth, oldest time and last id, in one read."""
    rows = cur.execute(f"SELECT {_COLUMNS} FROM audit_outbox ORDER BY id LIMIT ?", (limit,)).fetchall()
    depth, oldest = cur.execute("SELECT COUNT(*), MIN(written_at) FROM audit_outbox").fetchone()
    (last_id,) = cur.execute("SELECT audit_outbox_last FROM gallery_state WHERE id = 1").fetchone()
    return OutboxState(
        [_row(row, from_db_time) for row in rows],
        int(depth),
        from_db_time(oldest) if oldest is not None else None,
        int(last_id),
    )


def remove(cur: Cursor, ids: Sequence[int]) -> None:
    cur.executemany("DELETE FROM audit_outbox WHERE id = ?", [(row_id,) for row_id in ids])


def _row(row: tuple[Any, ...], from_db_time: Any) -> OutboxRow:
    row_id, key, written_at, principal, action, subject_id, purpose, result, details = row
    entry = AuditEntry(principal, Action(action), subject_id, purpose, result, json.loads(details))
    return OutboxRow(int(row_id), str(key), from_db_time(written_at), entry)


# -- the relay -----------------------------------------------------------------------------------------------------


class OutboxStore(Protocol):
    """What the relay needs of the gallery store (``GalleryStore``)."""

    def audit_outbox(self, limit: int = 100) -> OutboxState: ...

    def remove_audit_outbox(self, ids: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class OutboxPolicy:
    """How the relay runs (``MatchingSettings.audit_outbox_*``)."""

    poll_s: float = 1.0  # a pass at least this often: rows another replica, or a crash, left behind
    retry_first_s: float = 0.1  # after a failed pass; doubled each time, up to retry_max_s
    retry_max_s: float = 30.0
    wait_s: float = 5.0  # how long a write call waits for its records to reach the audit log
    batch: int = 100


def append_row(audit: AuditLog, row: OutboxRow) -> AuditRecord:
    """Appends one outbox row to the audit log, at most once whatever happens after (the relay's first step)."""
    entry = row.entry
    details = {**entry.details, WRITTEN_AT: format_time(row.written_at)}
    return audit.append(
        entry.principal,
        entry.action,
        entry.subject_id,
        entry.purpose,
        entry.result,
        details,
        idempotency_key=row.idempotency_key,
    )


class AuditOutboxRelay:
    """Appends the outbox's rows to the audit log in order and deletes them; one thread, passes on request (a write
    just committed), every ``poll_s``, and at start; after a failed pass, retries with backoff (see above)."""

    def __init__(self, store: OutboxStore, audit: AuditLog, policy: OutboxPolicy | None = None) -> None:
        self.store, self.audit = store, audit
        self.policy = policy or OutboxPolicy()
        self._backoff = Backoff(self.policy.retry_first_s, self.policy.retry_max_s)
        self._changed = threading.Condition()
        self._requested = 1  # passes asked for; the first is the drain at start
        self._completed = 0  # the request count a pass had seen when it began, for the last pass that succeeded
        self._failures = 0  # consecutive failed passes
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="audit-outbox", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    @property
    def failing(self) -> bool:
        """Whether the last pass failed (the audit log, or the gallery, could not be used)."""
        return self._failures > 0

    def wait(self, timeout_s: float | None = None) -> bool:
        """Asks for a pass and waits for one that began after this call to succeed: then every record committed before
        the call is in the audit log (True). False at once while the relay is failing (the records wait in the
        outbox), or after ``timeout_s`` (default ``policy.wait_s``)."""
        with self._changed:
            self._requested += 1
            ticket = self._requested
            self._changed.notify_all()
            self._changed.wait_for(
                lambda: self._completed >= ticket or self._failures > 0 or self._stopping,
                self.policy.wait_s if timeout_s is None else timeout_s,
            )
            return self._completed >= ticket

    def drain(self) -> int:
        """One pass: every row committed when it began, appended in order (at most once each) and deleted; returns
        how many. Raises on the first row that cannot be appended, having deleted those before it."""
        state = self.store.audit_outbox(self.policy.batch)
        relayed = 0
        while state.rows:
            done: list[int] = []
            try:
                for row in state.rows:
                    append_row(self.audit, row)
                    done.append(row.id)
            finally:
                if done:
                    self.store.remove_audit_outbox(done)
                    relayed += len(done)
            # Rows beyond the last id seen at the start committed later: the next pass takes them (a pass ends).
            if len(state.rows) < self.policy.batch or state.rows[-1].id >= state.last_id:
                break
            state = self.store.audit_outbox(self.policy.batch)
        return relayed

    def close(self) -> None:
        """Stops the thread after a last pass (none while the relay is failing: the rows wait for the next start)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=self.policy.wait_s + 5)

    # -- the thread ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(self._due, self._delay())
                ticket, stopping = self._requested, self._stopping
            if stopping:
                if not self.failing:
                    self._pass(ticket)
                return
            self._pass(ticket)

    def _due(self) -> bool:
        """A pass was asked for (and the relay is not backing off after a failure), or the relay is stopping."""
        return self._stopping or (not self._failures and self._requested > self._completed)

    def _delay(self) -> float:
        return self._backoff.delay(self._failures) if self._failures else self.policy.poll_s

    def _pass(self, ticket: int) -> None:
        try:
            relayed = self.drain()
        except Exception:
            with self._changed:
                self._failures += 1
                failures = self._failures
                self._changed.notify_all()
            log.warning(
                "audit outbox: could not relay records to the audit log; the gallery goes on, its records wait in "
                "the outbox (retrying)",
                exc_info=failures == 1,  # the traceback once per outage, not on every retry
                extra={"failures": failures, "retry_in_s": round(self._delay(), 2)},
            )
        else:
            with self._changed:
                if self._failures:
                    log.info("audit outbox: relaying again after %d failed attempt(s)", self._failures)
                self._failures, self._completed = 0, max(self._completed, ticket)
                self._changed.notify_all()
            if relayed:
                log.debug("audit outbox: relayed %d record(s)", relayed)
        self._report()

    def _report(self) -> None:
        """The gauges: rows waiting, and the age of the oldest (0 when none); unchanged when the gallery is down."""
        try:
            state = self.store.audit_outbox(0)
        except Exception:  # noqa: BLE001 - the gallery's own checks report an unreachable database
            return
        age = (datetime.now(UTC) - state.oldest).total_seconds() if state.oldest is not None else 0.0
        telemetry.AUDIT_OUTBOX_RECORDS.labels(SERVICE).set(state.depth)
        telemetry.AUDIT_OUTBOX_OLDEST.labels(SERVICE).set(max(0.0, age))
