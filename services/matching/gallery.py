"""The gallery as the matching service sees it: the encrypted store, the in-memory index, and how they stay in step.

Writes go to the store first and then to this replica's index; other replicas notice the store's version change
within ``refresh_interval_s`` and reload (an erasure or a deletion included). Searches only ever touch the index.

Memberships that expire change nothing in the database, so no version moves: the refresher also wakes up at the
next expiry (``GalleryStore.memberships().next_expiry``) and re-reads the memberships alone, so an expired membership
stops matching at its expiry time on every replica without anyone calling anything.

A replica matches only while it is in step with the database (``readiness.py``): an erasure notice
(``erasure_listener.py``) drops the subject from the index at once and holds matching until a check of the database
confirms it, and a replica that cannot reach the database for ``refresh_interval_s + max_staleness_s`` stops matching
(searches and verifications raise ``GalleryUnavailable``) until a check succeeds again. Failed checks are retried with
backoff, starting at ``_RETRY_FIRST_S`` and at most ``refresh_interval_s`` apart.

Each candidate carries the distance thresholds of those of its (current) watchlists that set a target false match
rate in the gallery (``MatchCandidate.watchlist_thresholds``), for the decision service to apply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from sightline.common import scores, telemetry
from sightline.common.transient import Backoff
from sightline.matching.index import DEFAULT_MASK_CACHE_SIZE, Candidate, SearchIndex
from sightline.matching.readiness import Readiness
from sightline.matching.store import (
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


@dataclass(frozen=True)
class EnrolResult:
    templates_added: int
    subject_created: bool
    watchlists_created: tuple[str, ...]


def watchlist_threshold(record: WatchlistRecord) -> float | None:
    """The distance a list's target FMR converts to with the calibration table; None when it sets none (or the
    table cannot answer it any more, e.g. after a calibration change: the decision policy's threshold then applies)."""
    if record.target_fmr is None:
        return None
    try:
        return scores.distance_for_fmr(record.target_fmr)
    except scores.CalibrationError as error:
        log.warning(
            "watchlist %r: its target FMR has no threshold (%s); the policy's threshold applies", record.name, error
        )
        return None


class Gallery:
    def __init__(
        self,
        store: GalleryStore,
        max_distance: float,
        refresh_interval_s: float = 2.0,
        max_staleness_s: float = DEFAULT_MAX_STALENESS_S,
        mask_cache_size: int = DEFAULT_MASK_CACHE_SIZE,
    ) -> None:
        self.store = store
        self.index = SearchIndex(mask_cache_size=mask_cache_size)
        self.readiness = Readiness(stale_after_s=refresh_interval_s + max_staleness_s)
        self.max_distance = max_distance
        self._version = -1
        self._thresholds: dict[str, float] = {}
        self._next_expiry: float | None = None  # epoch seconds of the next membership expiry
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when the refresher must re-plan its sleep (an earlier expiry, stop)
        self._interval = refresh_interval_s
        self._failures = 0  # consecutive failed checks, for the retry backoff
        try:
            with self._write_lock:
                self.reload()
        except BaseException:
            self.readiness.close()
            raise
        self._refresher = threading.Thread(target=self._refresh_loop, name="gallery-refresh", daemon=True)
        self._refresher.start()

    # -- staying in step ---------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Everything again from the store: templates (decrypted), memberships, list thresholds. Hold the write lock."""
        version = self.store.version()
        self.store.take_written_versions()  # anything written so far is covered by this load
        now = datetime.now(UTC)
        self.index.replace_all(self.store.load_templates(at=now))
        self._load_lists(self.store.memberships(at=now).next_expiry)
        self._version = version
        self.readiness.checked()
        self._report_size()

    def _reload_memberships(self) -> None:
        """Memberships and list thresholds only: what an expiry or a list change needs. Hold the write lock."""
        state = self.store.memberships()
        self.index.replace_watchlists(state.watchlists)
        self._load_lists(state.next_expiry)

    def _forget_removed(self) -> set[str]:
        """Drop from the index the subjects deleted or erased elsewhere, and re-read memberships: ids only, nothing
        decrypted, so they stop matching here even when the full reload that follows fails (e.g. a template key this
        replica does not hold yet). Returns the enrolled subject ids. Hold the write lock."""
        enrolled = self.store.subject_ids()
        for subject_id in self.index.subject_ids() - enrolled:
            self.index.remove_subject(subject_id)
        self._reload_memberships()
        return enrolled

    def erased(self, subject_id: str) -> None:
        """An erasure notice: the subject leaves the index now, without the database (which may be unreachable), and
        the replica stops matching until the next check of the database, right away, confirms the erasure."""
        self.readiness.erasure_pending(subject_id)  # first: a reload already running may put the subject back
        self.index.remove_subject(subject_id)
        self._report_size()
        self._wake.set()

    def _load_lists(self, next_expiry: datetime | None) -> None:
        thresholds = {record.name: watchlist_threshold(record) for record in self.store.list_watchlists()}
        self._thresholds = {name: distance for name, distance in thresholds.items() if distance is not None}
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
        """One check of the database: confirm pending erasures, catch up with changes made elsewhere, expire lists."""
        pending = self.readiness.pending_erasures()
        with self._write_lock:
            version = self.store.version()
            behind = version != self._version
            enrolled = self._forget_removed() if behind or pending else None
            # The erased subjects are gone from the index and the database says what else was removed: in step.
            self.readiness.erasures_confirmed(pending)
            self.readiness.checked()
            if behind or (enrolled is not None and not enrolled.isdisjoint(pending)):
                self.reload()  # an erased id enrolled again since: the database, not the notice, has the last word
                log.info("gallery reloaded after a change elsewhere", extra={"templates": self.index.size})
            elif self._next_expiry is not None and time.time() >= self._next_expiry:
                self._reload_memberships()
                log.info("watchlist memberships reloaded: one expired")

    def _until_next_check(self) -> float:
        if self._failures:
            return Backoff(_RETRY_FIRST_S, self._interval).delay(self._failures)
        if self._next_expiry is None:
            return self._interval
        return max(0.0, min(self._interval, self._next_expiry - time.time()))

    def _written(self) -> None:
        """After this replica's own writes: skip the next reload unless another replica wrote in between."""
        versions = self.store.take_written_versions()
        if versions == list(range(self._version + 1, self._version + 1 + len(versions))):
            self._version += len(versions)
        # Otherwise leave the version behind: the refresher sees the difference and reloads everything.

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._refresher.join(timeout=5)
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
    ) -> EnrolResult:
        """Stores the subject, its new templates and its memberships; ``owner`` owns any list created on the way."""
        with self._write_lock:
            enrolment = self.store.enrol_subject(subject_id, display_name, list(watchlists), expires_at, owner)
            for vector, quality in zip(vectors, qualities, strict=True):
                template_id = self.store.add_template(subject_id, vector, model[0], model[1], quality)
                self.index.add(template_id, subject_id, vector)
            self._reload_memberships()
            self._written()
        self._report_size()
        return EnrolResult(len(vectors), enrolment.created, enrolment.watchlists_created)

    def remove(self, subject_id: str) -> SubjectRemoval:
        """Deletes (or erases) the subject with its templates and memberships, here and, through the version, on
        every other replica."""
        with self._write_lock:
            removal = self.store.remove_subject(subject_id)
            self.index.remove_subject(subject_id)
            self._written()
        self._report_size()
        return removal

    # -- watchlists --------------------------------------------------------------------------------------------

    def create_watchlist(
        self, name: str, purpose: str, owner: str, target_fmr: float | None, default_membership_days: int
    ) -> WatchlistRecord:
        with self._write_lock:
            record = self.store.create_watchlist(name, purpose, owner, target_fmr, default_membership_days)
            self._reload_memberships()
            self._written()
        return record

    def update_watchlist(
        self, name: str, purpose: str, owner: str, target_fmr: float | None, default_membership_days: int
    ) -> WatchlistRecord:
        with self._write_lock:
            record = self.store.update_watchlist(name, purpose, owner, target_fmr, default_membership_days)
            self._reload_memberships()
            self._written()
        return record

    def delete_watchlist(self, name: str) -> int | None:
        with self._write_lock:
            removed = self.store.delete_watchlist(name)
            self._reload_memberships()
            self._written()
        return removed

    def add_members(
        self, watchlist: str, subject_ids: Sequence[str], expires_at: datetime | None = None
    ) -> list[MembershipRecord]:
        with self._write_lock:
            memberships = self.store.add_members(watchlist, subject_ids, expires_at)
            self._reload_memberships()
            self._written()
        return memberships

    def remove_members(self, watchlist: str, subject_ids: Sequence[str]) -> list[str]:
        with self._write_lock:
            removed = self.store.remove_members(watchlist, subject_ids)
            self._reload_memberships()
            self._written()
        return removed

    # -- matching ----------------------------------------------------------------------------------------------

    def search(
        self, vectors: np.ndarray, top_k: int, watchlists: Sequence[str] = ()
    ) -> list[list[types_pb2.MatchCandidate]]:
        self.readiness.require()  # never match on an index that may still hold erased subjects
        results = self.index.search(vectors, top_k=top_k, watchlists=list(watchlists))
        thresholds = self._thresholds  # one snapshot for the whole batch
        return [[_candidate(c, thresholds) for c in candidates] for candidates in results]

    def within_threshold(self, candidate: types_pb2.MatchCandidate) -> bool:
        """Whether a candidate is within matching's own threshold: the most lenient of its lists' own thresholds,
        else ``max_distance`` (the decision policy may use other thresholds; this is for counts and audit)."""
        limit = max(candidate.watchlist_thresholds.values(), default=self.max_distance)
        return candidate.distance <= limit

    def verify(self, vector: np.ndarray, subject_id: str) -> types_pb2.Verification:
        self.readiness.require()
        distance = self.index.verify(vector, subject_id)
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
