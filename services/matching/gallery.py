"""The gallery as the matching service sees it: the encrypted store, the in-memory index, and how they stay in step.

Writes go to the store, which logs the subjects each write touched under a new version (the change log); every
replica, the writing one included, applies the log to its index (``follower.py``): it reads those subjects again,
decrypting only their templates. Replicas read the log every ``refresh_interval_s`` (0.5 s by default), so an
enrolment, deletion, erasure or membership change made anywhere reaches every replica's searches within about that
long, and nothing is reloaded whole. Searches only ever touch the index.

A replica starts from the newest encrypted snapshot of its index (``snapshots.py``) plus the log since; without one
(or when the log no longer reaches back to it, or it cannot be read) it loads and decrypts everything, and writes a
snapshot soon after (``snapshot_writer.py``). The index is ``AnnIndex``: exact below ``AnnSettings.exact_below``
templates, an IVF shortlist re-ranked exactly above.

With shards (``shards.py``) a replica holds only the subjects of its shard; searches go to every shard and are
merged before any threshold, a 1:1 verification goes to the subject's shard, and a write to a subject of another
shard asks that shard to catch up at once, so that a returned Enroll is visible there.

Memberships that expire change nothing in the database, so the log does not say so: the refresher also wakes up at
the next expiry (``GalleryStore.next_expiry``) and reads again the lists of the subjects whose membership expired,
so an expired membership stops matching at its expiry time on every replica without anyone calling anything.

A replica matches only while it is in step with the database (``readiness.py``): an erasure notice
(``erasure_listener.py``) drops the subject from the index at once and holds matching until a check of the database
confirms it, and a replica that cannot reach the database for ``refresh_interval_s + max_staleness_s`` stops matching
(searches and verifications raise ``GalleryUnavailable``) until a check succeeds again. Failed checks are retried with
backoff, starting at ``_RETRY_FIRST_S`` and at most ``refresh_interval_s`` apart.

Writes are audited through the gallery database's audit outbox (``audit_outbox.py``): each write method takes an
``audit`` hook whose records commit with the write, and then waits briefly for this replica's relay to append them
to the audit log (``audit_outbox``: one relay per gallery, stopped when it closes).

Each candidate carries the distance thresholds of those of its (current) watchlists that set a target false match
rate in the gallery (``MatchCandidate.watchlist_thresholds``), for the decision service to apply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from sightline.common import scores, telemetry
from sightline.common.audit import AuditLog
from sightline.common.transient import Backoff
from sightline.matching.ann import AnnIndex, AnnSettings
from sightline.matching.audit_outbox import AuditEntry, AuditOutboxRelay, OutboxPolicy
from sightline.matching.follower import IndexFollower
from sightline.matching.index import Candidate
from sightline.matching.readiness import Readiness
from sightline.matching.shards import RemoteShards, merge, shard_of
from sightline.matching.snapshot_writer import SnapshotWriter
from sightline.matching.snapshots import SnapshotError, SnapshotStore
from sightline.matching.store import (
    AuditHook,
    Enrolment,
    GalleryStore,
    MembershipRecord,
    SubjectRemoval,
    WatchlistRecord,
)
from sightline.v1 import types_pb2

log = logging.getLogger(__name__)
SERVICE = "matching"
DEFAULT_MAX_STALENESS_S = 10.0
_RETRY_FIRST_S = 0.1  # first retry of a failed check; doubled up to refresh_interval_s
_EXPIRY_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True)
class EnrolResult:
    templates_added: int
    subject_created: bool
    watchlists_created: tuple[str, ...]


def watchlist_threshold(record: WatchlistRecord) -> float | None:
    """The distance a list's target FMR converts to with the calibration table; None when it sets none (or the
    table cannot answer it any more, e.g. after a calibration change: the decision policy's threshold then applies)."""
    return _threshold(record.name, record.target_fmr)


def _threshold(name: str, target_fmr: float | None) -> float | None:
    if target_fmr is None:
        return None
    try:
        return scores.distance_for_fmr(target_fmr)
    except scores.CalibrationError as error:
        log.warning("watchlist %r: its target FMR has no threshold (%s); the policy's threshold applies", name, error)
        return None


@dataclass(frozen=True)
class SnapshotPolicy:
    """Where and how often the index is snapshotted (``MatchingSettings.snapshot_*``)."""

    snapshots: SnapshotStore
    interval_s: float
    after_removal_s: float
    change_log_days: float


class Gallery:
    """One replica's gallery: writes through the store, searches and verifications on its index (see above)."""

    def __init__(
        self,
        store: GalleryStore,
        max_distance: float,
        refresh_interval_s: float = 0.5,
        max_staleness_s: float = DEFAULT_MAX_STALENESS_S,
        *,
        index_settings: AnnSettings | None = None,
        snapshots: SnapshotPolicy | None = None,
        shard: int = 0,
        shards: int = 1,
        remote: RemoteShards | None = None,
    ) -> None:
        self.store = store
        self.readiness = Readiness(stale_after_s=refresh_interval_s + max_staleness_s)
        self.max_distance = max_distance
        self.shard, self.shards = shard, shards
        self._remote = remote
        self._index_settings = index_settings or AnnSettings()
        self._follower = IndexFollower(store, self.owns)
        self.index = AnnIndex(settings=self._index_settings)
        self._version = -1
        self._thresholds: dict[str, float] = {}
        self._next_expiry: float | None = None  # epoch seconds of the next membership expiry
        self._expired_through = datetime.now(UTC)  # expiries up to here are applied to the index
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when the refresher must re-plan its sleep (an earlier expiry, stop)
        self.refresh_interval_s = refresh_interval_s
        self._failures = 0  # consecutive failed checks, for the retry backoff
        self._policy = snapshots
        self._snapshot_writer: SnapshotWriter | None = None
        self._started_from: int | None = None  # the version of the snapshot this replica started from
        self._relay: AuditOutboxRelay | None = None
        self._relay_lock = threading.Lock()
        try:
            with self._write_lock:
                self._start()
        except BaseException:
            self.readiness.close()
            raise
        if snapshots is not None:
            self._snapshot_writer = SnapshotWriter(
                snapshots.snapshots,
                self._snapshot_source,
                snapshots.interval_s,
                snapshots.after_removal_s,
                after_write=self._prune_change_log,
            )
            if self._started_from is None:
                self._snapshot_writer.changed(now=True)
        self._refresher = threading.Thread(target=self._refresh_loop, name="gallery-refresh", daemon=True)
        self._refresher.start()

    def owns(self, subject_id: str) -> bool:
        """Whether this replica's shard holds the subject."""
        return self.shards == 1 or shard_of(subject_id, self.shards) == self.shard

    # -- staying in step ---------------------------------------------------------------------------------------

    def _start(self) -> None:
        """From the newest snapshot plus the log since, else everything from the store. Hold the write lock."""
        self._started_from = self._from_snapshot()
        if self._started_from is None:
            self.reload()
        log.info(
            "gallery ready",
            extra={
                "templates": self.index.size,
                "from_snapshot_version": self._started_from,
                "version": self._version,
                "shard": self.shard,
                "shards": self.shards,
            },
        )

    def _from_snapshot(self) -> int | None:
        """Loads the newest snapshot and the changes since; the snapshot's version, or None when there is none to
        use (none written, unreadable, or older than the change log reaches)."""
        if self._policy is None:
            return None
        snapshots = self._policy.snapshots
        try:
            info = snapshots.newest()
            if info is None:
                return None
            index = snapshots.load(info, settings=self._index_settings)
        except SnapshotError as error:
            log.warning("gallery snapshot not used: %s; loading the gallery from the database", error)
            return None
        caught = self._follower.catch_up(index, info.version)
        if caught is None:
            log.warning("gallery snapshot not used: the change log no longer reaches back to its version")
            return None
        now = datetime.now(UTC)
        # Memberships may have expired since the snapshot; a margin covers clock skew between replicas.
        self._follower.expire(index, info.created_at - _EXPIRY_MARGIN, now)
        self.index = index
        self._expired_through = now
        self._version = caught.version
        self._load_lists()
        self.readiness.checked()
        self._report_size()
        return info.version

    def reload(self) -> None:
        """Everything again from the store: this shard's templates (decrypted), memberships, list thresholds. Hold
        the write lock."""
        now = datetime.now(UTC)
        self._version = self._follower.load_all(self.index, at=now)
        self._expired_through = now
        self._load_lists()
        self.readiness.checked()
        self._report_size()

    def _catch_up(self) -> None:
        """Applies the change log since this replica's version (a full reload when it cannot). Hold the write lock."""
        caught = self._follower.catch_up(self.index, self._version)
        if caught is None:
            log.warning("the gallery change log does not reach back to this replica's version: reloading")
            self.reload()
            if self._snapshot_writer is not None:
                self._snapshot_writer.changed(now=True)
            return
        if caught.version == self._version:
            return
        self._version = caught.version
        if caught.lists_changed or caught.subjects:
            self._load_lists()
        self._report_size()
        if self._snapshot_writer is not None:
            self._snapshot_writer.changed(removal=caught.removed > 0)

    def sync_subjects(self, subject_ids: Sequence[str]) -> None:
        """Another shard wrote these subjects: catch up now rather than at the next read of the log."""
        del subject_ids  # the log names them, with anything else written meanwhile
        with self._write_lock:
            self._catch_up()

    def erased(self, subject_id: str) -> None:
        """An erasure notice: the subject leaves the index now, without the database (which may be unreachable), and
        the replica stops matching until the next check of the database, right away, confirms the erasure."""
        self.readiness.erasure_pending(subject_id)  # first: a catch-up already running may put the subject back
        self.index.remove_subject(subject_id)
        self._report_size()
        if self._snapshot_writer is not None:
            self._snapshot_writer.changed(removal=True)
        self._wake.set()

    def _load_lists(self) -> None:
        """List thresholds and the next membership expiry: a few rows, read again after any change."""
        thresholds = {name: _threshold(name, fmr) for name, fmr in self.store.watchlist_targets().items()}
        self._thresholds = {name: distance for name, distance in thresholds.items() if distance is not None}
        next_expiry = self.store.next_expiry(self._expired_through)
        previous = self._next_expiry
        self._next_expiry = next_expiry.timestamp() if next_expiry is not None else None
        if self._next_expiry is not None and (previous is None or self._next_expiry < previous):
            self._wake.set()  # the refresher may be asleep until later than this expiry

    def _refresh_loop(self) -> None:
        while True:
            self._wake.wait(self._until_next_check())
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._check()
                self._failures = 0
            except Exception:
                self._failures += 1
                log.warning("gallery check failed; will retry", exc_info=True, extra={"failures": self._failures})

    def _check(self) -> None:
        """One check of the database: catch up with the change log, confirm pending erasures, expire memberships."""
        pending = self.readiness.pending_erasures()
        with self._write_lock:
            self._catch_up()
            # An erased id may have been enrolled again since: the database, not the notice, has the last word.
            self._follower.apply(self.index, pending)
            self.readiness.erasures_confirmed(pending)
            self.readiness.checked()
            if self._next_expiry is not None and time.time() >= self._next_expiry:
                now = datetime.now(UTC)
                expired = self._follower.expire(self.index, self._expired_through, now)
                self._expired_through = now
                self._load_lists()
                log.info("watchlist memberships expired", extra={"subjects": expired})

    def _until_next_check(self) -> float:
        if self._failures:
            return Backoff(_RETRY_FIRST_S, self.refresh_interval_s).delay(self._failures)
        if self._next_expiry is None:
            return self.refresh_interval_s
        return max(0.0, min(self.refresh_interval_s, self._next_expiry - time.time()))

    def _written(self, subject_ids: Sequence[str] = (), audited: bool = False) -> None:
        """After this replica's own write: apply it here now, and have the shards that own ``subject_ids`` do the
        same (outside the lock: two shards syncing each other must not wait on each other's lock); when it was
        ``audited``, wait for its records to reach the audit log.

        The write is committed by then, so a failure here is logged, not raised (a caller retrying a write that
        succeeded would enrol its templates twice): this replica's refresher, or the owner's, catches up within
        ``refresh_interval_s``."""
        try:
            with self._write_lock:
                self._catch_up()
            others = [subject_id for subject_id in subject_ids if not self.owns(subject_id)]
            if others and self._remote is not None:
                self._remote.sync(others)
        except Exception:
            log.warning("a gallery write is stored but not yet applied; the change log will bring it", exc_info=True)
        if audited:
            self._audited()

    def _audited(self) -> None:
        """Waits (briefly, and not at all while the audit log cannot be written) for the relay to append the records
        just committed; they are safe in the outbox either way."""
        relay = self._relay
        if relay is not None and not relay.wait():
            log.info("audit records of a gallery write wait in the outbox", extra={"failing": relay.failing})

    def _snapshot_source(self) -> tuple[AnnIndex, int]:
        with self._write_lock:  # the index holds at least every change up to this version (maybe some after)
            return self.index, self._version

    def _prune_change_log(self) -> None:
        assert self._policy is not None
        pruned = self.store.prune_changes(datetime.now(UTC) - timedelta(days=self._policy.change_log_days))
        if pruned:
            log.info("gallery change log pruned", extra={"rows": pruned})

    def audit_outbox(self, audit: AuditLog, policy: OutboxPolicy | None = None) -> AuditOutboxRelay:
        """The relay of this gallery's audit outbox to ``audit``, started on first call (it drains what an earlier
        run left at once); every servicer of the gallery shares it."""
        with self._relay_lock:
            if self._relay is None:
                self._relay = AuditOutboxRelay(self.store, audit, policy).start()
            elif self._relay.audit is not audit:
                raise ValueError("this gallery's audit outbox already relays to another audit log")
            return self._relay

    def close(self) -> None:
        if self._relay is not None:
            self._relay.close()  # a last pass, while the store is still open
        self._stop.set()
        self._wake.set()
        self._refresher.join(timeout=5)
        if self._snapshot_writer is not None:
            self._snapshot_writer.close()
        if self._remote is not None:
            self._remote.close()
        self.readiness.close()
        self.store.close()

    # -- subjects ----------------------------------------------------------------------------------------------

    def enroll(
        self,
        subject_id: str,
        display_name: str,
        watchlists: Sequence[str],
        vectors: Sequence[np.ndarray],
        model: tuple[str, str],
        qualities: Sequence[float],
        expires_at: datetime | None = None,
        owner: str = "",
        audit: AuditHook[Enrolment] | None = None,
    ) -> EnrolResult:
        """Stores the subject, its new templates and its memberships, in one transaction with ``audit``'s records;
        ``owner`` owns any list created on the way."""
        templates = list(zip(vectors, qualities, strict=True))
        enrolment = self.store.enrol_subject(
            subject_id, display_name, list(watchlists), expires_at, owner, templates, model, audit
        )
        self._written([subject_id], audited=audit is not None)
        return EnrolResult(enrolment.templates_added, enrolment.created, enrolment.watchlists_created)

    def remove(self, subject_id: str, audit: AuditHook[SubjectRemoval] | None = None) -> SubjectRemoval:
        """Deletes (or erases) the subject with its templates and memberships, here and, through the change log, on
        every other replica."""
        removal = self.store.remove_subject(subject_id, audit)
        self._written([subject_id], audited=audit is not None)
        return removal

    def record_audit(self, entries: list[AuditEntry]) -> None:
        """Audit records of a call that wrote nothing, through the outbox like those of the writes."""
        self.store.record_audit(entries)
        self._audited()

    # -- watchlists --------------------------------------------------------------------------------------------

    def create_watchlist(
        self,
        name: str,
        purpose: str,
        owner: str,
        target_fmr: float | None,
        default_membership_days: int,
        audit: AuditHook[WatchlistRecord] | None = None,
    ) -> WatchlistRecord:
        record = self.store.create_watchlist(name, purpose, owner, target_fmr, default_membership_days, audit)
        self._written(audited=audit is not None)
        return record

    def update_watchlist(
        self,
        name: str,
        purpose: str,
        owner: str,
        target_fmr: float | None,
        default_membership_days: int,
        audit: AuditHook[WatchlistRecord] | None = None,
    ) -> WatchlistRecord:
        record = self.store.update_watchlist(name, purpose, owner, target_fmr, default_membership_days, audit)
        self._written(audited=audit is not None)
        return record

    def delete_watchlist(self, name: str, audit: AuditHook[int | None] | None = None) -> int | None:
        removed = self.store.delete_watchlist(name, audit)
        self._written(audited=audit is not None)  # other shards drop the memberships at their next read of the log
        return removed

    def add_members(
        self,
        watchlist: str,
        subject_ids: Sequence[str],
        expires_at: datetime | None = None,
        audit: AuditHook[list[MembershipRecord]] | None = None,
    ) -> list[MembershipRecord]:
        memberships = self.store.add_members(watchlist, subject_ids, expires_at, audit)
        self._written(subject_ids, audited=audit is not None)
        return memberships

    def remove_members(
        self, watchlist: str, subject_ids: Sequence[str], audit: AuditHook[list[str]] | None = None
    ) -> list[str]:
        removed = self.store.remove_members(watchlist, subject_ids, audit)
        self._written(removed, audited=audit is not None)
        return removed

    # -- matching ----------------------------------------------------------------------------------------------

    def search(
        self, vectors: np.ndarray, top_k: int, watchlists: Sequence[str] = ()
    ) -> list[list[types_pb2.MatchCandidate]]:
        """The ``top_k`` nearest subjects per probe over every shard, merged before any threshold applies."""
        if self._remote is None:
            results = self.local_search(vectors, top_k, watchlists)
        else:  # this shard searches while the others do

            def local() -> list[list[Candidate]]:
                return self.local_search(vectors, top_k, watchlists)

            results = merge(self._remote.search(vectors, top_k, watchlists, local=local), top_k)
        thresholds = self._thresholds  # one snapshot for the whole batch
        return [[_candidate(c, thresholds) for c in candidates] for candidates in results]

    def local_search(self, vectors: np.ndarray, top_k: int, watchlists: Sequence[str] = ()) -> list[list[Candidate]]:
        """This shard's part of a search."""
        self.readiness.require()  # never match on an index that may still hold erased subjects
        return self.index.search(vectors, top_k=top_k, watchlists=list(watchlists))

    def within_threshold(self, candidate: types_pb2.MatchCandidate) -> bool:
        """Whether a candidate is within matching's own threshold: the most lenient of its lists' own thresholds,
        else ``max_distance`` (the decision policy may use other thresholds; this is for counts and audit)."""
        limit = max(candidate.watchlist_thresholds.values(), default=self.max_distance)
        return candidate.distance <= limit

    def verify(self, vector: np.ndarray, subject_id: str) -> types_pb2.Verification:
        if self.owns(subject_id) or self._remote is None:
            distance = self.local_verify(vector, subject_id)
        else:
            distance = self._remote.verify(subject_id, vector)
        if distance is None:
            return types_pb2.Verification(subject_id=subject_id, subject_found=False, verified=False)
        return types_pb2.Verification(
            subject_id=subject_id,
            distance=distance,
            similarity=scores.similarity(distance),
            verified=distance <= self.max_distance,
            subject_found=True,
            fmr=scores.fmr(distance),
        )

    def local_verify(self, vector: np.ndarray, subject_id: str) -> float | None:
        """The subject's distance on this shard (None: not here)."""
        self.readiness.require()
        return self.index.verify(vector, subject_id)

    def _report_size(self) -> None:
        telemetry.GALLERY_TEMPLATES.labels(SERVICE).set(self.index.size)
        telemetry.GALLERY_SUBJECTS.labels(SERVICE).set(self.index.subject_count)


def _candidate(found: Candidate, thresholds: dict[str, float]) -> types_pb2.MatchCandidate:
    return types_pb2.MatchCandidate(
        subject_id=found.subject_id,
        distance=found.distance,
        similarity=scores.similarity(found.distance),
        watchlists=sorted(found.watchlists),
        fmr=scores.fmr(found.distance),
        watchlist_thresholds={name: thresholds[name] for name in found.watchlists if name in thresholds},
    )
