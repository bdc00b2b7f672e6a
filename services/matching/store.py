"""Gallery storage: enrolled subjects, their encrypted templates and watchlist membership, in SQLite or PostgreSQL.

SQLite (``sqlite:///gallery.db``) serves a single node or a laptop; PostgreSQL (``postgresql://user@host:5432/db``)
lets several matching replicas share one gallery. Each replica keeps its own in-memory ``SearchIndex`` and polls
``version()``, a counter every enrolment and deletion bumps in the same transaction, to see that another replica
changed the gallery.

Templates are stored only as ciphertext (see ``templates.py``); this module decrypts them for ``load_templates``
and never logs them. The schema is created and upgraded on open from ``MIGRATIONS``, a list later changes append
to. The SQL is written once, with ``?`` placeholders and ``{type}`` names filled in by a tiny dialect shim.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from sightline.matching.templates import TemplateCipher, TemplateDecryptionError, UnknownKeyError

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
MAX_ID_LENGTH = 256
# Any constant will do: it only has to be the same for every replica migrating the same database.
_PG_MIGRATION_LOCK = 0x5167_6C6C


class GalleryStoreError(RuntimeError):
    """The gallery database cannot be opened or used (bad URL, unreachable, schema newer than this build)."""


class UnknownSubjectError(KeyError):
    """A template was added for a subject that is not enrolled."""

    def __str__(self) -> str:
        return f"subject {self.args[0]!r} is not enrolled; add_subject first"


@dataclass(frozen=True)
class SubjectRecord:
    subject_id: str
    display_name: str
    watchlists: tuple[str, ...]
    template_count: int
    created_at: datetime


@dataclass(frozen=True, eq=False)
class TemplateRecord:
    """A decrypted template; holds a face descriptor, so never log or persist it in clear."""

    template_id: int
    subject_id: str
    vector: np.ndarray
    watchlists: tuple[str, ...]
    model_name: str
    model_version: str
    quality: float

    def __repr__(self) -> str:
        return f"TemplateRecord(template_id={self.template_id}, subject_id={self.subject_id!r}, vector=<redacted>)"


# -- dialects ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dialect:
    name: str
    placeholder: str
    types: dict[str, str]
    begin_write: str | None
    begin_read: str | None
    migration_lock: str | None
    for_update: str

    def sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def to_db_time(self, value: datetime) -> Any:
        return value.isoformat() if self.name == "sqlite" else value

    def from_db_time(self, value: Any) -> datetime:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
        return parsed.astimezone(UTC)


_SQLITE = _Dialect(
    name="sqlite",
    placeholder="?",
    types={
        "pk": "INTEGER PRIMARY KEY AUTOINCREMENT",  # AUTOINCREMENT: ids of deleted templates are never reused
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
_POSTGRES = _Dialect(
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
    # Reads that take several statements (templates, then memberships) see one consistent state.
    begin_read="SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    migration_lock=f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})",
    for_update=" FOR UPDATE",
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


# Append only; never edit a released migration. Statements use {pk}, {bytes}, {key}, {timestamp}, {bigint}.
MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "subjects, encrypted templates, watchlist membership, gallery version",
        (
            "CREATE TABLE subjects (subject_id {key} PRIMARY KEY, display_name TEXT NOT NULL DEFAULT '',"
            " created_at {timestamp} NOT NULL)",
            "CREATE TABLE templates (id {pk},"
            " subject_id {key} NOT NULL REFERENCES subjects (subject_id) ON DELETE CASCADE,"
            " key_id TEXT NOT NULL, ciphertext {bytes} NOT NULL, model_name TEXT NOT NULL,"
            " model_version TEXT NOT NULL, quality REAL NOT NULL DEFAULT 0, created_at {timestamp} NOT NULL)",
            "CREATE INDEX templates_subject_idx ON templates (subject_id)",
            "CREATE TABLE watchlist_members ("
            " subject_id {key} NOT NULL REFERENCES subjects (subject_id) ON DELETE CASCADE,"
            " watchlist {key} NOT NULL, created_at {timestamp} NOT NULL, PRIMARY KEY (subject_id, watchlist))",
            "CREATE INDEX watchlist_members_watchlist_idx ON watchlist_members (watchlist, subject_id)",
            "CREATE TABLE gallery_state (id INTEGER PRIMARY KEY CHECK (id = 1), version {bigint} NOT NULL)",
            "INSERT INTO gallery_state (id, version) VALUES (1, 0)",
        ),
    ),
]


# -- backends ----------------------------------------------------------------------------------------------------


class _Cursor:
    """A DB-API cursor that takes ``?`` placeholders whatever the backend."""

    def __init__(self, raw: Any, dialect: _Dialect) -> None:
        self._raw = raw
        self._dialect = dialect

    def execute(self, statement: str, params: Sequence[Any] = ()) -> _Cursor:
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


class _Backend(Protocol):
    dialect: _Dialect
    description: str

    def transaction(self, write: bool) -> Any: ...

    def close(self) -> None: ...


class _SqliteBackend:
    """One connection behind a lock; transactions are explicit (the connection is in autocommit mode)."""

    dialect = _SQLITE

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.description = f"sqlite:///{path}"
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def transaction(self, write: bool) -> Iterator[_Cursor]:
        with self._lock:
            raw = self._conn.cursor()
            raw.execute(self.dialect.begin_write if write else self.dialect.begin_read)
            try:
                yield _Cursor(raw, self.dialect)
            except BaseException:
                raw.execute("ROLLBACK")
                raise
            raw.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _PostgresBackend:
    """One connection behind a lock, reopened on the next call after the server dropped it."""

    dialect = _POSTGRES

    def __init__(self, url: str) -> None:
        self._url = url
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
                options["application_name"] = "sightline-matching"
            try:
                self._conn = psycopg.connect(self._url, **options)
            except psycopg.OperationalError as error:
                # libpq's message names host and user, never the password; the URL is redacted.
                raise GalleryStoreError(f"cannot connect to PostgreSQL at {self.description}: {error}") from None
        return self._conn

    @contextmanager
    def transaction(self, write: bool) -> Iterator[_Cursor]:
        with self._lock:
            conn = self._connection()
            with conn.transaction(), conn.cursor() as raw:
                cursor = _Cursor(raw, self.dialect)
                begin = self.dialect.begin_write if write else self.dialect.begin_read
                if begin:
                    cursor.execute(begin)
                yield cursor

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


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


def _open_backend(url: str) -> _Backend:
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise GalleryStoreError(
                "SQLite gallery URL must be sqlite:///relative/path.db, sqlite:////absolute/path.db "
                f"or sqlite:///:memory:, got {redact_url(url)}"
            )
        return _SqliteBackend(url[len("sqlite:///") :])
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return _PostgresBackend("postgresql" + url[len(scheme) :])
    raise GalleryStoreError(f"unsupported gallery URL scheme {scheme!r}: use sqlite:/// or postgresql://")


# -- the store ---------------------------------------------------------------------------------------------------


class GalleryStore:
    """Subjects, encrypted templates and watchlists; thread-safe (one lock around one connection)."""

    def __init__(self, backend: _Backend, cipher: TemplateCipher) -> None:
        self._backend = backend
        self._cipher = cipher
        self._closed = False

    @classmethod
    def open(cls, url: str, cipher: TemplateCipher) -> GalleryStore:
        """Opens the gallery at ``url``, creating or upgrading the schema."""
        store = cls(_open_backend(url), cipher)
        try:
            store._migrate()
        except BaseException:
            store.close()
            raise
        logger.info("gallery store open at %s (schema version %d)", store._backend.description, store.schema_version)
        return store

    @property
    def cipher(self) -> TemplateCipher:
        return self._cipher

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._backend.dialect.name

    @property
    def schema_version(self) -> int:
        with self._tx(write=False) as cur:
            return int(cur.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)

    # -- writes --------------------------------------------------------------------------------------------------

    def add_subject(self, subject_id: str, display_name: str = "", watchlists: Sequence[str] = ()) -> bool:
        """Enrols the subject if new and adds it to ``watchlists``; returns True if the subject was created.

        Idempotent. A non-empty ``display_name`` replaces the stored one; memberships are only ever added.
        """
        _check_id("subject id", subject_id)
        names = sorted(set(watchlists))
        for name in names:
            _check_id("watchlist name", name)
        now = self._now()
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO subjects (subject_id, display_name, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (subject_id) DO NOTHING",
                (subject_id, display_name, now),
            )
            created = changed = cur.rowcount == 1
            if not created and display_name:
                cur.execute(
                    "UPDATE subjects SET display_name = ? WHERE subject_id = ? AND display_name <> ?",
                    (display_name, subject_id, display_name),
                )
                changed = changed or cur.rowcount > 0
            for name in names:
                cur.execute(
                    "INSERT INTO watchlist_members (subject_id, watchlist, created_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (subject_id, watchlist) DO NOTHING",
                    (subject_id, name, now),
                )
                changed = changed or cur.rowcount == 1
            if changed:
                self._bump_version(cur)
        return created

    def add_template(
        self, subject_id: str, vector: np.ndarray, model_name: str, model_version: str, quality: float = 0.0
    ) -> int:
        """Encrypts and stores one template of an enrolled subject; returns its id."""
        key_id, blob = self._cipher.encrypt(vector, subject_id)
        with self._tx(write=True) as cur:
            if cur.execute("SELECT 1 FROM subjects WHERE subject_id = ?", (subject_id,)).fetchone() is None:
                raise UnknownSubjectError(subject_id)
            row = cur.execute(
                "INSERT INTO templates (subject_id, key_id, ciphertext, model_name, model_version, quality,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (subject_id, key_id, blob, model_name, model_version, float(quality), self._now()),
            ).fetchone()
            self._bump_version(cur)
        return int(row[0])

    def delete_subject(self, subject_id: str) -> int:
        """Deletes the subject, its templates and memberships; returns templates removed (0 if unknown)."""
        with self._tx(write=True) as cur:
            if cur.execute("SELECT 1 FROM subjects WHERE subject_id = ?", (subject_id,)).fetchone() is None:
                return 0
            # Explicit deletes rather than relying on ON DELETE CASCADE, which SQLite only honours per connection.
            removed = cur.execute("DELETE FROM templates WHERE subject_id = ?", (subject_id,)).rowcount
            cur.execute("DELETE FROM watchlist_members WHERE subject_id = ?", (subject_id,))
            cur.execute("DELETE FROM subjects WHERE subject_id = ?", (subject_id,))
            self._bump_version(cur)
        logger.info("deleted a subject and %d templates", removed)
        return removed

    def rotate_keys(self, new_cipher: TemplateCipher) -> int:
        """Re-encrypts every template with ``new_cipher``'s active key; returns how many were re-encrypted.

        Old blobs are read with the current cipher, or with ``new_cipher`` for key ids only it holds. One
        transaction: on any error nothing changes. Afterwards this store encrypts with ``new_cipher``.
        """
        with self._tx(write=True) as cur:
            rows = cur.execute(
                "SELECT id, subject_id, key_id, ciphertext FROM templates ORDER BY id" + self._backend.dialect.for_update
            ).fetchall()
            updates = []
            for template_id, subject_id, key_id, blob in rows:
                reader = self._cipher if self._cipher.has_key(key_id) else new_cipher
                vector = _decrypt(reader, template_id, key_id, blob, subject_id)
                new_key_id, new_blob = new_cipher.encrypt(vector, subject_id)
                updates.append((new_key_id, new_blob, template_id))
            cur.executemany("UPDATE templates SET key_id = ?, ciphertext = ? WHERE id = ?", updates)
        self._cipher = new_cipher
        logger.info("re-encrypted %d templates with key id %r", len(updates), new_cipher.active_key_id)
        return len(updates)

    # -- reads ---------------------------------------------------------------------------------------------------

    def list_subjects(
        self, watchlist: str | None = None, limit: int = 100, after: str | None = None
    ) -> list[SubjectRecord]:
        """Subjects ordered by id, at most ``limit``, starting after the id ``after`` (keyset pagination)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        conditions, params = [], []
        if watchlist:
            conditions.append(
                "EXISTS (SELECT 1 FROM watchlist_members m WHERE m.subject_id = s.subject_id AND m.watchlist = ?)"
            )
            params.append(watchlist)
        if after is not None:
            conditions.append("s.subject_id > ?")
            params.append(after)
        with self._tx(write=False) as cur:
            return self._subjects(cur, conditions, params, min(limit, MAX_PAGE_SIZE))

    def get_subject(self, subject_id: str) -> SubjectRecord | None:
        with self._tx(write=False) as cur:
            found = self._subjects(cur, ["s.subject_id = ?"], [subject_id], 1)
        return found[0] if found else None

    def load_templates(
        self, model_name: str | None = None, model_version: str | None = None
    ) -> list[TemplateRecord]:
        """Every template, decrypted, ordered by id; optionally only those of one model (name and/or version)."""
        conditions, params = [], []
        for column, value in (("model_name", model_name), ("model_version", model_version)):
            if value is not None:
                conditions.append(f"{column} = ?")
                params.append(value)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._tx(write=False) as cur:
            rows = cur.execute(
                "SELECT id, subject_id, key_id, ciphertext, model_name, model_version, quality FROM templates"
                + where
                + " ORDER BY id",
                params,
            ).fetchall()
            members = self._memberships(cur, None)
        # Decrypt outside the lock so a big gallery load does not stall other calls.
        return [
            TemplateRecord(
                template_id=int(template_id),
                subject_id=subject_id,
                vector=_decrypt(self._cipher, template_id, key_id, blob, subject_id),
                watchlists=members.get(subject_id, ()),
                model_name=name,
                model_version=version,
                quality=float(quality),
            )
            for template_id, subject_id, key_id, blob, name, version, quality in rows
        ]

    def version(self) -> int:
        """Gallery change counter: grows with every enrolment, membership change and deletion, on any replica."""
        with self._tx(write=False) as cur:
            return int(cur.execute("SELECT version FROM gallery_state WHERE id = 1").fetchone()[0])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------------------

    @contextmanager
    def _tx(self, write: bool) -> Iterator[_Cursor]:
        if self._closed:
            raise GalleryStoreError("gallery store is closed")
        with self._backend.transaction(write) as cursor:
            yield cursor

    def _now(self) -> Any:
        return self._backend.dialect.to_db_time(datetime.now(UTC))

    @staticmethod
    def _bump_version(cur: _Cursor) -> None:
        cur.execute("UPDATE gallery_state SET version = version + 1 WHERE id = 1")

    def _migrate(self) -> None:
        dialect = self._backend.dialect
        latest = MIGRATIONS[-1].version
        with self._tx(write=True) as cur:
            if dialect.migration_lock:
                cur.execute(dialect.migration_lock)
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                " description TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            current = int(cur.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)
            if current > latest:
                raise GalleryStoreError(
                    f"gallery schema version {current} is newer than this build supports ({latest}); upgrade Sightline"
                )
            for migration in MIGRATIONS:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    cur.execute(statement.format(**dialect.types))
                cur.execute(
                    "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.description, datetime.now(UTC).isoformat()),
                )
                logger.info("gallery schema migrated to version %d: %s", migration.version, migration.description)

    def _subjects(self, cur: _Cursor, conditions: list[str], params: list[Any], limit: int) -> list[SubjectRecord]:
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = cur.execute(
            "SELECT s.subject_id, s.display_name, s.created_at,"
            " (SELECT COUNT(*) FROM templates t WHERE t.subject_id = s.subject_id)"
            f" FROM subjects s{where} ORDER BY s.subject_id LIMIT ?",
            [*params, limit],
        ).fetchall()
        members = self._memberships(cur, [row[0] for row in rows])
        return [
            SubjectRecord(
                subject_id=subject_id,
                display_name=display_name,
                watchlists=members.get(subject_id, ()),
                template_count=int(count),
                created_at=self._backend.dialect.from_db_time(created_at),
            )
            for subject_id, display_name, created_at, count in rows
        ]

    @staticmethod
    def _memberships(cur: _Cursor, subject_ids: list[str] | None) -> dict[str, tuple[str, ...]]:
        """Watchlists per subject, sorted; for the given subjects, or all subjects when None."""
        if subject_ids is not None and not subject_ids:
            return {}
        statement = "SELECT subject_id, watchlist FROM watchlist_members"
        if subject_ids is not None:
            statement += f" WHERE subject_id IN ({', '.join('?' * len(subject_ids))})"
        found: dict[str, list[str]] = {}
        for subject_id, watchlist in cur.execute(statement + " ORDER BY subject_id, watchlist", subject_ids or ()).fetchall():
            found.setdefault(subject_id, []).append(watchlist)
        return {subject_id: tuple(names) for subject_id, names in found.items()}


def _decrypt(cipher: TemplateCipher, template_id: int, key_id: str, blob: bytes, subject_id: str) -> np.ndarray:
    try:
        return cipher.decrypt(key_id, blob, subject_id)
    except UnknownKeyError as error:
        error.add_note(f"while decrypting template {template_id}")
        raise
    except TemplateDecryptionError as error:
        raise TemplateDecryptionError(f"template {template_id}: {error}") from None


def _check_id(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{what} must be a non-empty string of at most {MAX_ID_LENGTH} characters")
