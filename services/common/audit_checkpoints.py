"""Signed checkpoints of the audit chain's head, published outside the database, and checking the database against them.

Record MACs stop a forger without the key from changing, inserting or renumbering records, but not from deleting the
newest ones: what is left still verifies. So every writer publishes a checkpoint (chain, sequence, head hash, time,
key id, HMAC) to ``sightline.audit.v1`` every ``SIGHTLINE_AUDIT_CHECKPOINT_EVERY`` records or
``SIGHTLINE_AUDIT_CHECKPOINT_INTERVAL_S`` seconds (whichever comes first, when there is something new) and on close.
``sightline audit verify --against-topic`` reads them back and checks that the database still holds, at each
checkpointed sequence, the record with the checkpointed hash: a rewritten record before a checkpoint, or a tail cut
off behind one, is found even by someone who recomputed every hash.

A chain is named by the hash of its first record (``chain``), so the two chains of a SQLite-mode Helm release (one
per pod) can share the topic. Checkpoints travel as JSON with the record header ``sightline-event: AuditCheckpoint``
and their own Kafka key, next to the ``AuditRecord`` copies; readers of the records skip them by that header.
Several processes appending to one chain each checkpoint the records they appended; all of them are one chain's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common.audit_keys import AuditKeyError, AuditKeyring
from sightline.common.config import SightlineSettings
from sightline.common.transient import Backoff

if TYPE_CHECKING:
    from sightline.common.audit import AuditLog
    from sightline.common.config import KafkaSettings

log = logging.getLogger(__name__)

EVENT_HEADER = "sightline-event"
EVENT_NAME = b"AuditCheckpoint"
CHECKPOINT_TOPIC_KEY = b"sightline-audit-checkpoint"
_DOMAIN = b"sightline.audit.checkpoint.v1\n"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # fixed width, so the stored text is the canonical text (records use it too)


class AuditCheckpointSettings(SightlineSettings):
    """How often audit writers checkpoint the chain head to the audit topic (``SIGHTLINE_AUDIT_CHECKPOINT_*``)."""

    config_section: ClassVar[str] = "audit"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_AUDIT_", extra="ignore")

    checkpoint_every: int = Field(100, ge=1, description="Publish a signed checkpoint after this many records.")
    checkpoint_interval_s: float = Field(
        60.0,
        gt=0,
        description="...or this many seconds after the first record not yet checkpointed, whichever "
        "comes first; and always when the log closes. Records after the last checkpoint can be cut off unnoticed.",
    )


@dataclass(frozen=True)
class Checkpoint:
    """The head of one chain at one moment, signed with the audit key."""

    chain: str  # the hash of the chain's first record
    sequence: int
    head_hash: str
    at: str  # UTC, fixed width
    key_id: str
    mac: str

    def signed_bytes(self) -> bytes:
        document = {
            "chain": self.chain,
            "sequence": self.sequence,
            "head_hash": self.head_hash,
            "at": self.at,
            "key_id": self.key_id,
        }
        return _DOMAIN + json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, value: bytes) -> Checkpoint:
        """Raises ValueError (or TypeError) for anything but a well-formed checkpoint."""
        document = json.loads(value)
        checkpoint = cls(
            str(document["chain"]),
            int(document["sequence"]),
            str(document["head_hash"]),
            str(document["at"]),
            str(document["key_id"]),
            str(document["mac"]),
        )
        datetime.strptime(checkpoint.at, TIME_FORMAT)
        return checkpoint


def sign_checkpoint(keyring: AuditKeyring, chain: str, sequence: int, head_hash: str) -> Checkpoint:
    at = datetime.now(UTC).strftime(TIME_FORMAT)
    unsigned = Checkpoint(chain, sequence, head_hash, at, keyring.active_key_id, "")
    return Checkpoint(
        chain, sequence, head_hash, at, unsigned.key_id, keyring.mac(unsigned.key_id, unsigned.signed_bytes())
    )


@runtime_checkable
class CheckpointSink(Protocol):
    """Where checkpoints go (the audit topic); ``wait``: block until the broker has it."""

    def checkpoint(self, checkpoint: Checkpoint, wait: bool) -> None: ...


class Checkpointer:
    """Publishes a checkpoint of the last record this process appended when one is due, and on close.

    Sends happen on the timer thread, waiting for the broker, never on an appending thread: the count trigger takes a
    snapshot of the head it reached and hands it over, in order. A send that fails is put back (keeping only the
    highest sequence due: one checkpoint of the newest head covers every record before it) and retried with
    ``Backoff``, so a broker outage delays the checkpoint of the newest records but never loses it while the process
    lives. ``close`` sends what is left, retrying for at most ``close_timeout_s``, and logs an error if it gives up."""

    def __init__(
        self,
        keyring: AuditKeyring,
        sink: CheckpointSink,
        chain_of: Callable[[], str],
        settings: AuditCheckpointSettings,
        backoff: Backoff | None = None,
        close_timeout_s: float = 5.0,
    ) -> None:
        self._keyring, self._sink, self._chain_of = keyring, sink, chain_of
        self._every, self._interval_s = settings.checkpoint_every, settings.checkpoint_interval_s
        self._backoff = backoff or Backoff(initial_s=0.1, max_s=min(10.0, self._interval_s))
        self._close_timeout_s = close_timeout_s
        self._lock = threading.Lock()  # guards the state below
        self._send_lock = threading.Lock()  # one send at a time (the timer's, or close's once the timer is gone)
        self._pending: tuple[int, str] | None = None  # (sequence, hash) appended here and not yet due
        self._due: list[tuple[int, str]] = []  # due to be sent, in sequence order
        self._queued = 0  # the highest sequence made due: an older one appended late needs no checkpoint
        self._count, self._since = 0, 0.0
        self._failures = 0  # consecutive failed sends
        self._stop, self._wake = threading.Event(), threading.Event()
        self._timer = threading.Thread(target=self._run, name="audit-checkpoints", daemon=True)
        self._timer.start()

    def appended(self, sequence: int, digest: str) -> None:
        """Note an appended record; when the count is reached, hand its checkpoint to the timer thread."""
        with self._lock:
            if sequence <= self._queued:
                return
            if self._pending is None or sequence > self._pending[0]:
                self._pending = (sequence, digest)
            if self._count == 0:
                self._since = time.monotonic()
            self._count += 1
            if self._count >= self._every:
                self._make_due()
        self._wake.set()

    def close(self) -> None:
        """Stop the timer and checkpoint what this process appended last, waiting for the broker (retrying for at
        most ``close_timeout_s``)."""
        deadline = time.monotonic() + self._close_timeout_s
        self._stop.set()
        self._wake.set()
        self._timer.join(timeout=self._close_timeout_s)
        with self._lock:
            self._make_due()
        attempt = 0
        while True:
            with self._lock:
                if not self._due:
                    return
                sequence = self._due[-1][0]
            if self._send_next():
                attempt = 0
                continue
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error(
                    "gave up publishing the audit checkpoint of record %d after %d failed attempt(s) on close: "
                    "records after the last published checkpoint can be cut off the database unnoticed until "
                    "a later writer checkpoints the chain",
                    sequence,
                    attempt,
                    extra={"sequence": sequence},
                )
                return
            time.sleep(min(remaining, self._backoff.delay(attempt)))

    def _run(self) -> None:
        retry_at = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            self._wake.wait(max(0.0, retry_at - now) if self._failures else min(self._interval_s, 1.0))
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._failures and time.monotonic() < retry_at:
                continue  # woken by an append while backing off: the retry waits its turn
            with self._lock:
                if self._pending is not None and time.monotonic() - self._since >= self._interval_s:
                    self._make_due()
            while not self._stop.is_set() and self._send_next():
                with self._lock:
                    if not self._due:
                        break
            if self._failures:
                retry_at = time.monotonic() + self._backoff.delay(self._failures)

    def _make_due(self) -> None:
        """Move the pending head to the sends due (holding ``_lock``)."""
        if self._pending is not None:
            self._due.append(self._pending)
            self._queued = self._pending[0]
        self._pending, self._count = None, 0

    def _send_next(self) -> bool:
        """Send the first checkpoint due, waiting for the broker: True when it went (or nothing was due); on failure
        put it back, keeping only the highest sequence due, and False."""
        with self._send_lock:
            with self._lock:
                if not self._due:
                    return True
                head = self._due.pop(0)
            try:
                self._sink.checkpoint(sign_checkpoint(self._keyring, self._chain_of(), *head), True)
            except Exception:
                with self._lock:
                    self._due = [max([head, *self._due])]
                    self._failures += 1
                    failures = self._failures
                if failures == 1:
                    log.warning(
                        "could not publish the audit checkpoint of record %d: retrying",
                        head[0],
                        exc_info=True,
                        extra={"sequence": head[0]},
                    )
                else:
                    log.debug("audit checkpoint retry %d failed", failures, exc_info=True)
                return False
            with self._lock:
                failures, self._failures = self._failures, 0
            if failures:
                log.info(
                    "published the audit checkpoint of record %d after %d failed attempt(s)",
                    head[0],
                    failures,
                    extra={"sequence": head[0]},
                )
            return True


# -- checking a database against the topic ------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointReport:
    """The outcome of ``check_against``: every checkpoint of this chain matches the database, or the first that does
    not and why."""

    intact: bool
    checkpoints_checked: int
    first_broken_sequence: int | None
    reason: str


def is_checkpoint(headers: Iterable[tuple[str, bytes]] | None) -> bool:
    return any(key == EVENT_HEADER and bytes(value) == EVENT_NAME for key, value in headers or ())


def read_checkpoints(kafka: KafkaSettings, idle_timeout_s: float = 2.0) -> tuple[list[Checkpoint], int]:
    """Every checkpoint on the audit topic, and how many checkpoint-headed records could not be read."""
    from sightline.common.bus import read_topics
    from sightline.common.topics import AUDIT

    found, malformed = [], 0
    for record in read_topics(kafka, [AUDIT.name], idle_timeout_s=idle_timeout_s):
        if not is_checkpoint(record.headers):
            continue
        try:
            found.append(Checkpoint.from_json(record.value))
        except (ValueError, TypeError, KeyError):
            malformed += 1
    return found, malformed


def check_against(
    audit: AuditLog, keyring: AuditKeyring, checkpoints: list[Checkpoint], malformed: int = 0
) -> CheckpointReport:
    """Check the database against the checkpoints. Read the checkpoints first: each was published after its record
    was committed, so a live log's newer records never make a checkpoint look ahead of the database."""
    chain = audit.chain_id()
    if chain is None:
        if checkpoints:
            return _broken(
                0,
                None,
                f"the database holds no record, but the topic holds {len(checkpoints)} "
                "checkpoint(s): the chain was emptied, or this is not the database they are of",
            )
        return CheckpointReport(True, 0, None, "no records and no checkpoints")
    mine = sorted((c for c in checkpoints if c.chain == chain), key=lambda c: c.sequence)
    if not mine:
        return _broken(
            0,
            1,
            f"no checkpoint of this chain (first record {chain[:12]}) on the topic "
            f"({len(checkpoints)} of other chains): its first record was rewritten, or no writer has "
            "published one yet",
        )
    head_sequence = audit.head()[0]
    for checked, checkpoint in enumerate(mine):
        problem = _check_one(audit, keyring, checkpoint, head_sequence)
        if problem:
            return _broken(checked, checkpoint.sequence, problem)
    last = mine[-1]
    note = f"; {malformed} unreadable checkpoint message(s) ignored" if malformed else ""
    if head_sequence > last.sequence:  # a live log, or records the next checkpoint will cover: say so, not "all"
        note += (
            f"; records {last.sequence + 1}..{head_sequence} are newer than the latest checkpoint (only the "
            "next one covers them)"
        )
    return CheckpointReport(
        True,
        len(mine),
        None,
        f"{len(mine)} checkpoint(s) match, the latest at record {last.sequence} ({last.at}){note}",
    )


def _check_one(audit: AuditLog, keyring: AuditKeyring, checkpoint: Checkpoint, head_sequence: int) -> str:
    """Why this checkpoint does not match the database; "" when it does."""
    try:
        if not keyring.matches(checkpoint.key_id, checkpoint.signed_bytes(), checkpoint.mac):
            return (
                f"the checkpoint of record {checkpoint.sequence} ({checkpoint.at}) does not match its MAC: it was "
                "forged or altered on the topic"
            )
    except AuditKeyError as exc:
        return f"the checkpoint of record {checkpoint.sequence} cannot be verified: {exc}"
    if checkpoint.sequence > head_sequence:
        return (
            f"a checkpoint at {checkpoint.at} names record {checkpoint.sequence}, but the database ends at record "
            f"{head_sequence}: records {head_sequence + 1}..{checkpoint.sequence} were removed from the end"
        )
    found = audit.records(after=checkpoint.sequence - 1, limit=1)
    if not found or found[0].sequence != checkpoint.sequence:
        return f"record {checkpoint.sequence}, checkpointed at {checkpoint.at}, is missing from the database"
    if found[0].hash != checkpoint.head_hash:
        return (
            f"record {checkpoint.sequence} differs from its checkpoint of {checkpoint.at}: it, or a record "
            "before it, was rewritten"
        )
    return ""


def _broken(checked: int, sequence: int | None, reason: str) -> CheckpointReport:
    return CheckpointReport(False, checked, sequence, reason)
