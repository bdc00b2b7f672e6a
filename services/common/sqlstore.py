"""The small SQL layer every Sightline store shares: SQLite or PostgreSQL behind one URL, a dialect shim, migrations.

SQLite (``sqlite:///path.db``) serves a single node or a laptop; PostgreSQL (``postgresql://user@host:5432/db``) lets
several replicas share one database. Each store writes its SQL once, with ``?`` placeholders and ``{type}`` names
(``{pk}``, ``{bytes}``, ``{key}``, ``{timestamp}``, ``{bigint}``) that the dialect fills in, and keeps its schema in a
list of ``Migration``s applied on open under its own version table. Used by the gallery (``matching/store.py``), the
audit log (``common/audit.py``) and the review store (``decision/review/``).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, Self
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A database cannot be opened or used (bad URL, unreachable, schema newer than this build)."""


# -- dialects ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    name: str
    placeholder: str
    types: dict[str, str]
    begin_write: str | None
    begin_read: str | None
    migration_lock: str | None  # a format string taking {key}; None when begin_write already excludes writers
    for_update: str

    def sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def to_db_time(self, value: datetime) -> Any:
        return value.isoformat() if self.name == "sqlite" else value

    def from_db_time(self, value: Any) -> datetime:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
        return parsed.astimezone(UTC)


# The largest integer both SQLite and PostgreSQL (BIGINT) store: the limit of a sequence a caller may page after.
MAX_DB_INTEGER = 2**63 - 1

SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    types={
        "pk": "INTEGER PRIMARY KEY AUTOINCREMENT",  # AUTOINCREMENT: ids of deleted rows are never reused
        "bytes": "BLOB",
        "key": "TEXT",
        "timestamp": "TEXT",
        "bigint": "INTEGER",
    },
    begin_write="BEGIN IMMEDIATE",
    begin_read="BEGIN",
    migration_lock=None,  # BEGIN IMMEDIATE already excludes other writers
    for_update="",
)
POSTGRES = Dialect(
    name="postgresql",
    placeholder="%s",
    types={
        "pk": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "bytes": "BYTEA",
        # Byte order, as in SQLite and Python, so pagination order does not depend on the server's locale.
        "key": 'TEXT COLLATE "C"',
        "timestamp": "TIMESTAMPTZ",
        "bigint": "BIGINT",
    },
    begin_write=None,
    # Reads that take several statements see one consistent state.
    begin_read="SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    migration_lock="SELECT pg_advisory_xact_lock({key})",
    for_update=" FOR UPDATE",
)


@dataclass(frozen=True)
class Migration:
    """One schema step. ``statements`` run on every dialect; ``by_dialect`` adds statements for one dialect only
    (triggers, for instance, are written differently in SQLite and PostgreSQL)."""

    version: int
    description: str
    statements: tuple[str, ...]
    by_dialect: dict[str, tuple[str, ...]] = field(default_factory=dict)


# -- backends ----------------------------------------------------------------------------------------------------


class Cursor:
    """A DB-API cursor that takes ``?`` placeholders whatever the backend."""

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self._raw = raw
        self._dialect = dialect

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Cursor:
        if params:
            self._raw.execute(self._dialect.sql(statement), tuple(params))
        else:
            # psycopg would read a literal '%' as a placeholder if given an empty tuple.
            self._raw.execute(self._dialect.sql(statement))
        return self

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._raw.executemany(self._dialect.sql(statement), [tuple(r) for r in rows])

    def fetchone(self) -> Any:
        return self._raw.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._raw.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._raw.rowcount)


class Backend(Protocol):
    dialect: Dialect
    description: str

    def transaction(self, write: bool) -> Any: ...

    def close(self) -> None: ...


class SqliteBackend:
    """One connection behind a lock; transactions are explicit (the connection is in autocommit mode)."""

    dialect = SQLITE

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.description = f"sqlite:///{path}"
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA foreign_keys = ON")
        # Deleted rows are zeroed in the file, not left in free pages: an erased or purged subject's templates, alerts
        # and sessions must not survive in the database file (PostgreSQL keeps dead row versions until VACUUM).
        self._conn.execute("PRAGMA secure_delete = ON")

    @contextmanager
    def transaction(self, write: bool) -> Iterator[Cursor]:
        with self._lock:
            raw = self._conn.cursor()
            begin = self.dialect.begin_write if write else self.dialect.begin_read
            assert begin is not None  # SQLITE sets both: in autocommit mode every transaction is explicit
            raw.execute(begin)
            try:
                yield Cursor(raw, self.dialect)
            except BaseException:
                raw.execute("ROLLBACK")
                raise
            try:
                raw.execute("COMMIT")
            except sqlite3.Error:
                # A COMMIT refused (say "database is locked" by a reader) leaves the transaction open: without the
                # rollback every later BEGIN fails with "cannot start a transaction within a transaction", which no
                # retry outlives. Rolled back, the caller's retry starts clean. SQLite may have rolled back by itself
                # (disk full, I/O error): then a ROLLBACK would hide the real error.
                if self._conn.in_transaction:
                    raw.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresBackend:
    """One connection behind a lock, reopened on the next call after the server dropped it."""

    dialect = POSTGRES

    def __init__(self, url: str, application_name: str = "sightline", error: type[StoreError] = StoreError) -> None:
        self._url = url
        self._application_name = application_name
        self._error = error
        self.description = redact_url(url)
        self._lock = threading.Lock()
        self._conn: Any = None
        with self._lock:
            self._connection()

    def _connection(self) -> Any:
        import psycopg  # imported here so SQLite-only deployments never need libpq

        if self._conn is None or self._conn.closed or self._conn.broken:
            options: dict[str, Any] = {"autocommit": True}
            if "connect_timeout" not in self._url:
                options["connect_timeout"] = 10
            if "application_name" not in self._url:
                options["application_name"] = self._application_name
            try:
                self._conn = psycopg.connect(self._url, **options)
            except psycopg.OperationalError as error:
                # libpq's message names host and user, never the password; the URL is redacted.
                # Chained, not hidden: common/transient.py finds the OperationalError in the cause and retries.
                raise self._error(f"cannot connect to PostgreSQL at {self.description}: {error}") from error
        return self._conn

    @contextmanager
    def transaction(self, write: bool) -> Iterator[Cursor]:
        with self._lock:
            conn = self._connection()
            with conn.transaction(), conn.cursor() as raw:
                cursor = Cursor(raw, self.dialect)
                begin = self.dialect.begin_write if write else self.dialect.begin_read
                if begin:
                    cursor.execute(begin)
                yield cursor

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


class BackendStore:
    """What every store over a ``Backend`` shares: close once, use as a context manager, and transactions that refuse
    to run after close with the store's own error type."""

    closed_error: type[StoreError] = StoreError
    what = "store"

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Cursor]:
        if self._closed:
            raise self.closed_error(f"{self.what} is closed")
        with self._backend.transaction(write) as cursor:
            yield cursor

    def _now(self) -> Any:
        return self._backend.dialect.to_db_time(datetime.now(UTC))

    def _migrated(self, migrations: Sequence[Migration], table: str, lock_key: int, what: str) -> Self:
        """This store with its tables brought up to date; closed, and the error raised, when that fails."""
        try:
            self._migrate(migrations, table, lock_key, what)
        except BaseException:
            self.close()
            raise
        return self

    def _migrate(self, migrations: Sequence[Migration], table: str, lock_key: int, what: str) -> None:
        """Bring the store's tables up to the newest migration (one process at a time, see ``migrate``)."""
        with self._tx(write=True) as cur:
            applied = migrate(
                cur,
                self._backend.dialect,
                migrations,
                table=table,
                lock_key=lock_key,
                what=what,
                error=self.closed_error,
            )
        for migration in applied:
            log.info("%s schema migrated to version %d: %s", what, migration.version, migration.description)


def redact_url(url: str) -> str:
    """The URL without its password (in the netloc or a ``password=`` query parameter), fit for logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def open_backend(
    url: str, what: str = "database", application_name: str = "sightline", error: type[StoreError] = StoreError
) -> Backend:
    """The backend for ``url``; ``what`` names the database in error messages ("gallery", "audit", ...)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise error(
                f"SQLite {what} URL must be sqlite:///relative/path.db, sqlite:////absolute/path.db "
                f"or sqlite:///:memory:, got {redact_url(url)}"
            )
        return SqliteBackend(url[len("sqlite:///") :])
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return PostgresBackend("postgresql" + url[len(scheme) :], application_name, error)
    raise error(f"unsupported {what} URL scheme {scheme!r}: use sqlite:/// or postgresql://")


# -- migrations --------------------------------------------------------------------------------------------------


def migrate(
    cur: Cursor,
    dialect: Dialect,
    migrations: Sequence[Migration],
    *,
    table: str,
    lock_key: int,
    what: str,
    error: type[StoreError] = StoreError,
) -> list[Migration]:
    """Apply the migrations newer than the database's version, inside the caller's write transaction.

    ``table`` is the store's own version table, so several stores can share one database; ``lock_key`` is a
    PostgreSQL advisory lock id, the same for every replica migrating that store. Returns the migrations applied.
    """
    if dialect.migration_lock:
        cur.execute(dialect.migration_lock.format(key=int(lock_key)))
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER PRIMARY KEY,"
        " description TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    current = int(cur.execute(f"SELECT MAX(version) FROM {table}").fetchone()[0] or 0)
    latest = migrations[-1].version
    if current > latest:
        raise error(f"{what} schema version {current} is newer than this build supports ({latest}); upgrade Sightline")
    applied = []
    for migration in migrations:
        if migration.version <= current:
            continue
        for statement in (*migration.statements, *migration.by_dialect.get(dialect.name, ())):
            cur.execute(statement.format(**dialect.types))
        cur.execute(
            f"INSERT INTO {table} (version, description, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.description, datetime.now(UTC).isoformat()),
        )
        applied.append(migration)
    return applied
