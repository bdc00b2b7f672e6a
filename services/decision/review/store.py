"""The review store: alerts for human review under the two-person rule, their reviews, suppressions and erasures.

The alert recorder (``recorder.py``) writes into it for the decision stage; the ReviewService (``servicer.py``) reads
and reviews through it.

An alert is never an automatic action. The decision stage records each alert it raises (``AlertRecorder``, before the
alert is published; idempotent on the alert id, so a replay is harmless) and it starts PENDING_REVIEW. Then:

- a confirmation by reviewer A keeps it PENDING_REVIEW with one confirmation; a confirmation by a second reviewer
  B != A makes it CONFIRMED. A confirming twice is refused (FAILED_PRECONDITION), whatever their rights; names are
  compared case-insensitively (``reviewer_identity``), so 'Alice' and 'alice' are one reviewer;
- any rejection makes it REJECTED. A rejection may say "not this person": the feedback is stored, reported, and
  ``ReviewStore.suppressed(source, subject, track)`` turns true, so that the engine can skip further alerts of that
  subject on that track (the alert's; on the whole source for an alert without one) for ``suppression_seconds``;
- a closed (CONFIRMED or REJECTED) alert takes no further review.

Each status change is published to ``sightline.alerts.v1`` (keyed by source id: consumers keep the latest status
per alert id) and each review action, refused ones included, is written to the audit log with the reviewer as the
principal. Publication uses a small outbox (``published_status``): a change that could not be published yet is
published again by ``ReviewServicer.flush_outbox``, so integrators see every change at least once.

A right-to-erasure notice (``ReviewStore.erase_subject``) deletes the subject's alerts, whatever their status, with
their reviews and its "not this person" feedback, and leaves a marker (the subject id and the erasure's time, purged
with the alerts) so that an alert from a frame seen before the erasure, still on its way, is not stored after it
(``ErasedSubjectAlert``). Erased alerts get no status event: integrators receive the notice itself.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sightline.common import codec, limits
from sightline.common.rpc import InvalidInput, NotFound
from sightline.common.sqlstore import Backend, BackendStore, Cursor, Migration, StoreError, open_backend
from sightline.v1 import events_pb2, review_pb2

log = logging.getLogger(__name__)

CONFIRMATIONS_REQUIRED = 2  # the two-person rule
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# The store checks what the gRPC server already refuses (common/limits.py), for callers that are not the API.
MAX_COMMENT_CHARS = limits.TEXT_LIMITS["comment"]
MAX_REVIEWER_CHARS = limits.ID_CHARS
SYSTEM_PRINCIPAL = "service:decision"
_PG_MIGRATION_LOCK = 0x5265_7669  # "Revi"; the same for every replica migrating the review tables
# A frame seen up to this long after a subject's erasure may still have been matched against it: other matching
# replicas drop the subject within their refresh interval (2 s by default), and the capture and matching clocks differ.
ERASURE_GRACE = timedelta(seconds=60)
_ALERT_ID_PREFIX = re.compile(r"[0-9a-f]{6,63}")

PENDING = events_pb2.AlertStatus.Name(events_pb2.ALERT_STATUS_PENDING_REVIEW).removeprefix("ALERT_STATUS_")
CONFIRMED = events_pb2.AlertStatus.Name(events_pb2.ALERT_STATUS_CONFIRMED).removeprefix("ALERT_STATUS_")
REJECTED = events_pb2.AlertStatus.Name(events_pb2.ALERT_STATUS_REJECTED).removeprefix("ALERT_STATUS_")
CONFIRM, REJECT = "CONFIRM", "REJECT"


class ReviewStoreError(StoreError):
    """The review database cannot be opened or used."""


class ReviewRefused(RuntimeError):
    """The review breaks a rule (closed alert, same reviewer twice); becomes FAILED_PRECONDITION with this message."""


class ErasedSubjectAlert(RuntimeError):
    """The alert's subject was erased after (or just before) its evidence was seen: it is not stored."""


@dataclass(frozen=True)
class ReviewErasure:
    """What ``ReviewStore.erase_subject`` deleted."""

    alerts: int
    reviews: int
    suppressions: int


@dataclass(frozen=True)
class Review:
    reviewer: str
    action: str  # CONFIRM or REJECT
    comment: str
    not_this_person: bool
    at: datetime


@dataclass(frozen=True)
class StoredAlert:
    """An alert as stored, with its current status and its reviews, oldest first."""

    alert: events_pb2.Alert
    reviews: tuple[Review, ...]
    sequence: int
    audited: bool = True  # its ALERT audit record is written (``AlertRecorder.record``)

    @property
    def status(self) -> str:
        return status_name(self.alert.status)

    @property
    def confirmations(self) -> int:
        return len(confirmers(self.reviews))

    def to_proto(self) -> review_pb2.ReviewedAlert:
        reply = review_pb2.ReviewedAlert(
            alert=self.alert, confirmations=self.confirmations, confirmations_required=CONFIRMATIONS_REQUIRED
        )
        for r in self.reviews:
            review = reply.reviews.add(
                reviewer=r.reviewer,
                action=review_pb2.ReviewAction.Value(f"REVIEW_ACTION_{r.action}"),
                comment=r.comment,
                not_this_person=r.not_this_person,
            )
            review.at.FromDatetime(r.at)
        return reply


@dataclass(frozen=True)
class Feedback:
    """A "not this person" rejection, for reports: the subject was wrongly alerted on this source."""

    alert_id: str
    source_id: str
    track_id: str
    subject_id: str
    reviewer: str
    comment: str
    at: datetime
    expires_at: datetime | None

    def to_proto(self) -> review_pb2.Feedback:
        made = review_pb2.Feedback(
            alert_id=self.alert_id,
            source_id=self.source_id,
            track_id=self.track_id,
            subject_id=self.subject_id,
            reviewer=self.reviewer,
            comment=self.comment,
        )
        made.at.FromDatetime(self.at)
        if self.expires_at is not None:
            made.suppresses_until.FromDatetime(self.expires_at)
        return made


def reviewer_identity(name: str) -> str:
    """The reviewer a principal name stands for, as the two-person rule compares them: 'Alice', ' alice' and 'ALICE'
    are one person (identity providers and certificates differ in case; NFKC folds look-alike compatibility forms)."""
    return unicodedata.normalize("NFKC", name).casefold().strip()


def confirmers(reviews: tuple[Review, ...]) -> set[str]:
    """The distinct reviewers (``reviewer_identity``) who confirmed."""
    return {reviewer_identity(r.reviewer) for r in reviews if r.action == CONFIRM}


def status_name(status: int) -> str:
    return codec.enum_label(events_pb2.AlertStatus, status, "ALERT_STATUS_")


def status_value(name: str) -> int:
    return codec.enum_value(events_pb2.AlertStatus, name, "ALERT_STATUS_")


MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "alerts for review, their reviews, not-this-person suppressions",
        (
            "CREATE TABLE review_alerts (seq {pk}, alert_id {key} NOT NULL UNIQUE, source_id {key} NOT NULL,"
            " subject_id {key} NOT NULL, status TEXT NOT NULL, published_status TEXT NOT NULL,"
            " alert {bytes} NOT NULL, raised_at {timestamp} NOT NULL, updated_at {timestamp} NOT NULL)",
            "CREATE INDEX review_alerts_status_idx ON review_alerts (status, seq)",
            "CREATE TABLE alert_reviews (id {pk}, alert_id {key} NOT NULL REFERENCES review_alerts (alert_id),"
            " reviewer TEXT NOT NULL, action TEXT NOT NULL, comment TEXT NOT NULL,"
            " not_this_person INTEGER NOT NULL, at {timestamp} NOT NULL)",
            "CREATE INDEX alert_reviews_alert_idx ON alert_reviews (alert_id, id)",
            "CREATE TABLE review_suppressions (id {pk}, source_id {key} NOT NULL, track_id {key} NOT NULL,"
            " subject_id {key} NOT NULL, alert_id {key} NOT NULL, reviewer TEXT NOT NULL, comment TEXT NOT NULL,"
            " created_at {timestamp} NOT NULL, expires_at {timestamp})",
            "CREATE INDEX review_suppressions_idx ON review_suppressions (source_id, subject_id)",
        ),
    ),
    Migration(
        2,
        "right to erasure: alerts by subject, erased subjects",
        (
            "CREATE INDEX review_alerts_subject_idx ON review_alerts (subject_id)",
            "CREATE TABLE review_erasures (subject_id {key} PRIMARY KEY, erased_at {timestamp} NOT NULL)",
        ),
    ),
    Migration(
        3,
        "when each alert's evidence was seen (the cool-down survives a restart); whether its raising is audited",
        (
            "ALTER TABLE review_alerts ADD COLUMN seen_at {timestamp}",
            "CREATE INDEX review_alerts_source_subject_idx ON review_alerts (source_id, subject_id, seq)",
            # Alerts stored before were audited with their insert: 1. New ones are inserted with 0 (record_alert).
            "ALTER TABLE review_alerts ADD COLUMN audited INTEGER NOT NULL DEFAULT 1",
        ),
    ),
]


class ReviewStore(BackendStore):
    """Alerts, their reviews and suppressions in SQLite or PostgreSQL; thread-safe (one lock, one connection)."""

    closed_error = ReviewStoreError
    what = "review store"

    def __init__(self, backend: Backend, suppression_seconds: float = 3600.0) -> None:
        super().__init__(backend)
        self._suppression = timedelta(seconds=suppression_seconds) if suppression_seconds > 0 else None

    @classmethod
    def open(cls, url: str, suppression_seconds: float = 3600.0) -> ReviewStore:
        """The review store at ``url``, creating or upgrading its tables. ``suppression_seconds`` <= 0: for good."""
        store = cls(
            open_backend(url, what="review", application_name="sightline-decision", error=ReviewStoreError),
            suppression_seconds,
        )
        return store._migrated(MIGRATIONS, "review_schema_version", _PG_MIGRATION_LOCK, "review")

    # -- writes --------------------------------------------------------------------------------------------------

    def record_alert(self, alert: events_pb2.Alert, seen_at: datetime | None = None) -> tuple[StoredAlert, bool]:
        """Store a newly raised alert (PENDING_REVIEW); (the stored alert, True) if new, (as stored, False) if known.

        A replay of an alert already reviewed gets the stored one back, with its current status, never a reset.
        ``seen_at``: when its evidence was captured (default: when it was raised). ErasedSubjectAlert when the subject
        was erased after that (or up to ``ERASURE_GRACE`` before): a result still in flight at the erasure.
        """
        if not alert.alert_id:
            raise InvalidInput("an alert needs an alert_id")
        stored = events_pb2.Alert()
        stored.CopyFrom(alert)
        stored.status = events_pb2.ALERT_STATUS_PENDING_REVIEW
        now = self._now()
        raised = alert.raised_at.ToDatetime(UTC) if alert.HasField("raised_at") else datetime.now(UTC)
        with self._tx(write=True) as cur:
            if self._erased_after(cur, alert.subject_id, seen_at or raised):
                raise ErasedSubjectAlert(
                    f"alert {alert.alert_id} not stored: its subject was erased after its evidence was seen"
                )
            to_db = self._backend.dialect.to_db_time
            cur.execute(
                "INSERT INTO review_alerts (alert_id, source_id, subject_id, status, published_status, alert,"
                " raised_at, updated_at, seen_at, audited) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
                " ON CONFLICT (alert_id) DO NOTHING",
                (
                    alert.alert_id,
                    alert.source_id,
                    alert.subject_id,
                    PENDING,
                    PENDING,
                    stored.SerializeToString(),
                    to_db(raised),
                    now,
                    to_db(seen_at or raised),
                ),
            )
            created = cur.rowcount == 1
            found = self._load(cur, alert.alert_id)
        assert found is not None  # inserted or already there, in the same transaction
        return found, created

    def review(
        self,
        alert_id: str,
        reviewer: str,
        action: str,
        comment: str = "",
        not_this_person: bool = False,
        track_id: str = "",
    ) -> tuple[StoredAlert, bool]:
        """Apply one reviewer's action; returns (the alert after it, whether its status changed).

        Raises NotFound (unknown alert), InvalidInput (bad arguments), ReviewRefused (closed alert, or a reviewer
        confirming twice). The row is locked for the transaction, so concurrent reviews of one alert take turns.
        """
        reviewer, comment = _checked_review(reviewer, action, comment, not_this_person)
        now = datetime.now(UTC)
        with self._tx(write=True) as cur:
            alert_id = self._resolve(cur, alert_id)
            row = cur.execute(
                "SELECT status FROM review_alerts WHERE alert_id = ?" + self._backend.dialect.for_update, (alert_id,)
            ).fetchone()
            current = self._load(cur, alert_id)
            assert row is not None and current is not None
            new_status = _next_status(current, reviewer, action)
            cur.execute(
                "INSERT INTO alert_reviews (alert_id, reviewer, action, comment, not_this_person, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (alert_id, reviewer, action, comment, int(not_this_person), self._backend.dialect.to_db_time(now)),
            )
            if new_status != current.status:
                cur.execute(
                    "UPDATE review_alerts SET status = ?, updated_at = ? WHERE alert_id = ?",
                    (new_status, self._backend.dialect.to_db_time(now), alert_id),
                )
            if not_this_person:
                self._suppress(cur, current.alert, track_id, reviewer, comment, now)
            after = self._load(cur, alert_id)
        assert after is not None
        return after, new_status != current.status

    def mark_audited(self, alert_id: str) -> None:
        """The alert's ALERT audit record is written: a replay of the alert does not write another."""
        with self._tx(write=True) as cur:
            cur.execute("UPDATE review_alerts SET audited = 1 WHERE alert_id = ?", (alert_id,))

    def mark_published(self, alert_id: str, status: str) -> None:
        """The alert with this status has reached the alerts topic (the outbox entry is done)."""
        with self._tx(write=True) as cur:
            cur.execute(
                "UPDATE review_alerts SET published_status = ? WHERE alert_id = ? AND status = ?",
                (status, alert_id, status),
            )

    def purge(self, raised_before: datetime) -> int:
        """Delete alerts raised before the cut-off, whatever their status, with their reviews, and the "not this
        person" feedback recorded before it that is no longer in force; returns the alerts deleted. Retention limits
        apply to unreviewed alerts too; a suppression kept for good stays until someone removes it. Erasure markers
        older than the cut-off go too: no result from before such an erasure is still in flight."""
        to_db = self._backend.dialect.to_db_time
        cutoff, now = to_db(raised_before), to_db(datetime.now(UTC))
        with self._tx(write=True) as cur:
            old = "SELECT alert_id FROM review_alerts WHERE raised_at < ?"
            cur.execute(f"DELETE FROM alert_reviews WHERE alert_id IN ({old})", (cutoff,))
            deleted = cur.execute("DELETE FROM review_alerts WHERE raised_at < ?", (cutoff,)).rowcount
            cur.execute(
                "DELETE FROM review_suppressions WHERE created_at < ? AND expires_at IS NOT NULL AND expires_at < ?",
                (cutoff, now),
            )
            cur.execute("DELETE FROM review_erasures WHERE erased_at < ?", (cutoff,))
        return deleted

    def erase_subject(self, subject_id: str, erased_at: datetime | None = None) -> ReviewErasure:
        """Right to erasure: delete the subject's alerts (any status) with their reviews, and its "not this person"
        feedback and suppressions, in one transaction; returns what was deleted.

        ``erased_at`` is when the subject was erased (the notice's time; default now). It is remembered (with the
        subject id, until ``purge`` passes it), so that an alert from a frame seen before it, still in flight, is
        refused by ``record_alert``, and so that a replayed notice (not newer than the last one applied) deletes
        nothing: whatever the subject has by then was raised after its erasure, for a subject enrolled again.
        """
        with self._tx(write=True) as cur:
            if not note_erasure(cur, self._backend.dialect, "review_erasures", subject_id, erased_at):
                return ReviewErasure(0, 0, 0)
            theirs = "SELECT alert_id FROM review_alerts WHERE subject_id = ?"
            reviews = cur.execute(f"DELETE FROM alert_reviews WHERE alert_id IN ({theirs})", (subject_id,)).rowcount
            alerts = cur.execute("DELETE FROM review_alerts WHERE subject_id = ?", (subject_id,)).rowcount
            suppressions = cur.execute("DELETE FROM review_suppressions WHERE subject_id = ?", (subject_id,)).rowcount
        return ReviewErasure(alerts, reviews, suppressions)

    # -- reads ---------------------------------------------------------------------------------------------------

    def get(self, alert_id: str) -> StoredAlert:
        """The alert (full id or unambiguous hex prefix of 6+ characters); NotFound when unknown."""
        with self._tx(write=False) as cur:
            found = self._load(cur, self._resolve(cur, alert_id))
        assert found is not None
        return found

    def list_alerts(
        self, status: str | None = None, limit: int = DEFAULT_PAGE_SIZE, after: int = 0
    ) -> list[StoredAlert]:
        """Alerts in the order they were raised (oldest first) after the sequence ``after``, optionally one status."""
        conditions, params = ["seq > ?"], [int(after)]
        if status:
            conditions.append("status = ?")
            params.append(status)
        with self._tx(write=False) as cur:
            ids = cur.execute(
                f"SELECT alert_id FROM review_alerts WHERE {' AND '.join(conditions)} ORDER BY seq LIMIT ?",
                [*params, max(1, min(int(limit), MAX_PAGE_SIZE))],
            ).fetchall()
            found = [self._load(cur, alert_id) for (alert_id,) in ids]
        return [a for a in found if a is not None]

    def unpublished(self, limit: int = 100) -> list[StoredAlert]:
        """Alerts whose current status has not reached the alerts topic yet (the outbox)."""
        with self._tx(write=False) as cur:
            ids = cur.execute(
                "SELECT alert_id FROM review_alerts WHERE published_status <> status ORDER BY seq LIMIT ?",
                (int(limit),),
            ).fetchall()
            found = [self._load(cur, alert_id) for (alert_id,) in ids]
        return [a for a in found if a is not None]

    def suppressed(self, source_id: str, subject_id: str, track_id: str = "", at: datetime | None = None) -> bool:
        """True when a reviewer said "not this person" for this subject on this source (and track), still in force.

        The decision engine calls this before raising an alert. A suppression recorded without a track (from an alert
        of a face that had none) covers every track of the source.
        """
        at = at or datetime.now(UTC)
        with self._tx(write=False) as cur:
            rows = cur.execute(
                "SELECT track_id, expires_at FROM review_suppressions WHERE source_id = ? AND subject_id = ?",
                (source_id, subject_id),
            ).fetchall()
        dialect = self._backend.dialect
        return any(
            track in ("", track_id) and (expires is None or dialect.from_db_time(expires) > at)
            for track, expires in rows
        )

    def last_alert(self, source_id: str, subject_id: str) -> tuple[events_pb2.Alert, datetime] | None:
        """The last alert recorded for the subject on the source, with when its evidence was seen (its raising time
        for an alert stored before that was kept): what the engine's cool-down needs after a restart."""
        with self._tx(write=False) as cur:
            row = cur.execute(
                "SELECT alert, COALESCE(seen_at, raised_at) FROM review_alerts WHERE source_id = ?"
                " AND subject_id = ? ORDER BY seq DESC LIMIT 1",
                (source_id, subject_id),
            ).fetchone()
        if row is None:
            return None
        return events_pb2.Alert.FromString(bytes(row[0])), self._backend.dialect.from_db_time(row[1])

    def erased_since(self, subject_id: str, seen_at: datetime) -> bool:
        """Whether the subject was erased after ``seen_at`` (or up to ``ERASURE_GRACE`` before): a result about it seen
        then must not be published any more."""
        with self._tx(write=False) as cur:
            return self._erased_after(cur, subject_id, seen_at)

    def feedback(self, since: datetime | None = None) -> list[Feedback]:
        """Every "not this person" rejection (since a time), oldest first: the false-alert feedback for reports."""
        params: list[Any] = []
        where = ""
        if since is not None:
            where, params = " WHERE created_at >= ?", [self._backend.dialect.to_db_time(since)]
        with self._tx(write=False) as cur:
            rows = cur.execute(
                "SELECT alert_id, source_id, track_id, subject_id, reviewer, comment, created_at,"
                f" expires_at FROM review_suppressions{where} ORDER BY id",
                params,
            ).fetchall()
        t = self._backend.dialect.from_db_time
        return [
            Feedback(a, s, tr, sub, r, c, t(at), t(exp) if exp is not None else None)
            for a, s, tr, sub, r, c, at, exp in rows
        ]

    # -- internals -----------------------------------------------------------------------------------------------

    def _erased_after(self, cur: Cursor, subject_id: str, seen_at: datetime) -> bool:
        """Whether the subject was erased after ``seen_at`` (or up to ERASURE_GRACE before it)."""
        row = cur.execute("SELECT erased_at FROM review_erasures WHERE subject_id = ?", (subject_id,)).fetchone()
        if row is None:
            return False
        erased_at = self._backend.dialect.from_db_time(row[0])
        # Compared without adding the grace to a date that may be the last one there is (an erasure notice may say
        # 9999-12-31): erased_at + grace >= seen_at, rearranged so that neither side can overflow.
        return erased_at >= seen_at or seen_at - erased_at <= ERASURE_GRACE

    def _resolve(self, cur: Cursor, alert_id: str) -> str:
        """The full id of an alert named by its id or an unambiguous hex prefix (the CLI shows 12 characters)."""
        if cur.execute("SELECT 1 FROM review_alerts WHERE alert_id = ?", (alert_id,)).fetchone():
            return alert_id
        if _ALERT_ID_PREFIX.fullmatch(alert_id or ""):
            # Only hex characters reach LIKE, so the prefix cannot carry a wildcard.
            rows = cur.execute(
                "SELECT alert_id FROM review_alerts WHERE alert_id LIKE ? ORDER BY alert_id LIMIT 2", (alert_id + "%",)
            ).fetchall()
            if len(rows) == 1:
                return str(rows[0][0])
            if len(rows) > 1:
                raise InvalidInput(f"alert id prefix {alert_id!r} matches several alerts; give more characters")
        raise NotFound(f"no alert with id {alert_id!r}")

    def _load(self, cur: Cursor, alert_id: str) -> StoredAlert | None:
        row = cur.execute(
            "SELECT seq, status, alert, audited FROM review_alerts WHERE alert_id = ?", (alert_id,)
        ).fetchone()
        if row is None:
            return None
        seq, status, blob, audited = row
        alert = events_pb2.Alert()
        alert.ParseFromString(bytes(blob))
        alert.status = status_value(status)
        t = self._backend.dialect.from_db_time
        reviews = tuple(
            Review(reviewer, action, comment, bool(not_this_person), t(at))
            for reviewer, action, comment, not_this_person, at in cur.execute(
                "SELECT reviewer, action, comment, not_this_person, at FROM alert_reviews WHERE alert_id = ?"
                " ORDER BY id",
                (alert_id,),
            ).fetchall()
        )
        return StoredAlert(alert, reviews, int(seq), bool(audited))

    def _suppress(
        self, cur: Cursor, alert: events_pb2.Alert, track_id: str, reviewer: str, comment: str, now: datetime
    ) -> None:
        to_db = self._backend.dialect.to_db_time
        expires = to_db(now + self._suppression) if self._suppression is not None else None
        cur.execute(
            "INSERT INTO review_suppressions (source_id, track_id, subject_id, alert_id, reviewer, comment,"
            " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                alert.source_id,
                track_id or alert.track_id,
                alert.subject_id,
                alert.alert_id,
                reviewer,
                comment,
                to_db(now),
                expires,
            ),
        )


def note_erasure(cur: Cursor, dialect: Any, table: str, subject_id: str, erased_at: datetime | None) -> bool:
    """Remember in ``table`` that the subject was erased at ``erased_at`` (default now); False, remembering nothing,
    for a notice not newer than the last one applied there (a replay: it must delete nothing more). The row is
    locked, so concurrent replicas apply one notice once."""
    at = (erased_at or datetime.now(UTC)).astimezone(UTC)
    known = cur.execute(
        f"SELECT erased_at FROM {table} WHERE subject_id = ?" + dialect.for_update, (subject_id,)
    ).fetchone()
    if known is not None and dialect.from_db_time(known[0]) >= at:
        return False
    cur.execute(
        f"INSERT INTO {table} (subject_id, erased_at) VALUES (?, ?) ON CONFLICT (subject_id)"
        " DO UPDATE SET erased_at = excluded.erased_at",
        (subject_id, dialect.to_db_time(at)),
    )
    return True


def _checked_review(reviewer: str, action: str, comment: str, not_this_person: bool) -> tuple[str, str]:
    reviewer = (reviewer or "").strip()
    if not reviewer or len(reviewer) > MAX_REVIEWER_CHARS:
        raise InvalidInput(f"a review needs a reviewer (at most {MAX_REVIEWER_CHARS} characters)")
    if action not in (CONFIRM, REJECT):
        raise InvalidInput(f"review action must be {CONFIRM} or {REJECT}, not {action!r}")
    if not_this_person and action != REJECT:
        raise InvalidInput("not_this_person goes with a rejection only")
    if len(comment or "") > MAX_COMMENT_CHARS:
        raise InvalidInput(f"the comment is longer than {MAX_COMMENT_CHARS} characters")
    return reviewer, comment or ""


def _next_status(current: StoredAlert, reviewer: str, action: str) -> str:
    """The status after this action, or ReviewRefused when the rules forbid it."""
    alert_id = current.alert.alert_id
    if current.status != PENDING:
        raise ReviewRefused(f"alert {alert_id} is already {current.status}; a closed alert takes no further review")
    if action == REJECT:
        return REJECTED
    confirmed, identity = confirmers(current.reviews), reviewer_identity(reviewer)
    if identity in confirmed:
        raise ReviewRefused(
            f"{reviewer} has already confirmed alert {alert_id}; the two-person rule needs a "
            "confirmation by a second, different reviewer"
        )
    return CONFIRMED if len(confirmed | {identity}) >= CONFIRMATIONS_REQUIRED else PENDING
