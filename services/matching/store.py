"""Gallery storage: enrolled subjects, their encrypted templates and watchlist membership, in SQLite or PostgreSQL.

SQLite (``sqlite:///gallery.db``) serves a single node or a laptop; PostgreSQL (``postgresql://user@host:5432/db``)
lets several matching replicas share one gallery. Each replica keeps its own in-memory ``SearchIndex`` and polls
``version()``, a counter every enrolment and deletion bumps in the same transaction, to see that another replica
changed the gallery.

Templates are stored only as ciphertext (see ``templates.py``); this module decrypts them for ``load_templates``
and never logs them. The schema is created and upgraded on open from ``MIGRATIONS``, a list later changes append
to. The SQL is written once, with ``?`` placeholders and ``{type}`` names filled in by the dialect shim shared by
every store (``common/sqlstore.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from sightline.common.sqlstore import Backend as _Backend
from sightline.common.sqlstore import Cursor as _Cursor
from sightline.common.sqlstore import BackendStore, Migration, StoreError, open_backend
from sightline.common.sqlstore import redact_url  # noqa: F401 - part of this module's API (tests, callers)
from sightline.matching.templates import TemplateCipher, TemplateDecryptionError, UnknownKeyError

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
MAX_ID_LENGTH = 256
# Any constant will do: it only has to be the same for every replica migrating the same database.
_PG_MIGRATION_LOCK = 0x5167_6C6C


class GalleryStoreError(StoreError):
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


def _open_backend(url: str) -> _Backend:
    return open_backend(url, what="gallery", application_name="sightline-matching", error=GalleryStoreError)


# -- the store ---------------------------------------------------------------------------------------------------


class GalleryStore(BackendStore):
    """Subjects, encrypted templates and watchlists; thread-safe (one lock around one connection)."""

    closed_error = GalleryStoreError
    what = "gallery store"

    def __init__(self, backend: _Backend, cipher: TemplateCipher) -> None:
        super().__init__(backend)
        self._cipher = cipher

    @classmethod
    def open(cls, url: str, cipher: TemplateCipher) -> GalleryStore:
        """Opens the gallery at ``url``, creating or upgrading the schema."""
        store = cls(_open_backend(url), cipher)
        try:
            store._migrate(MIGRATIONS, "schema_version", _PG_MIGRATION_LOCK, "gallery")
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

    # -- internals -----------------------------------------------------------------------------------------------

    @staticmethod
    def _bump_version(cur: _Cursor) -> None:
        cur.execute("UPDATE gallery_state SET version = version + 1 WHERE id = 1")


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
