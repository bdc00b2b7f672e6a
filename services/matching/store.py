"""Gallery storage: enrolled subjects, their encrypted templates, watchlists and their memberships, in SQLite or
PostgreSQL.

SQLite (``sqlite:///gallery.db``) serves a single node or a laptop; PostgreSQL (``postgresql://user@host:5432/db``)
lets several matching replicas share one gallery. Each replica keeps its own in-memory index and follows the change
log: every enrolment, deletion and watchlist change bumps ``version()`` and logs, in the same transaction, the
subjects it touched (``gallery_changes``), so a replica reads again just those subjects (``changes_since``,
``templates_of``) instead of reloading the gallery. The log is pruned by age (``prune_changes``); a replica older
than what is left reloads whole.

A watchlist (``watchlists`` table) has a purpose, an owner, optionally its own threshold as a target false match rate,
and a default membership duration. A membership may expire (``expires_at``): from then on it is left out of every
read that feeds matching (``load_templates``, ``memberships``, subject listings) without anything being written, so
``next_expiry`` tells a replica when to look again and ``expired_between`` which subjects to read again. Expired
memberships stay listable until removed.

Every write method takes an ``audit`` hook: the audit records of the write (``AuditEntry``), made from its result
and put in the audit outbox in the same transaction (``audit_outbox.py``), so that a write and its records commit or
roll back together; ``record_audit`` puts records of a call that wrote nothing.

Templates are stored only as ciphertext (see ``templates.py``); this module decrypts them for ``load_templates``
and never logs them. The schema is created and upgraded on open from ``MIGRATIONS``, a list later changes append
to. The SQL is written once, with ``?`` placeholders and ``{type}`` names filled in by the dialect shim shared by
every store (``common/sqlstore.py``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import numpy as np

from sightline.common.sqlstore import Backend as _Backend
from sightline.common.sqlstore import (
    BackendStore,
    Migration,
    StoreError,
    open_backend,
    redact_url,  # noqa: F401 - part of this module's API (tests, callers)
)
from sightline.common.sqlstore import Cursor as _Cursor
from sightline.matching import audit_outbox
from sightline.matching.audit_outbox import AuditEntry, OutboxState
from sightline.matching.templates import TemplateCipher, TemplateDecryptionError, UnknownKeyError

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
MAX_ID_LENGTH = 256
MAX_TEXT_LENGTH = 1000  # purpose and owner of a watchlist
# Any constant will do: it only has to be the same for every replica migrating the same database.
_PG_MIGRATION_LOCK = 0x5167_6C6C

R = TypeVar("R")
AuditHook = Callable[[R], Sequence[AuditEntry]]  # a write's result -> its audit records, committed with it


class GalleryStoreError(StoreError):
    """The gallery database cannot be opened or used (bad URL, unreachable, schema newer than this build)."""


class UnknownSubjectError(KeyError):
    """A template or membership was added for a subject that is not enrolled."""

    def __str__(self) -> str:
        return f"subject {self.args[0]!r} is not enrolled; add_subject first"


class UnknownWatchlistError(KeyError):
    """A watchlist that does not exist was named."""

    def __str__(self) -> str:
        return f"watchlist {self.args[0]!r} does not exist"


class WatchlistExistsError(ValueError):
    """A watchlist was created under a name already taken."""


@dataclass(frozen=True)
class SubjectRecord:
    subject_id: str
    display_name: str
    watchlists: tuple[str, ...]  # current (unexpired) memberships
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


@dataclass(frozen=True)
class WatchlistRecord:
    name: str
    purpose: str
    owner: str
    target_fmr: float | None  # None: the decision policy's threshold applies
    default_membership_days: int  # 0: memberships without an explicit expiry never expire
    created_at: datetime
    member_count: int  # current (unexpired) members


@dataclass(frozen=True)
class MembershipRecord:
    subject_id: str
    watchlist: str
    added_at: datetime
    expires_at: datetime | None

    def expired(self, at: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= at


@dataclass(frozen=True)
class Enrolment:
    """What ``enrol_subject`` changed."""

    created: bool  # the subject is new
    watchlists_created: tuple[str, ...]  # lists that did not exist and were created for this enrolment
    templates_added: int = 0


@dataclass(frozen=True)
class SubjectRemoval:
    """What removing a subject took away."""

    existed: bool
    templates_removed: int
    watchlists: tuple[str, ...]  # every membership it had, expired ones included


@dataclass(frozen=True)
class MembershipState:
    """Current memberships as of one instant, and the next instant at which one of them expires."""

    watchlists: dict[str, tuple[str, ...]]  # subject id -> its current lists, sorted
    next_expiry: datetime | None


@dataclass(frozen=True)
class GalleryChanges:
    """What the change log says happened after a version: the subjects to read again, and whether lists changed.

    ``complete`` is False when the log no longer reaches back to that version (pruned, or written before the log
    existed): the reader must load everything instead."""

    since: int
    until: int  # the last version covered (== since: nothing new)
    subject_ids: frozenset[str]
    lists_changed: bool
    complete: bool
    removed_templates: frozenset[int] = frozenset()  # templates of subjects removed (deleted or erased)


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
    Migration(
        2,
        "watchlists with purpose, owner, threshold and default membership duration; membership expiry",
        (
            "CREATE TABLE watchlists (name {key} PRIMARY KEY, purpose TEXT NOT NULL DEFAULT '',"
            " owner TEXT NOT NULL DEFAULT '', target_fmr DOUBLE PRECISION,"
            " default_membership_days INTEGER NOT NULL DEFAULT 0, created_at {timestamp} NOT NULL)",
            "ALTER TABLE watchlist_members ADD COLUMN expires_at {timestamp}",
            "CREATE INDEX watchlist_members_expiry_idx ON watchlist_members (expires_at)",
            # Lists that so far existed only as names on memberships get a row without a purpose, so that
            # `sightline watchlists list` shows they still need one.
            "INSERT INTO watchlists (name, created_at)"
            " SELECT watchlist, MIN(created_at) FROM watchlist_members GROUP BY watchlist",
        ),
    ),
    Migration(
        3,
        "gallery change log: the subjects each version touched, for replicas to follow without reloading",
        (
            # A row names a subject that changed, or (subject_id NULL) lists the templates of a removed subject, whose
            # id is kept nowhere once it is gone (erasure), or neither: a change of the lists themselves.
            "CREATE TABLE gallery_changes (version {bigint} NOT NULL, subject_id {key}, removed_templates TEXT,"
            " created_at {timestamp} NOT NULL)",
            "CREATE INDEX gallery_changes_version_idx ON gallery_changes (version)",
            "CREATE INDEX gallery_changes_created_idx ON gallery_changes (created_at)",
            # Set once, on first use (``gallery_id``): tells this gallery's snapshots apart from any other's.
            "ALTER TABLE gallery_state ADD COLUMN gallery_id TEXT",
        ),
    ),
    Migration(
        4,
        "audit outbox: the audit records of each write, committed with it, until relayed to the audit log",
        audit_outbox.MIGRATION_STATEMENTS,
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
        store._migrated(MIGRATIONS, "schema_version", _PG_MIGRATION_LOCK, "gallery")
        logger.info("gallery store open at %s (schema version %d)", store._backend.description, store.schema_version)
        return store

    @property
    def cipher(self) -> TemplateCipher:
        return self._cipher

    @property
    def gallery_id(self) -> str:
        """A random id this database got when first used: what binds index snapshots to it."""
        with self._tx(write=True) as cur:
            cur.execute(
                "UPDATE gallery_state SET gallery_id = ? WHERE id = 1 AND gallery_id IS NULL", (uuid.uuid4().hex,)
            )
            return str(cur.execute("SELECT gallery_id FROM gallery_state WHERE id = 1").fetchone()[0])

    @property
    def description(self) -> str:
        """Where the gallery is, password redacted."""
        return self._backend.description

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._backend.dialect.name

    @property
    def schema_version(self) -> int:
        with self._tx(write=False) as cur:
            return int(cur.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)

    # -- writes: subjects and templates --------------------------------------------------------------------------

    def add_subject(
        self,
        subject_id: str,
        display_name: str = "",
        watchlists: Sequence[str] = (),
        expires_at: datetime | None = None,
    ) -> bool:
        """Enrols the subject if new and adds it to ``watchlists``; returns True if the subject was created."""
        return self.enrol_subject(subject_id, display_name, watchlists, expires_at).created

    def enrol_subject(
        self,
        subject_id: str,
        display_name: str = "",
        watchlists: Sequence[str] = (),
        expires_at: datetime | None = None,
        owner: str = "",
        templates: Sequence[tuple[np.ndarray, float]] = (),
        model: tuple[str, str] = ("", ""),
        audit: AuditHook[Enrolment] | None = None,
    ) -> Enrolment:
        """Enrols the subject if new, puts it on ``watchlists`` as ``add_members`` does, and stores ``templates``
        ((descriptor, quality) of ``model``: name, version), all in one transaction.

        Idempotent but for the templates. A non-empty ``display_name`` replaces the stored one. A watchlist that does
        not exist is created on the way (no purpose yet, ``owner`` as its owner): enrolling is how most lists come to
        exist.
        """
        _check_id("subject id", subject_id)
        names = sorted(set(watchlists))
        for name in names:
            _check_id("watchlist name", name)
        blobs = [(*self._cipher.encrypt(vector, subject_id), quality) for vector, quality in templates]  # no lock
        now = _utcnow()
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO subjects (subject_id, display_name, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (subject_id) DO NOTHING",
                (subject_id, display_name, self._db_time(now)),
            )
            created = changed = cur.rowcount == 1
            if not created and display_name:
                cur.execute(
                    "UPDATE subjects SET display_name = ? WHERE subject_id = ? AND display_name <> ?",
                    (display_name, subject_id, display_name),
                )
                changed = changed or cur.rowcount > 0
            lists_created = tuple(name for name in names if self._create_watchlist_if_missing(cur, name, owner, now))
            for name in names:
                changed = self._put_member(cur, name, subject_id, expires_at, now) or changed
            for key_id, blob, quality in blobs:
                self._insert_template(cur, subject_id, key_id, blob, model, quality)
            if changed or lists_created or blobs:
                self._bump_version(cur, [subject_id])
            enrolment = Enrolment(created, lists_created, len(blobs))
            self._audited(cur, audit, enrolment)
        return enrolment

    def add_template(
        self, subject_id: str, vector: np.ndarray, model_name: str, model_version: str, quality: float = 0.0
    ) -> int:
        """Encrypts and stores one template of an enrolled subject; returns its id."""
        key_id, blob = self._cipher.encrypt(vector, subject_id)
        with self._tx(write=True) as cur:
            if cur.execute("SELECT 1 FROM subjects WHERE subject_id = ?", (subject_id,)).fetchone() is None:
                raise UnknownSubjectError(subject_id)
            template_id = self._insert_template(cur, subject_id, key_id, blob, (model_name, model_version), quality)
            self._bump_version(cur, [subject_id])
        return template_id

    def delete_subject(self, subject_id: str) -> int:
        """Deletes the subject, its templates and memberships; returns templates removed (0 if unknown)."""
        return self.remove_subject(subject_id).templates_removed

    def remove_subject(self, subject_id: str, audit: AuditHook[SubjectRemoval] | None = None) -> SubjectRemoval:
        """Deletes the subject, its templates and every membership (expired ones too), saying what was removed."""
        with self._tx(write=True) as cur:
            if cur.execute("SELECT 1 FROM subjects WHERE subject_id = ?", (subject_id,)).fetchone() is None:
                nothing = SubjectRemoval(False, 0, ())
                self._audited(cur, audit, nothing)
                return nothing
            watchlists = tuple(
                row[0]
                for row in cur.execute(
                    "SELECT watchlist FROM watchlist_members WHERE subject_id = ? ORDER BY watchlist", (subject_id,)
                ).fetchall()
            )
            # Explicit deletes rather than relying on ON DELETE CASCADE, which SQLite only honours per connection.
            template_ids = [
                int(row[0])
                for row in cur.execute("SELECT id FROM templates WHERE subject_id = ?", (subject_id,)).fetchall()
            ]
            removed = cur.execute("DELETE FROM templates WHERE subject_id = ?", (subject_id,)).rowcount
            cur.execute("DELETE FROM watchlist_members WHERE subject_id = ?", (subject_id,))
            cur.execute("DELETE FROM subjects WHERE subject_id = ?", (subject_id,))
            # The log forgets the id too (secure_delete overwrites it in SQLite); replicas find the subject in their
            # index by its templates.
            cur.execute("UPDATE gallery_changes SET subject_id = NULL WHERE subject_id = ?", (subject_id,))
            self._bump_version(cur, removed_templates=template_ids)
            removal = SubjectRemoval(True, removed, watchlists)
            self._audited(cur, audit, removal)
        logger.info("deleted a subject, %d templates and %d memberships", removed, len(watchlists))
        return removal

    def rotate_keys(self, new_cipher: TemplateCipher, progress: Callable[[int, int], None] | None = None) -> int:
        """Re-encrypts every template not yet under ``new_cipher``'s active key; returns how many it re-encrypted.

        Old blobs are read with the current cipher, or with ``new_cipher`` for key ids only it holds. One
        transaction: on any error nothing changes. ``progress(done, total)`` is called as templates are done.
        Afterwards this store encrypts with ``new_cipher``. Running it again re-encrypts only templates written
        with an old key in the meantime (by a replica not yet given the new key).
        """
        with self._tx(write=True) as cur:
            rows = cur.execute(
                "SELECT id, subject_id, key_id, ciphertext FROM templates WHERE key_id <> ? ORDER BY id"
                + self._backend.dialect.for_update,
                (new_cipher.active_key_id,),
            ).fetchall()
            updates = []
            for done, (template_id, subject_id, key_id, blob) in enumerate(rows, start=1):
                reader = self._cipher if self._cipher.has_key(key_id) else new_cipher
                vector = _decrypt(reader, template_id, key_id, blob, subject_id)
                new_key_id, new_blob = new_cipher.encrypt(vector, subject_id)
                updates.append((new_key_id, new_blob, template_id))
                if progress is not None:
                    progress(done, len(rows))
            cur.executemany("UPDATE templates SET key_id = ?, ciphertext = ? WHERE id = ?", updates)
        self._cipher = new_cipher
        logger.info("re-encrypted %d templates with key id %r", len(updates), new_cipher.active_key_id)
        return len(updates)

    # -- writes: watchlists and memberships ----------------------------------------------------------------------

    def create_watchlist(
        self,
        name: str,
        purpose: str = "",
        owner: str = "",
        target_fmr: float | None = None,
        default_membership_days: int = 0,
        audit: AuditHook[WatchlistRecord] | None = None,
    ) -> WatchlistRecord:
        """Creates a list; WatchlistExistsError when the name is taken."""
        _check_id("watchlist name", name)
        fields = _watchlist_fields(purpose, owner, target_fmr, default_membership_days)
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO watchlists (name, purpose, owner, target_fmr, default_membership_days, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (name, *fields, self._now()),
            )
            if cur.rowcount != 1:
                raise WatchlistExistsError(f"watchlist {name!r} already exists")
            self._bump_version(cur)
            return self._audited(cur, audit, self._watchlists(cur, name)[0])

    def update_watchlist(
        self,
        name: str,
        purpose: str,
        owner: str,
        target_fmr: float | None,
        default_membership_days: int,
        audit: AuditHook[WatchlistRecord] | None = None,
    ) -> WatchlistRecord:
        """Replaces a list's purpose, owner, threshold and default duration; UnknownWatchlistError if none."""
        fields = _watchlist_fields(purpose, owner, target_fmr, default_membership_days)
        with self._tx(write=True) as cur:
            cur.execute(
                "UPDATE watchlists SET purpose = ?, owner = ?, target_fmr = ?, default_membership_days = ?"
                " WHERE name = ?",
                (*fields, name),
            )
            if cur.rowcount != 1:
                raise UnknownWatchlistError(name)
            self._bump_version(cur)
            return self._audited(cur, audit, self._watchlists(cur, name)[0])

    def delete_watchlist(self, name: str, audit: AuditHook[int | None] | None = None) -> int | None:
        """Deletes a list and its memberships (the subjects stay enrolled); memberships removed, None if no list."""
        with self._tx(write=True) as cur:
            if not self._watchlist_exists(cur, name):
                return self._audited(cur, audit, None)
            members = [
                row[0]
                for row in cur.execute(
                    "SELECT subject_id FROM watchlist_members WHERE watchlist = ?", (name,)
                ).fetchall()
            ]
            removed = cur.execute("DELETE FROM watchlist_members WHERE watchlist = ?", (name,)).rowcount
            cur.execute("DELETE FROM watchlists WHERE name = ?", (name,))
            self._bump_version(cur, members)
            return self._audited(cur, audit, int(removed))

    def add_members(
        self,
        watchlist: str,
        subject_ids: Sequence[str],
        expires_at: datetime | None = None,
        audit: AuditHook[list[MembershipRecord]] | None = None,
    ) -> list[MembershipRecord]:
        """Puts enrolled subjects on an existing list, or renews their membership; returns the memberships.

        The membership ends at ``expires_at``, else after the list's default duration, else never. Raises
        UnknownWatchlistError or UnknownSubjectError (naming the first unknown subject), changing nothing.
        """
        ids = list(dict.fromkeys(subject_ids))
        now = _utcnow()
        with self._tx(write=True) as cur:
            if not self._watchlist_exists(cur, watchlist):
                raise UnknownWatchlistError(watchlist)
            known = self._existing_subjects(cur, ids)
            missing = [subject_id for subject_id in ids if subject_id not in known]
            if missing:
                raise UnknownSubjectError(missing[0])
            changed = [
                subject_id for subject_id in ids if self._put_member(cur, watchlist, subject_id, expires_at, now)
            ]
            if changed:
                self._bump_version(cur, changed)
            return self._audited(cur, audit, self._members(cur, watchlist, ids))

    def remove_members(
        self, watchlist: str, subject_ids: Sequence[str], audit: AuditHook[list[str]] | None = None
    ) -> list[str]:
        """Takes subjects off a list; returns those that were on it. UnknownWatchlistError if there is no list."""
        removed = []
        with self._tx(write=True) as cur:
            if not self._watchlist_exists(cur, watchlist):
                raise UnknownWatchlistError(watchlist)
            for subject_id in dict.fromkeys(subject_ids):
                cur.execute(
                    "DELETE FROM watchlist_members WHERE watchlist = ? AND subject_id = ?", (watchlist, subject_id)
                )
                if cur.rowcount == 1:
                    removed.append(subject_id)
            if removed:
                self._bump_version(cur, removed)
            return self._audited(cur, audit, removed)

    # -- the audit outbox ----------------------------------------------------------------------------------------

    def record_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Puts the audit records of a call that wrote nothing (an enrolment with no usable image, an erasure notice's
        outcome) in the outbox, in order with those of the writes."""
        with self._tx(write=True) as cur:
            audit_outbox.put(cur, entries, self._now())

    def audit_outbox(self, limit: int = 100) -> OutboxState:
        """The oldest ``limit`` records waiting in the outbox, and how many wait in all (``audit_outbox.py``)."""
        with self._tx(write=False) as cur:
            return audit_outbox.pending(cur, limit, self._from_db_time)

    def remove_audit_outbox(self, ids: Sequence[int]) -> None:
        """Deletes outbox rows the audit log holds now (an erased subject's id goes with them: secure_delete)."""
        with self._tx(write=True) as cur:
            audit_outbox.remove(cur, ids)

    # -- reads ---------------------------------------------------------------------------------------------------

    def list_subjects(
        self, watchlist: str | None = None, limit: int = 100, after: str | None = None
    ) -> list[SubjectRecord]:
        """Subjects ordered by id, at most ``limit``, starting after the id ``after`` (keyset pagination).

        With ``watchlist``, only the list's current (unexpired) members.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        now = self._db_time(_utcnow())
        conditions: list[str] = []
        params: list[Any] = []
        if watchlist:
            conditions.append(
                "EXISTS (SELECT 1 FROM watchlist_members m WHERE m.subject_id = s.subject_id AND m.watchlist = ?"
                " AND (m.expires_at IS NULL OR m.expires_at > ?))"
            )
            params.extend((watchlist, now))
        if after is not None:
            conditions.append("s.subject_id > ?")
            params.append(after)
        with self._tx(write=False) as cur:
            return self._subjects(cur, conditions, params, min(limit, MAX_PAGE_SIZE))

    def subject_ids(self) -> set[str]:
        """Every enrolled subject's id: what a replica checks its index against without decrypting anything."""
        with self._tx(write=False) as cur:
            return {str(row[0]) for row in cur.execute("SELECT subject_id FROM subjects").fetchall()}

    def get_subject(self, subject_id: str) -> SubjectRecord | None:
        with self._tx(write=False) as cur:
            found = self._subjects(cur, ["s.subject_id = ?"], [subject_id], 1)
        return found[0] if found else None

    def load_templates(
        self,
        model_name: str | None = None,
        model_version: str | None = None,
        at: datetime | None = None,
        subjects: Callable[[str], bool] | None = None,
    ) -> list[TemplateRecord]:
        """Every template, decrypted, ordered by id, with the subject's memberships current ``at`` (default now);
        optionally only those of one model (name and/or version), and only of the subjects ``subjects`` accepts
        (the others are not decrypted: a shard's load)."""
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
            members = self._current_memberships(cur, None, at or _utcnow())
        if subjects is not None:
            rows = [row for row in rows if subjects(row[1])]
        # Decrypt outside the lock so a big gallery load does not stall other calls.
        return self._records(rows, members)

    def templates_of(self, subject_ids: Sequence[str]) -> list[TemplateRecord]:
        """The templates of these subjects, decrypted, with their current memberships; none for a subject that is
        not enrolled (or has no template)."""
        rows: list[tuple[Any, ...]] = []
        members: dict[str, tuple[str, ...]] = {}
        with self._tx(write=False) as cur:
            for chunk in _chunks(list(dict.fromkeys(subject_ids))):
                rows.extend(
                    cur.execute(
                        "SELECT id, subject_id, key_id, ciphertext, model_name, model_version, quality FROM templates"
                        f" WHERE subject_id IN ({', '.join('?' * len(chunk))}) ORDER BY id",
                        chunk,
                    ).fetchall()
                )
                members.update(self._current_memberships(cur, chunk, _utcnow()))
        return self._records(rows, members)

    def current_watchlists(self, subject_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """The unexpired lists of each of these subjects (a subject on none is left out)."""
        found: dict[str, tuple[str, ...]] = {}
        with self._tx(write=False) as cur:
            for chunk in _chunks(list(dict.fromkeys(subject_ids))):
                found.update(self._current_memberships(cur, chunk, _utcnow()))
        return found

    def expired_between(self, since: datetime, until: datetime) -> set[str]:
        """Subjects with a membership that expired after ``since`` and at or before ``until``."""
        with self._tx(write=False) as cur:
            rows = cur.execute(
                "SELECT DISTINCT subject_id FROM watchlist_members WHERE expires_at > ? AND expires_at <= ?",
                (self._db_time(since), self._db_time(until)),
            ).fetchall()
        return {str(row[0]) for row in rows}

    def next_expiry(self, after: datetime | None = None) -> datetime | None:
        """When the next membership expires after ``after`` (default now); None when none will."""
        with self._tx(write=False) as cur:
            row = cur.execute(
                "SELECT MIN(expires_at) FROM watchlist_members WHERE expires_at > ?",
                (self._db_time(after or _utcnow()),),
            ).fetchone()
        return self._from_db_time(row[0]) if row and row[0] is not None else None

    def changes_since(self, version: int, limit: int = 10_000) -> GalleryChanges:
        """What the change log holds after ``version``, for at most ``limit`` versions (call again to go on)."""
        with self._tx(write=False) as cur:
            current = int(cur.execute("SELECT version FROM gallery_state WHERE id = 1").fetchone()[0])
            rows = cur.execute(
                "SELECT version, subject_id, removed_templates FROM gallery_changes"
                " WHERE version > ? AND version <= ? ORDER BY version",
                (version, version + limit),
            ).fetchall()
        until = min(current, version + limit)
        versions = {int(row[0]) for row in rows}
        # Each write logs at least one row; a version past the database's is from another (or a restored) gallery.
        complete = version <= current and versions == set(range(version + 1, until + 1))
        return GalleryChanges(
            since=version,
            until=until if complete else version,
            subject_ids=frozenset(str(row[1]) for row in rows if row[1] is not None),
            lists_changed=any(row[1] is None and row[2] is None for row in rows),
            complete=complete,
            removed_templates=frozenset(int(t) for row in rows if row[2] for t in str(row[2]).split(",")),
        )

    def prune_changes(self, before: datetime) -> int:
        """Deletes the change log's rows written before ``before``; returns how many. A replica whose version is
        older than what is left loads everything again."""
        with self._tx(write=True) as cur:
            return int(
                cur.execute("DELETE FROM gallery_changes WHERE created_at < ?", (self._db_time(before),)).rowcount
            )

    def _records(self, rows: Sequence[tuple[Any, ...]], members: dict[str, tuple[str, ...]]) -> list[TemplateRecord]:
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

    def memberships(self, at: datetime | None = None) -> MembershipState:
        """Every subject's current lists as of ``at`` (default now), and when the next of them expires."""
        at = at or _utcnow()
        with self._tx(write=False) as cur:
            current = self._current_memberships(cur, None, at)
            row = cur.execute(
                "SELECT MIN(expires_at) FROM watchlist_members WHERE expires_at > ?", (self._db_time(at),)
            ).fetchone()
        next_expiry = self._from_db_time(row[0]) if row and row[0] is not None else None
        return MembershipState(current, next_expiry)

    def get_watchlist(self, name: str) -> WatchlistRecord | None:
        with self._tx(write=False) as cur:
            found = self._watchlists(cur, name)
        return found[0] if found else None

    def watchlist_targets(self) -> dict[str, float | None]:
        """Each list's target FMR (None: it sets none): what matching needs of the lists, without counting members."""
        with self._tx(write=False) as cur:
            rows = cur.execute("SELECT name, target_fmr FROM watchlists").fetchall()
        return {str(name): None if fmr is None else float(fmr) for name, fmr in rows}

    def list_watchlists(self) -> list[WatchlistRecord]:
        """Every list, by name."""
        with self._tx(write=False) as cur:
            return self._watchlists(cur, None)

    def list_members(
        self, watchlist: str, include_expired: bool = False, limit: int = 100, after: str | None = None
    ) -> list[MembershipRecord]:
        """A list's memberships by subject id, at most ``limit``, after the subject id ``after``; current ones only
        unless ``include_expired``. UnknownWatchlistError if there is no such list."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        conditions, params = ["watchlist = ?"], [watchlist]
        if not include_expired:
            conditions.append("(expires_at IS NULL OR expires_at > ?)")
            params.append(self._db_time(_utcnow()))
        if after is not None:
            conditions.append("subject_id > ?")
            params.append(after)
        with self._tx(write=False) as cur:
            if not self._watchlist_exists(cur, watchlist):
                raise UnknownWatchlistError(watchlist)
            rows = cur.execute(
                "SELECT subject_id, watchlist, created_at, expires_at FROM watchlist_members"
                f" WHERE {' AND '.join(conditions)} ORDER BY subject_id LIMIT ?",
                [*params, min(limit, MAX_PAGE_SIZE)],
            ).fetchall()
        return [self._membership(row) for row in rows]

    def template_key_counts(self) -> dict[str, int]:
        """How many templates each key id encrypts (for key rotation)."""
        with self._tx(write=False) as cur:
            rows = cur.execute("SELECT key_id, COUNT(*) FROM templates GROUP BY key_id ORDER BY key_id").fetchall()
        return {key_id: int(count) for key_id, count in rows}

    def version(self) -> int:
        """Gallery change counter: grows with every enrolment, membership change and deletion, on any replica."""
        with self._tx(write=False) as cur:
            return int(cur.execute("SELECT version FROM gallery_state WHERE id = 1").fetchone()[0])

    # -- internals -----------------------------------------------------------------------------------------------

    def _audited(self, cur: _Cursor, audit: AuditHook[R] | None, result: R) -> R:
        """``result``, after putting its audit records in the outbox, in the write's transaction: a record that
        cannot go in (refused by ``AuditEntry``) rolls the write back."""
        if audit is not None:
            audit_outbox.put(cur, audit(result), self._now())
        return result

    def _insert_template(
        self, cur: _Cursor, subject_id: str, key_id: str, blob: bytes, model: tuple[str, str], quality: float
    ) -> int:
        row = cur.execute(
            "INSERT INTO templates (subject_id, key_id, ciphertext, model_name, model_version, quality,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (subject_id, key_id, blob, model[0], model[1], float(quality), self._now()),
        ).fetchone()
        return int(row[0])

    def _bump_version(
        self, cur: _Cursor, subject_ids: Sequence[str] = (), removed_templates: Sequence[int] | None = None
    ) -> None:
        """One new version, logged with the subjects it touched, or the templates of a subject it removed (one row
        of neither when it touched no subject). The row lock on gallery_state orders writers, so versions commit in
        order and the log has no holes."""
        row = cur.execute("UPDATE gallery_state SET version = version + 1 WHERE id = 1 RETURNING version").fetchone()
        version, now = int(row[0]), self._now()
        rows: list[tuple[int, str | None, str | None, Any]] = [
            (version, subject_id, None, now) for subject_id in dict.fromkeys(subject_ids)
        ]
        if removed_templates is not None:
            rows.append((version, None, ",".join(str(t) for t in removed_templates), now))
        cur.executemany(
            "INSERT INTO gallery_changes (version, subject_id, removed_templates, created_at) VALUES (?, ?, ?, ?)",
            rows or [(version, None, None, now)],
        )

    def _db_time(self, value: datetime) -> Any:
        # Always UTC: SQLite compares the stored text, which orders correctly only within one offset.
        return self._backend.dialect.to_db_time(value.astimezone(UTC))

    def _from_db_time(self, value: Any) -> datetime:
        return self._backend.dialect.from_db_time(value)

    @staticmethod
    def _watchlist_exists(cur: _Cursor, name: str) -> bool:
        return cur.execute("SELECT 1 FROM watchlists WHERE name = ?", (name,)).fetchone() is not None

    @staticmethod
    def _existing_subjects(cur: _Cursor, subject_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(subject_ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = subject_ids[start : start + 500]
            statement = f"SELECT subject_id FROM subjects WHERE subject_id IN ({', '.join('?' * len(chunk))})"
            found.update(row[0] for row in cur.execute(statement, chunk).fetchall())
        return found

    def _create_watchlist_if_missing(self, cur: _Cursor, name: str, owner: str, now: datetime) -> bool:
        cur.execute(
            "INSERT INTO watchlists (name, owner, created_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (name, owner[:MAX_TEXT_LENGTH], self._db_time(now)),
        )
        return cur.rowcount == 1

    def _put_member(
        self, cur: _Cursor, watchlist: str, subject_id: str, expires_at: datetime | None, now: datetime
    ) -> bool:
        """Adds or renews one membership; True when something changed. A lapsed membership starts afresh."""
        if expires_at is None:
            days = int(
                cur.execute("SELECT default_membership_days FROM watchlists WHERE name = ?", (watchlist,)).fetchone()[0]
            )
            expires_at = now + timedelta(days=days) if days else None
        new_expiry = self._db_time(expires_at) if expires_at is not None else None
        row = cur.execute(
            "SELECT expires_at FROM watchlist_members WHERE subject_id = ? AND watchlist = ?", (subject_id, watchlist)
        ).fetchone()
        if row is None:
            cur.execute(
                "INSERT INTO watchlist_members (subject_id, watchlist, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (subject_id, watchlist, self._db_time(now), new_expiry),
            )
            return True
        old_expiry = None if row[0] is None else self._from_db_time(row[0])
        lapsed = old_expiry is not None and old_expiry <= now
        if not lapsed and old_expiry == expires_at:
            return False
        added = ", created_at = ?" if lapsed else ""
        cur.execute(
            f"UPDATE watchlist_members SET expires_at = ?{added} WHERE subject_id = ? AND watchlist = ?",
            (new_expiry, *((self._db_time(now),) if lapsed else ()), subject_id, watchlist),
        )
        return True

    def _subjects(self, cur: _Cursor, conditions: list[str], params: list[Any], limit: int) -> list[SubjectRecord]:
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = cur.execute(
            "SELECT s.subject_id, s.display_name, s.created_at,"
            " (SELECT COUNT(*) FROM templates t WHERE t.subject_id = s.subject_id)"
            f" FROM subjects s{where} ORDER BY s.subject_id LIMIT ?",
            [*params, limit],
        ).fetchall()
        members = self._current_memberships(cur, [row[0] for row in rows], _utcnow())
        return [
            SubjectRecord(
                subject_id=subject_id,
                display_name=display_name,
                watchlists=members.get(subject_id, ()),
                template_count=int(count),
                created_at=self._from_db_time(created_at),
            )
            for subject_id, display_name, created_at, count in rows
        ]

    def _current_memberships(
        self, cur: _Cursor, subject_ids: list[str] | None, at: datetime
    ) -> dict[str, tuple[str, ...]]:
        """Unexpired watchlists per subject, sorted; for the given subjects, or all subjects when None."""
        if subject_ids is not None and not subject_ids:
            return {}
        statement = "SELECT subject_id, watchlist FROM watchlist_members WHERE (expires_at IS NULL OR expires_at > ?)"
        params: list[Any] = [self._db_time(at)]
        if subject_ids is not None:
            statement += f" AND subject_id IN ({', '.join('?' * len(subject_ids))})"
            params.extend(subject_ids)
        found: dict[str, list[str]] = {}
        for subject_id, watchlist in cur.execute(statement + " ORDER BY subject_id, watchlist", params).fetchall():
            found.setdefault(subject_id, []).append(watchlist)
        return {subject_id: tuple(names) for subject_id, names in found.items()}

    def _watchlists(self, cur: _Cursor, name: str | None) -> list[WatchlistRecord]:
        where, params = (" WHERE w.name = ?", [name]) if name is not None else ("", [])
        rows = cur.execute(
            "SELECT w.name, w.purpose, w.owner, w.target_fmr, w.default_membership_days, w.created_at,"
            " (SELECT COUNT(*) FROM watchlist_members m WHERE m.watchlist = w.name"
            "  AND (m.expires_at IS NULL OR m.expires_at > ?))"
            f" FROM watchlists w{where} ORDER BY w.name",
            [self._db_time(_utcnow()), *params],
        ).fetchall()
        return [
            WatchlistRecord(
                name,
                purpose,
                owner,
                None if fmr is None else float(fmr),
                int(days),
                self._from_db_time(created_at),
                int(count),
            )
            for name, purpose, owner, fmr, days, created_at, count in rows
        ]

    def _members(self, cur: _Cursor, watchlist: str, subject_ids: list[str]) -> list[MembershipRecord]:
        rows = []
        for subject_id in subject_ids:
            rows.extend(
                cur.execute(
                    "SELECT subject_id, watchlist, created_at, expires_at FROM watchlist_members"
                    " WHERE watchlist = ? AND subject_id = ?",
                    (watchlist, subject_id),
                ).fetchall()
            )
        return [self._membership(row) for row in rows]

    def _membership(self, row: tuple[Any, ...]) -> MembershipRecord:
        subject_id, watchlist, added_at, expires_at = row
        return MembershipRecord(
            subject_id,
            watchlist,
            self._from_db_time(added_at),
            None if expires_at is None else self._from_db_time(expires_at),
        )


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _chunks(items: list[str], size: int = 500) -> list[list[str]]:
    """Slices small enough for SQLite's bound-parameter limit."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def _watchlist_fields(
    purpose: str, owner: str, target_fmr: float | None, default_membership_days: int
) -> tuple[str, str, float | None, int]:
    for what, text in (("purpose", purpose), ("owner", owner)):
        if not isinstance(text, str) or len(text) > MAX_TEXT_LENGTH:
            raise ValueError(f"watchlist {what} must be a string of at most {MAX_TEXT_LENGTH} characters")
    if target_fmr is not None and not 0 < target_fmr < 1:
        raise ValueError(f"target FMR must be in (0, 1), got {target_fmr:g}")
    if not isinstance(default_membership_days, int) or default_membership_days < 0:
        raise ValueError(f"default membership days must be a whole number >= 0, got {default_membership_days!r}")
    return purpose, owner, target_fmr, default_membership_days


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
