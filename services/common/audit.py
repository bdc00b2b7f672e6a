"""The audit trail: who did what, when, for what purpose, with what result; append-only, hash-chained, authenticated.

Every enrolment, deletion, search (stream searches included), alert, review action and erasure appends one
``AuditRecord`` through ``AuditLog.append``. Records live in SQLite or PostgreSQL (the same URLs as every other
store, see ``sqlstore.py``) and are protected twice:

- **Prevention.** Database triggers refuse UPDATE, DELETE (and, on PostgreSQL, TRUNCATE) of ``audit_records``, and
  refuse moving the chain head anywhere but one step forward. Someone with the rights to drop a trigger can still
  edit, which is why there is a second line:
- **Detection.** Each record's hash is the SHA-256 of the previous record's hash and a canonical serialisation of
  the record (``canonical_bytes``), so any edit, insertion or removal breaks the chain from that record on. Each
  record also carries an HMAC-SHA256 of the same bytes (previous hash included) under a key the database never holds
  (``audit_keys.py``), with that key's id: someone who edits the database and recomputes every hash still cannot
  make the MACs match. Cutting off the newest records leaves a chain that verifies; signed checkpoints of the head on
  the audit topic (``audit_checkpoints.py``) catch that. ``AuditLog.verify`` (``sightline audit verify``, with
  ``--against-topic`` for the checkpoints) recomputes it all and names the first broken record.

Appends are serialised per chain: one lock per process around one connection, and in the database the chain-head row
is read ``FOR UPDATE`` on PostgreSQL (``BEGIN IMMEDIATE`` on SQLite), so several replicas may append to one chain.
An append may carry an idempotency key, under which the log appends at most one record (matching's audit outbox
relays each gallery write's record under its outbox id, ``matching/audit_outbox.py``).
There is one chain for the whole system: matching (gallery and watchlist actions, stream searches, erasures) and
decision (alerts, reviews) append to the same log, at ``SIGHTLINE_AUDIT_DATABASE_URL`` (``AuditSettings``, opened
by ``AuditLog.open_configured``). Every service audits the calls its access control refuses there too; capture,
detection and embedding only when the URL is configured (``AuditLog.open_if_configured``).

Each record can also be published (a copy, for a SIEM or an archive) to ``sightline.audit.v1``, next to the
checkpoints; the database is the reference. Records never hold images, face chips or descriptors: ``details`` takes
short scalar values only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, cast

import grpc
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from sightline.common import paths
from sightline.common.audit_checkpoints import (
    CHECKPOINT_TOPIC_KEY,
    EVENT_HEADER,
    EVENT_NAME,
    TIME_FORMAT,
    AuditCheckpointSettings,
    Checkpoint,
    Checkpointer,
    CheckpointSink,
)
from sightline.common.audit_keys import AuditKeyError, AuditKeyring
from sightline.common.auth import current_caller
from sightline.common.config import SightlineSettings
from sightline.common.rpc import InvalidInput, rpc_errors
from sightline.common.sqlstore import (
    MAX_DB_INTEGER,
    Backend,
    BackendStore,
    Cursor,
    Migration,
    StoreError,
    open_backend,
)
from sightline.v1 import audit_pb2_grpc

if TYPE_CHECKING:
    from sightline.v1 import audit_pb2

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
ANONYMOUS = "anonymous"  # the principal of a call that carried no credentials (or none that could be verified)
AUDIT_TOPIC_KEY = b"sightline-audit"  # one key: the whole chain lands on one partition, in order
MAX_DETAIL_CHARS = 1024
MAX_FIELD_CHARS = 512
VERIFY_BATCH = 1000
_PG_MIGRATION_LOCK = 0x4175_6469  # "Audi"; the same for every replica migrating the audit tables
LEGACY_DETAIL = "legacy_until"  # in the first authenticated record of an upgraded chain: the legacy records before it
_RECORD_MAC_DOMAIN = b"sightline.audit.record.v1\n"  # a record MAC can never be mistaken for a checkpoint's


class AuditError(StoreError):
    """The audit log cannot be opened or written."""


class AuditSettings(SightlineSettings):
    """Where the audit chain lives (``SIGHTLINE_AUDIT_*``): one database that every service appends to."""

    config_section: ClassVar[str] = "audit"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_AUDIT_", extra="ignore")

    database_url: SecretStr = Field(
        default_factory=lambda: SecretStr(paths.default_sqlite_url("audit.db")),
        description="The audit log, one hash chain for the system: sqlite:///PATH (default <run dir>/audit.db, for "
        "services on one machine) or postgresql://USER@HOST/DB. Give every service the same URL. Matching and "
        "decision always keep it; capture, detection and embedding audit refused calls only when it is set.",
    )

    legacy_until: int = Field(
        0,
        ge=0,
        description="Records up to this sequence may carry no MAC: those written before record "
        "authentication, on a chain upgraded in place (services log the number at the upgrade). 0: every record "
        "must carry one. Later records always must, so the first of them vouches for those before it.",
    )

    @property
    def configured(self) -> bool:
        """Whether the URL was given (environment, secret file or config file), not just defaulted."""
        return "database_url" in self.model_fields_set


class Action(StrEnum):
    """What was done; the names match ``sightline.v1.AuditAction`` without its prefix."""

    ENROL = "ENROL"
    DELETE = "DELETE"
    SEARCH = "SEARCH"
    VERIFY = "VERIFY"
    STREAM_SEARCH = "STREAM_SEARCH"
    ALERT = "ALERT"
    REVIEW = "REVIEW"
    ERASE = "ERASE"
    ACCESS_DENIED = "ACCESS_DENIED"
    WATCHLIST = "WATCHLIST"  # a list created, changed or deleted; a subject put on or taken off a list


@dataclass(frozen=True)
class AuditRecord:
    sequence: int
    at: datetime
    principal: str
    action: str
    subject_id: str
    purpose: str
    result: str
    details: dict[str, str]
    prev_hash: str
    hash: str
    key_id: str = ""  # the audit key its MAC was made with; "" for a record older than record authentication
    mac: str = ""

    def canonical(self) -> bytes:
        return canonical_bytes(
            self.sequence,
            self.at,
            self.principal,
            self.action,
            self.subject_id,
            self.purpose,
            self.result,
            self.details,
        )

    def to_proto(self) -> Any:
        from sightline.v1 import audit_pb2

        record = audit_pb2.AuditRecord(
            sequence=self.sequence,
            principal=self.principal,
            subject_id=self.subject_id,
            purpose=self.purpose,
            result=self.result,
            details=self.details,
            prev_hash=self.prev_hash,
            hash=self.hash,
            action=_proto_action(self.action),
        )
        record.at.FromDatetime(self.at)
        return record


def _proto_action(action: str) -> audit_pb2.AuditAction:
    """The ``AuditAction`` number of an action (every ``Action`` has one: tests/unit/test_audit.py checks)."""
    from sightline.v1 import audit_pb2

    # protoc's stubs type the field as the enum class, Value() as a plain int: both are that int at run time.
    return cast("audit_pb2.AuditAction", audit_pb2.AuditAction.Value(f"AUDIT_ACTION_{action}"))


@dataclass(frozen=True)
class ChainReport:
    """The outcome of ``AuditLog.verify``: intact, or the first broken record and why."""

    intact: bool
    records_checked: int
    first_broken_sequence: int | None
    reason: str
    head_sequence: int
    head_hash: str
    legacy_records: int = 0  # records without a MAC accepted under legacy_until (written before authentication)
    legacy_vouched: bool = False  # whether an authenticated record follows them, so a MAC covers their hashes


def format_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def canonical_bytes(
    sequence: int,
    at: datetime,
    principal: str,
    action: str,
    subject_id: str,
    purpose: str,
    result: str,
    details: Mapping[str, str],
) -> bytes:
    """The bytes a record's hash covers: compact JSON with sorted keys, UTF-8. Changing this breaks every chain."""
    document = {
        "sequence": sequence,
        "at": format_time(at),
        "principal": principal,
        "action": action,
        "subject_id": subject_id,
        "purpose": purpose,
        "result": result,
        "details": dict(details),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + canonical).hexdigest()


def mac_bytes(key_id: str, prev_hash: str, canonical: bytes) -> bytes:
    """What a record's MAC covers: the key id (so a record cannot be moved under another key), the previous hash
    (so it cannot be moved in the chain) and its canonical bytes."""
    return _RECORD_MAC_DOMAIN + key_id.encode("ascii") + b"\n" + prev_hash.encode("ascii") + b"\n" + canonical


def clean_details(details: Mapping[str, Any] | None) -> dict[str, str]:
    """Details as short strings. Bytes, sequences and long values are refused: that is where face data would hide."""
    cleaned: dict[str, str] = {}
    for key, value in (details or {}).items():
        if not isinstance(key, str) or not key or len(key) > 64:
            raise ValueError(f"audit detail keys must be short non-empty strings, got {key!r}")
        if value is None:
            continue
        if not isinstance(value, str | int | float | bool):
            raise ValueError(f"audit detail {key!r} must be a string or a number, not {type(value).__name__}")
        text = str(value)
        if len(text) > MAX_DETAIL_CHARS:
            raise ValueError(f"audit detail {key!r} is longer than {MAX_DETAIL_CHARS} characters")
        cleaned[key] = text
    return cleaned


def _check_field(name: str, value: str, required: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS or (required and not value):
        raise ValueError(
            f"audit {name} must be a{' non-empty' if required else ''} string of at most {MAX_FIELD_CHARS} characters"
        )
    return value


# -- schema ------------------------------------------------------------------------------------------------------

_APPEND_ONLY = "audit records are append-only"
_HEAD_FORWARD = "the audit chain head only moves one record forward"

MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "append-only, hash-chained audit records and the chain head",
        (
            "CREATE TABLE audit_records (sequence {bigint} PRIMARY KEY, at TEXT NOT NULL, principal TEXT NOT NULL,"
            " action TEXT NOT NULL, subject_id {key} NOT NULL, purpose TEXT NOT NULL, result TEXT NOT NULL,"
            " details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
            "CREATE INDEX audit_records_subject_idx ON audit_records (subject_id, sequence)",
            "CREATE INDEX audit_records_principal_idx ON audit_records (principal, sequence)",
            "CREATE TABLE audit_chain_head (id INTEGER PRIMARY KEY CHECK (id = 1), sequence {bigint} NOT NULL,"
            " hash TEXT NOT NULL)",
            f"INSERT INTO audit_chain_head (id, sequence, hash) VALUES (1, 0, '{GENESIS_HASH}')",
        ),
        by_dialect={
            "sqlite": (
                "CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records"
                f" BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END",
                "CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records"
                f" BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END",
                "CREATE TRIGGER audit_chain_head_forward BEFORE UPDATE ON audit_chain_head"
                f" WHEN NEW.sequence <> OLD.sequence + 1 BEGIN SELECT RAISE(ABORT, '{_HEAD_FORWARD}'); END",
                "CREATE TRIGGER audit_chain_head_no_delete BEFORE DELETE ON audit_chain_head"
                f" BEGIN SELECT RAISE(ABORT, '{_HEAD_FORWARD}'); END",
            ),
            "postgresql": (
                "CREATE OR REPLACE FUNCTION sightline_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$"
                f" BEGIN RAISE EXCEPTION '{_APPEND_ONLY}: % refused', TG_OP; END $$",
                "CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records"
                " FOR EACH ROW EXECUTE FUNCTION sightline_audit_append_only()",
                "CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records"
                " FOR EACH STATEMENT EXECUTE FUNCTION sightline_audit_append_only()",
                "CREATE OR REPLACE FUNCTION sightline_audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF TG_OP <> 'UPDATE' OR NEW.sequence <> OLD.sequence + 1 THEN"
                f" RAISE EXCEPTION '{_HEAD_FORWARD}'; END IF; RETURN NEW; END $$",
                "CREATE TRIGGER audit_chain_head_forward BEFORE UPDATE OR DELETE ON audit_chain_head"
                " FOR EACH ROW EXECUTE FUNCTION sightline_audit_head_forward()",
            ),
        },
    ),
    # ADD COLUMN fires no UPDATE trigger; existing records keep "" (no MAC), see AuditSettings.legacy_until.
    Migration(
        2,
        "record authentication: the key id and HMAC-SHA256 of each record",
        (
            "ALTER TABLE audit_records ADD COLUMN key_id TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE audit_records ADD COLUMN mac TEXT NOT NULL DEFAULT ''",
        ),
    ),
    # Not covered by the hash: a lookup key only (the writer puts what it must prove in the details). NULL for every
    # record appended without one, which a UNIQUE index allows any number of.
    Migration(
        3,
        "idempotent appends: a writer's stable id for a record, appended at most once",
        (
            "ALTER TABLE audit_records ADD COLUMN idempotency_key TEXT",
            "CREATE UNIQUE INDEX audit_records_idempotency_idx ON audit_records (idempotency_key)",
        ),
    ),
]

_COLUMNS = "sequence, at, principal, action, subject_id, purpose, result, details, prev_hash, hash, key_id, mac"
_LEGACY_COLUMNS = _COLUMNS.replace("key_id, mac", "'' AS key_id, '' AS mac")  # schema version 1: no MAC columns


# -- the log -----------------------------------------------------------------------------------------------------


class AuditLog(BackendStore):
    """Append and read audit records, and verify their chain; thread-safe (one lock around one connection).

    ``publish`` gets a copy of each record; when it is also a ``CheckpointSink`` (``audit_topic_publisher``), this
    log publishes signed checkpoints of what it appended there too."""

    closed_error = AuditError
    what = "audit log"

    def __init__(
        self,
        backend: Backend,
        keyring: AuditKeyring | None,
        publish: Callable[[AuditRecord], None] | None = None,
        checkpoints: AuditCheckpointSettings | None = None,
        legacy_until: int = 0,
    ) -> None:
        super().__init__(backend)
        self._keyring, self._publish, self.legacy_until = keyring, publish, legacy_until
        self._chain: str | None = None
        self._legacy_boundary: int | None = None  # a writer upgrading a legacy chain: its last record without MAC
        self._columns = _COLUMNS  # a reader of a log older than record authentication selects '' for the MAC
        self._checkpointer: Checkpointer | None = None
        # As an object: mypy cannot narrow a Callable to a protocol and would skip the branch as unreachable.
        sink: object = publish
        if keyring is not None and isinstance(sink, CheckpointSink):
            self._checkpointer = Checkpointer(
                keyring, sink, self._chain_for_checkpoint, checkpoints or AuditCheckpointSettings()
            )

    @classmethod
    def open(
        cls,
        url: str,
        publish: Callable[[AuditRecord], None] | None = None,
        create: bool = True,
        keyring: AuditKeyring | None = None,
        checkpoints: AuditCheckpointSettings | None = None,
        legacy_until: int = 0,
    ) -> AuditLog:
        """The audit log at ``url``, creating or upgrading its tables; with ``create=False`` they must exist.

        ``keyring`` defaults to the configured one (``AuditKeyring.configured``). With ``create`` (a writer) it is
        required: a PostgreSQL log refuses to open without one, a SQLite log gets its local keyring (made when
        missing). Without (a reader), a missing keyring leaves the log readable but unable to append or verify, and a
        log older than record authentication is read as it is (its records carry no MAC)."""
        if keyring is None:  # first: a bad keyring opens no connection
            keyring = AuditKeyring.configured(url) if create else _keyring_if_configured(url)
        backend = open_backend(url, what="audit", application_name="sightline-audit", error=AuditError)
        audit = cls(backend, keyring, publish, checkpoints, legacy_until)
        try:
            if create:
                first_upgrade = not audit._has_mac_columns()  # no MAC column yet: no MAC'd record was ever written
                audit._migrate(MIGRATIONS, "audit_schema_version", _PG_MIGRATION_LOCK, "audit")
                audit._check_unauthenticated_head(first_upgrade)
            else:
                audit._require_tables()
        except BaseException:
            audit.close()
            raise
        return audit

    @classmethod
    def open_configured(
        cls, publish: Callable[[AuditRecord], None] | None = None, settings: AuditSettings | None = None
    ) -> AuditLog:
        """The system's one audit log, where ``SIGHTLINE_AUDIT_DATABASE_URL`` says (``AuditSettings``), with the
        configured keyring (``AuditKeySettings``) and checkpoint schedule (``AuditCheckpointSettings``)."""
        settings = settings or AuditSettings()
        return cls.open(settings.database_url.get_secret_value(), publish, legacy_until=settings.legacy_until)

    @classmethod
    def open_if_configured(
        cls, publish: Callable[[AuditRecord], None] | None = None, settings: AuditSettings | None = None
    ) -> AuditLog | None:
        """The system's audit log when ``SIGHTLINE_AUDIT_DATABASE_URL`` is set; None when it is not, so that a service
        without a trail of its own (capture, detection, embedding) never starts a private chain nobody reads."""
        settings = settings or AuditSettings()
        return cls.open_configured(publish, settings) if settings.configured else None

    @property
    def description(self) -> str:
        """Where the log is, password redacted."""
        return self._backend.description

    def append(
        self,
        principal: str,
        action: Action | str,
        subject_id: str = "",
        purpose: str = "",
        result: str = "ok",
        details: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> AuditRecord:
        """Append one record (its sequence and hash are assigned here) and hand it to the publisher.

        ``idempotency_key``: the writer's stable id for this record (an outbox row's, say). A record already appended
        under it is returned instead, and nothing is appended or published: a writer that crashed after appending
        and before noting it did may simply append again."""
        action = Action(action)  # an unknown action is a programming error: ValueError
        fields = (
            _check_field("principal", principal, required=True),
            _check_field("subject id", subject_id),
            _check_field("purpose", purpose),
            _check_field("result", result),
        )
        cleaned = clean_details(details)
        if LEGACY_DETAIL in cleaned:
            raise ValueError(f"audit detail {LEGACY_DETAIL!r} is reserved: the log records the legacy boundary itself")
        if idempotency_key is not None:
            _check_field("idempotency key", idempotency_key, required=True)
        with self._tx(write=True) as cur:
            record, appended = self._append(cur, action.value, *fields, cleaned, idempotency_key)
        if not appended:
            return record
        self._legacy_boundary = None  # recorded (or another writer appended first): only the first record says it
        if self._checkpointer is not None:
            self._checkpointer.appended(record.sequence, record.hash)
        if self._publish is not None:
            try:
                self._publish(record)
            except Exception:
                log.warning("could not publish audit record", exc_info=True, extra={"sequence": record.sequence})
        return record

    def records(
        self,
        after: int = 0,
        limit: int = 100,
        action: str | None = None,
        principal: str | None = None,
        subject_id: str | None = None,
    ) -> list[AuditRecord]:
        """Records with a sequence greater than ``after``, in order, at most ``limit``, optionally filtered."""
        conditions = ["sequence > ?"]
        params: list[object] = [int(after)]  # the sequence, then the filter values (text)
        for column, value in (("action", action), ("principal", principal), ("subject_id", subject_id)):
            if value:
                conditions.append(f"{column} = ?")
                params.append(value)
        with self._tx(write=False) as cur:
            rows = cur.execute(
                f"SELECT {self._columns} FROM audit_records WHERE {' AND '.join(conditions)} ORDER BY sequence LIMIT ?",
                [*params, max(1, min(int(limit), 10_000))],
            ).fetchall()
        return [_record(row) for row in rows]

    def head(self) -> tuple[int, str]:
        """(sequence, hash) of the last record: (0, GENESIS_HASH) for an empty log."""
        with self._tx(write=False) as cur:
            sequence, digest = cur.execute("SELECT sequence, hash FROM audit_chain_head WHERE id = 1").fetchone()
        return int(sequence), str(digest)

    def chain_id(self) -> str | None:
        """The hash of the first record, which names this chain on the audit topic; None while the log is empty."""
        if self._chain is None:
            with self._tx(write=False) as cur:
                row = cur.execute("SELECT hash FROM audit_records WHERE sequence = 1").fetchone()
            self._chain = str(row[0]) if row else None
        return self._chain

    def close(self) -> None:
        """Publish the last checkpoint (waiting for the broker), then close the database."""
        if self._checkpointer is not None and not self._closed:
            self._checkpointer.close()
        super().close()

    def verify(self, batch: int = VERIFY_BATCH, legacy_until: int | None = None) -> ChainReport:
        """Recompute the chain from the first record to the head as it stands when called; report the first record
        whose sequence, link, hash or MAC is wrong. Records appended meanwhile (a live log) are left to the next run.

        Records up to ``legacy_until`` (default: this log's) may carry no MAC, if they come first (written before
        record authentication); the first later record's MAC covers their hashes through its ``prev_hash``. They are
        counted in the report, which says whether a MAC vouches for them yet."""
        legacy_until = self.legacy_until if legacy_until is None else legacy_until
        keyring = self._require_keyring()
        head_sequence, head_hash = self.head()
        check = _MacCheck(keyring, legacy_until)

        def report(intact: bool, broken: int | None, reason: str) -> ChainReport:
            return ChainReport(intact, checked, broken, reason, head_sequence, head_hash, check.legacy, check.vouched)

        expected, prev_hash, checked, beyond = 1, GENESIS_HASH, 0, None
        for row in self._all_rows(batch):
            if row[0] > head_sequence:  # newer than the head read above: appended while this ran, or planted
                beyond = int(row[0])
                break
            broken_link = _check_row(row, expected, prev_hash)
            if broken_link:
                return report(False, *broken_link)
            broken, problem = check(row)
            if problem:
                return report(False, broken, problem + (self._legacy_hint() if check.unsigned_first else ""))
            checked, expected, prev_hash = checked + 1, expected + 1, row[9]
        if beyond is not None and beyond > self.head()[0]:
            return report(
                False,
                beyond,
                f"record {beyond} lies beyond the chain head: a record was added without going through the chain",
            )
        if (checked, prev_hash) != (head_sequence, head_hash):
            return report(
                False,
                checked + 1,
                f"the chain head names record {head_sequence} ({head_hash[:12]}), but "
                f"the records end at {checked} ({prev_hash[:12]}): records were removed from the end, or "
                "the head was changed",
            )
        return report(True, None, f"{checked} record(s), chain intact{check.summary()}")

    def legacy_records(self) -> tuple[int, int]:
        """(how many records carry no MAC, the highest sequence among them): a log from before record
        authentication, or one whose MACs were stripped."""
        if self._columns != _COLUMNS:  # schema version 1: every record
            sequence = self.head()[0]
            return sequence, sequence
        with self._tx(write=False) as cur:
            count, last = cur.execute("SELECT COUNT(*), MAX(sequence) FROM audit_records WHERE mac = ''").fetchone()
        return int(count), int(last or 0)

    # -- internals -----------------------------------------------------------------------------------------------

    def _append(
        self,
        cur: Cursor,
        action: str,
        principal: str,
        subject_id: str,
        purpose: str,
        result: str,
        details: dict[str, str],
        idempotency_key: str | None = None,
    ) -> tuple[AuditRecord, bool]:
        """The record appended, and True; or, for a key already appended, that record and False."""
        # The head row, locked: appends from every thread, process and replica take their turn here.
        sequence, prev_hash = cur.execute(
            "SELECT sequence, hash FROM audit_chain_head WHERE id = 1" + self._backend.dialect.for_update
        ).fetchone()
        if idempotency_key is not None:  # looked up under the head's lock: two writers of one key take turns
            row = cur.execute(
                f"SELECT {_COLUMNS} FROM audit_records WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            if row is not None:
                return _record(row), False
        if self._legacy_boundary is not None and int(sequence) == self._legacy_boundary:
            details = {**details, LEGACY_DETAIL: str(self._legacy_boundary)}  # the first MAC'd record vouches for it
        sequence, at = int(sequence) + 1, datetime.now(UTC)  # the time is taken in turn, so it never goes back
        canonical = canonical_bytes(sequence, at, principal, action, subject_id, purpose, result, details)
        keyring = self._require_keyring()
        digest, key_id = chain_hash(prev_hash, canonical), keyring.active_key_id
        mac = keyring.mac(key_id, mac_bytes(key_id, prev_hash, canonical))
        record = AuditRecord(
            sequence,
            parse_time(format_time(at)),
            principal,
            action,
            subject_id,
            purpose,
            result,
            details,
            prev_hash,
            digest,
            key_id,
            mac,
        )
        cur.execute(
            f"INSERT INTO audit_records ({_COLUMNS}, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sequence,
                format_time(at),
                principal,
                action,
                subject_id,
                purpose,
                result,
                _details_json(details),
                prev_hash,
                digest,
                key_id,
                mac,
                idempotency_key,
            ),
        )
        cur.execute("UPDATE audit_chain_head SET sequence = ?, hash = ? WHERE id = 1", (sequence, digest))
        return record, True

    def _all_rows(self, batch: int) -> Iterator[tuple[Any, ...]]:
        """Every row in sequence order, a page at a time, so a long chain is verified in bounded memory."""
        after = None
        while True:
            with self._tx(write=False) as cur:
                where = "" if after is None else " WHERE sequence > ?"
                rows = cur.execute(
                    f"SELECT {self._columns} FROM audit_records{where} ORDER BY sequence LIMIT ?",
                    ([] if after is None else [after]) + [batch],
                ).fetchall()
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1][0]

    def _require_keyring(self) -> AuditKeyring:
        if self._keyring is None:
            raise AuditKeyError(
                "no audit keyring: set SIGHTLINE_AUDIT_KEYS_FILE (or SIGHTLINE_AUDIT_KEYS) to the "
                "keyring the services sign with"
            )
        return self._keyring

    def _chain_for_checkpoint(self) -> str:
        chain = self.chain_id()
        assert chain is not None, "a checkpoint follows an append"
        return chain

    def _legacy_hint(self) -> str:
        """Why records lack a MAC, for a verify that stopped at one; never suggests a boundary above the recorded one
        (a forger who strips every MAC and rewrites the chain must not be told which flag makes it pass)."""
        count, last = self.legacy_records()
        if self._columns != _COLUMNS:
            return (
                f" (this log is older than record authentication: none of its {count} record(s) carries a MAC; "
                "the first writer to open it upgrades it, logs its legacy boundary and records it in the first "
                "authenticated record)"
            )
        recorded = self.recorded_legacy_boundary()
        if recorded is not None:
            boundary, at = recorded
            return (
                f" ({count} record(s) without MAC in this log; the upgrade recorded legacy_until={boundary} in "
                f"record {at}: verify with --legacy-until {boundary} / SIGHTLINE_AUDIT_LEGACY_UNTIL={boundary}, "
                "never a higher one)"
            )
        return (
            f" ({count} record(s) without MAC in this log, the last at {last}, and no authenticated record "
            "records a legacy boundary: give --legacy-until only the number logged when this log was upgraded to "
            "record authentication, never a higher one; records without MAC beyond it had their MACs stripped or "
            "were written without the audit key)"
        )

    def recorded_legacy_boundary(self) -> tuple[int, int] | None:
        """(legacy_until, the record holding it) as the first authenticated record recorded it when a writer upgraded
        a legacy chain; None when no record with a valid MAC records one (or there is no keyring to check it)."""
        if self._keyring is None or self._columns != _COLUMNS:
            return None
        with self._tx(write=False) as cur:
            row = cur.execute(
                f"SELECT {_COLUMNS} FROM audit_records WHERE mac <> '' ORDER BY sequence LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        try:
            if not self._keyring.matches(row[10], mac_bytes(row[10], row[8], _row_canonical(row)), row[11]):
                return None
            return int(json.loads(row[7])[LEGACY_DETAIL]), int(row[0])
        except (AuditKeyError, KeyError, ValueError, TypeError, UnicodeEncodeError):
            return None

    def _require_tables(self) -> None:
        try:
            self.head()
        except Exception as error:  # noqa: BLE001 - sqlite3 and psycopg raise different types for a missing table
            raise AuditError(f"no audit log at {self.description}: {error}") from None
        if not self._has_mac_columns():
            self._columns = _LEGACY_COLUMNS  # read it as it is: an auditor never upgrades a log (or a backup)
            log.warning(
                "the audit log %s is older than record authentication: none of its records carries a MAC",
                self.description,
            )

    def _has_mac_columns(self) -> bool:
        try:
            with self._tx(write=False) as cur:
                cur.execute("SELECT key_id, mac FROM audit_records WHERE sequence = 0").fetchall()
        except Exception:  # noqa: BLE001 - sqlite3 and psycopg raise different types for a missing column
            return False
        return True

    def _check_unauthenticated_head(self, first_upgrade: bool) -> None:
        """A writer's check of the newest record: one without a MAC beyond ``legacy_until`` refuses the log, unless
        this writer is upgrading a legacy chain to record authentication right now (``first_upgrade``: the log had no
        MAC column, so no MAC'd record was ever written), or one upgraded but not yet appended to whose records
        ``legacy_until`` covers. Then the next record appended records the boundary (``legacy_until`` in its
        details, covered by its MAC), and verify refuses a higher one."""
        sequence = self.head()[0]
        if sequence == 0:
            return
        with self._tx(write=False) as cur:
            row = cur.execute("SELECT key_id, mac FROM audit_records WHERE sequence = ?", (sequence,)).fetchone()
            if row is None or row[0] or row[1]:
                return  # a MAC'd head (verify checks it), or no head record at all (verify names that)
            (signed,) = cur.execute("SELECT COUNT(*) FROM audit_records WHERE key_id <> '' OR mac <> ''").fetchone()
        if first_upgrade or (not int(signed) and sequence <= self.legacy_until):
            self._legacy_boundary = sequence
            log.warning(
                "the audit log %s is upgraded to record authentication: its records 1..%d carry no MAC "
                "(written before it); the next record appended records legacy_until=%d. Note this number and "
                "verify with SIGHTLINE_AUDIT_LEGACY_UNTIL=%d (--legacy-until)",
                self.description,
                sequence,
                sequence,
                sequence,
                extra={"sequence": sequence},
            )
            return
        why = (
            "records before it do"
            if int(signed)
            else f"the log was upgraded to record authentication before and SIGHTLINE_AUDIT_LEGACY_UNTIL "
            f"({self.legacy_until}) does not cover it"
        )
        recorded = self.recorded_legacy_boundary()
        note = f"; the upgrade recorded legacy_until={recorded[0]} in record {recorded[1]}" if recorded else ""
        raise AuditError(
            f"refusing to append to the audit log {self.description}: its newest record ({sequence}) "
            f"carries no MAC, and {why}{note}. Its MACs were stripped (and the chain rewritten), or "
            "records were written without the audit key: check it with 'sightline audit verify "
            "--against-topic' and restore it from a backup. Set SIGHTLINE_AUDIT_LEGACY_UNTIL only to the "
            "number logged when this log was upgraded, never a higher one"
        )


def _keyring_if_configured(url: str) -> AuditKeyring | None:
    """A reader's keyring: the configured one, or None when there is none to read (listing needs no key)."""
    try:
        return AuditKeyring.configured(url, create=False)
    except AuditKeyError:
        return None


def _details_json(details: Mapping[str, str]) -> str:
    return json.dumps(dict(details), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _record(row: tuple[Any, ...]) -> AuditRecord:
    sequence, at, principal, action, subject_id, purpose, result, details, prev_hash, digest, key_id, mac = row
    return AuditRecord(
        int(sequence),
        parse_time(at),
        principal,
        action,
        subject_id,
        purpose,
        result,
        json.loads(details),
        prev_hash,
        digest,
        key_id,
        mac,
    )


def _row_canonical(row: tuple[Any, ...]) -> bytes:
    sequence, at, principal, action, subject_id, purpose, result, details = row[:8]
    return canonical_bytes(
        int(sequence), parse_time(at), principal, action, subject_id, purpose, result, json.loads(details)
    )


def _check_row(row: tuple[Any, ...], expected: int, prev_hash: str) -> tuple[int, str] | None:
    """(the first broken sequence, why) when this row breaks the hash chain; None when it continues it."""
    sequence, row_prev, digest = int(row[0]), row[8], row[9]
    if sequence != expected:
        return expected, f"record {expected} is missing (the next record is {sequence})"
    if row_prev != prev_hash:
        return sequence, f"record {sequence} does not link to record {expected - 1}: a record was changed"
    try:
        canonical = _row_canonical(row)
    except (ValueError, TypeError) as error:
        return sequence, f"record {sequence} cannot be read: {error}"
    if chain_hash(prev_hash, canonical) != digest:
        return sequence, f"record {sequence} does not match its hash: its content was changed"
    return None


class _MacCheck:
    """Checks each row's MAC in chain order (after ``_check_row`` has read it), and counts the legacy records: those
    without a MAC, allowed up to ``legacy_until`` and only before the first record that has one."""

    def __init__(self, keyring: AuditKeyring, legacy_until: int) -> None:
        self._keyring, self._legacy_until = keyring, legacy_until
        self.legacy, self.vouched = 0, False  # vouched: an authenticated record follows the legacy ones
        self.unsigned_first = False  # refused a record for carrying no MAC before any authenticated one

    def __call__(self, row: tuple[Any, ...]) -> tuple[int, str]:
        """(sequence, why) when this row's MAC is missing, unverifiable or wrong; (0, "") when it is right."""
        sequence, prev_hash, key_id, mac = int(row[0]), row[8], row[10], row[11]
        if not key_id and not mac:
            return self._unsigned(sequence)
        try:
            if self._keyring.matches(key_id, mac_bytes(key_id, prev_hash, _row_canonical(row)), mac):
                first, self.vouched = not self.vouched, True
                problem = self._recorded_boundary(sequence, row[7]) if first else ""
                return (sequence, problem) if problem else (0, "")
        except AuditKeyError as error:
            return sequence, f"record {sequence} cannot be authenticated: {error}"
        except (UnicodeEncodeError, ValueError, TypeError) as error:
            return sequence, f"record {sequence} cannot be read: {error}"
        return sequence, (
            f"record {sequence} does not match its MAC (key id {key_id!r}): it was changed, or forged "
            "by someone without the audit key"
        )

    def _recorded_boundary(self, sequence: int, details: str) -> str:
        """The first authenticated record of an upgraded chain records how many legacy records precede it: they must
        be exactly those, and the legacy_until given must not exceed it. "" when it holds (or nothing is recorded:
        a chain upgraded by a release that did not record it)."""
        value = json.loads(details).get(LEGACY_DETAIL)
        if value is None:
            return ""
        try:
            recorded = int(value)
        except ValueError:
            return f"record {sequence} records an unreadable legacy boundary"
        if recorded != sequence - 1:
            return (
                f"record {sequence} records {recorded} legacy record(s) before it, but follows {sequence - 1} "
                "records without MAC"
            )
        if self._legacy_until > recorded:
            return (
                f"the legacy_until given ({self._legacy_until}) is higher than the boundary the upgrade recorded "
                f"in record {sequence} ({recorded}): verify with --legacy-until {recorded} / "
                f"SIGHTLINE_AUDIT_LEGACY_UNTIL={recorded}"
            )
        return ""

    def _unsigned(self, sequence: int) -> tuple[int, str]:
        if self.vouched:  # legacy records only ever come first: this one lost its MAC after the upgrade
            return sequence, (
                f"record {sequence} carries no MAC, but records before it do: its MAC was stripped, "
                "or it was written without the audit key"
            )
        if sequence > self._legacy_until:
            self.unsigned_first = True  # a legacy log, or legacy_until too low: say how many records lack a MAC
            return sequence, (
                f"record {sequence} carries no MAC: it was written before record authentication, or "
                "without the audit key, or its MAC was stripped"
            )
        self.legacy += 1  # written before record authentication; a later record's MAC covers its hash
        return 0, ""

    def summary(self) -> str:
        if not self.legacy:
            return ", every record authenticated"
        covered = (
            "vouched for by the MAC of the record after them"
            if self.vouched
            else "NOT vouched for by any MAC yet: no authenticated record follows them"
        )
        return (
            f"; {self.legacy} legacy record(s) without MAC (1..{self.legacy}, before record authentication), {covered}"
        )


# -- principals, publishing, gRPC ---------------------------------------------------------------------------------


def principal_of(context: grpc.ServicerContext) -> str:
    """The authenticated principal of a gRPC call, or "" when there is none.

    The principal the server's access control verified for this call (a bearer token's, or a client certificate's;
    see ``auth.py``), never anything the client merely claims. "" when authentication is off, or not required and
    the caller sent no credentials.
    """
    caller = current_caller()  # set for the call by the server's access-control interceptor
    return caller.principal[:MAX_FIELD_CHARS] if caller is not None else ""


Headers = list[tuple[str, bytes]]


class TopicPublisher:
    """A kafka-python producer made on first use (a service starts even while Kafka is still coming up)."""

    def __init__(self, kafka: Any, timeout_s: float = 10.0) -> None:
        self._kafka = kafka
        self._timeout_s = timeout_s
        self._producer: Any = None
        self._closed = False
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._producer is None:
                from sightline.common.bus import make_producer

                self._producer = make_producer(self._kafka)
            return self._producer

    def send(self, topic: str, key: bytes, value: bytes, wait: bool = True, headers: Headers | None = None) -> None:
        """Send one record; with ``wait``, block until the broker acknowledged it (raises on failure)."""
        if self._closed:
            self._send_late(topic, key, value, headers)
            return
        future = self._get().send(topic, key=key, value=value, headers=headers)
        if wait:
            future.get(timeout=self._timeout_s)
        else:
            future.add_errback(lambda error: log.warning("could not publish to %s: %s", topic, error))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._producer is not None:
                self._producer.close(timeout=self._timeout_s)
                self._producer = None

    def _send_late(self, topic: str, key: bytes, value: bytes, headers: Headers | None) -> None:
        """A send after close (a service closes its publisher before its audit log, whose last checkpoint follows):
        a producer of its own, closed again at once, so that nothing is left open behind the closed publisher."""
        from sightline.common.bus import make_producer

        producer = make_producer(self._kafka)
        try:
            producer.send(topic, key=key, value=value, headers=headers).get(timeout=self._timeout_s)
        finally:
            producer.close(timeout=self._timeout_s)


class TopicAuditSink:
    """The ``publish`` of an AuditLog that copies each record to ``sightline.audit.v1`` without waiting, and
    publishes the log's signed checkpoints there (``CheckpointSink``), marked by their header."""

    def __init__(self, publisher: TopicPublisher) -> None:
        self._publisher = publisher

    def __call__(self, record: AuditRecord) -> None:
        from sightline.common.topics import AUDIT

        self._publisher.send(AUDIT.name, AUDIT_TOPIC_KEY, record.to_proto().SerializeToString(), wait=False)

    def checkpoint(self, checkpoint: Checkpoint, wait: bool) -> None:
        from sightline.common.topics import AUDIT

        self._publisher.send(
            AUDIT.name, CHECKPOINT_TOPIC_KEY, checkpoint.to_json(), wait=wait, headers=[(EVENT_HEADER, EVENT_NAME)]
        )


def audit_topic_publisher(publisher: TopicPublisher) -> TopicAuditSink:
    """The ``publish`` of an AuditLog on the audit topic: record copies and signed checkpoints."""
    return TopicAuditSink(publisher)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """``sightline.v1.AuditService``: list records and verify the chain over gRPC."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    @rpc_errors
    def ListAuditRecords(self, request: Any, context: grpc.ServicerContext) -> Any:
        from sightline.v1 import audit_pb2

        action = ""
        if request.action:
            if request.action not in audit_pb2.AuditAction.values():
                raise InvalidInput(f"unknown audit action {request.action}")
            action = audit_pb2.AuditAction.Name(request.action).removeprefix("AUDIT_ACTION_")
        if request.after_sequence > MAX_DB_INTEGER:
            raise InvalidInput(f"after_sequence {request.after_sequence} is past any record's sequence")
        limit = min(request.page_size or 100, 1000)
        records = self._audit.records(
            request.after_sequence, limit, action or None, request.principal or None, request.subject_id or None
        )
        reply = audit_pb2.ListAuditRecordsResponse(records=[r.to_proto() for r in records])
        if len(records) == limit:
            reply.next_after_sequence = records[-1].sequence
        return reply

    def VerifyChain(self, request: Any, context: grpc.ServicerContext) -> Any:
        from sightline.v1 import audit_pb2

        report = self._audit.verify()
        return audit_pb2.VerifyChainResponse(
            intact=report.intact,
            records_checked=report.records_checked,
            first_broken_sequence=report.first_broken_sequence or 0,
            reason=report.reason,
            head_sequence=report.head_sequence,
            head_hash=report.head_hash,
        )
