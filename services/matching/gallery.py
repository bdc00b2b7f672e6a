"""The gallery as the matching service sees it: the encrypted store, the in-memory index, and how they stay in step.

Writes go to the store first and then to this replica's index; other replicas notice the store's version change
within ``refresh_interval_s`` and reload (an erasure or a deletion included). Searches only ever touch the index.

Memberships that expire change nothing in the database, so no version moves: the refresher also wakes up at the
next expiry (``GalleryStore.memberships().next_expiry``) and re-reads the memberships alone, so an expired membership
stops matching at its expiry time on every replica without anyone calling anything.

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
from sightline.matching.index import Candidate, SearchIndex
from sightline.matching.store import (
    GalleryStore,
    MembershipRecord,
    SubjectRemoval,
    WatchlistRecord,
)
from sightline.v1 import types_pb2

log = logging.getLogger(__name__)
SERVICE = "matching"


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
        log.warning("watchlist %r: its target FMR has no threshold (%s); the policy's threshold applies",
                    record.name, error)  # fmt: skip
        return None


class Gallery:
    def __init__(self, store: GalleryStore, max_distance: float, refresh_interval_s: float = 2.0) -> None:
        self.store = store
        self.index = SearchIndex()
        self.max_distance = max_distance
        self._version = -1
        self._thresholds: dict[str, float] = {}
        self._next_expiry: float | None = None  # epoch seconds of the next membership expiry
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when the refresher must re-plan its sleep (an earlier expiry, stop)
        self._interval = refresh_interval_s
        with self._write_lock:
            self.reload()
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
        self._report_size()

    def _reload_memberships(self) -> None:
        """Memberships and list thresholds only: what an expiry or a list change needs. Hold the write lock."""
        state = self.store.memberships()
        self.index.replace_watchlists(state.watchlists)
        self._load_lists(state.next_expiry)

    def _forget_removed(self) -> None:
        """Drop from the index the subjects deleted or erased elsewhere, and re-read memberships: ids only, nothing
        decrypted, so they stop matching here even when the full reload that follows fails (e.g. a template key this
        replica does not hold yet). Hold the write lock."""
        for subject_id in self.index.subject_ids() - self.store.subject_ids():
            self.index.remove_subject(subject_id)
        self._reload_memberships()

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
                with self._write_lock:
                    if self.store.version() != self._version:
                        self._forget_removed()
                        self.reload()
                        log.info("gallery reloaded after a change elsewhere", extra={"templates": self.index.size})
                    elif self._next_expiry is not None and time.time() >= self._next_expiry:
                        self._reload_memberships()
                        log.info("watchlist memberships reloaded: one expired")
            except Exception:  # noqa: BLE001 - a database hiccup must not stop the refresher
                log.exception("gallery refresh failed; will retry")

    def _until_next_check(self) -> float:
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
        self.store.close()

    # -- subjects ----------------------------------------------------------------------------------------------

    def enroll(self, subject_id: str, display_name: str, watchlists: Sequence[str], vectors: Sequence[np.ndarray],
               model: tuple[str, str], qualities: Sequence[float], expires_at: datetime | None = None,
               owner: str = "") -> EnrolResult:  # fmt: skip
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

    def create_watchlist(self, name: str, purpose: str, owner: str, target_fmr: float | None,
                         default_membership_days: int) -> WatchlistRecord:  # fmt: skip
        with self._write_lock:
            record = self.store.create_watchlist(name, purpose, owner, target_fmr, default_membership_days)
            self._reload_memberships()
            self._written()
        return record

    def update_watchlist(self, name: str, purpose: str, owner: str, target_fmr: float | None,
                         default_membership_days: int) -> WatchlistRecord:  # fmt: skip
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

    def add_members(self, watchlist: str, subject_ids: Sequence[str],
                    expires_at: datetime | None = None) -> list[MembershipRecord]:  # fmt: skip
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

    def search(self, vectors: np.ndarray, top_k: int, watchlists: Sequence[str] = ()) -> list[list[types_pb2.MatchCandidate]]:  # noqa: E501
        results = self.index.search(vectors, top_k=top_k, watchlists=list(watchlists))
        thresholds = self._thresholds  # one snapshot for the whole batch
        return [[_candidate(c, thresholds) for c in candidates] for candidates in results]

    def within_threshold(self, candidate: types_pb2.MatchCandidate) -> bool:
        """Whether a candidate is within matching's own threshold: the most lenient of its lists' own thresholds,
        else ``max_distance`` (the decision policy may use other thresholds; this is for counts and audit)."""
        limit = max(candidate.watchlist_thresholds.values(), default=self.max_distance)
        return candidate.distance <= limit

    def verify(self, vector: np.ndarray, subject_id: str) -> types_pb2.Verification:
        distance = self.index.verify(vector, subject_id)
        if distance is None:
            return types_pb2.Verification(subject_id=subject_id, subject_found=False, verified=False)
        return types_pb2.Verification(
            subject_id=subject_id, distance=distance, similarity=scores.similarity(distance),
            verified=distance <= self.max_distance, subject_found=True, fmr=scores.fmr(distance),
        )  # fmt: skip

    def _report_size(self) -> None:
        telemetry.GALLERY_TEMPLATES.labels(SERVICE).set(self.index.size)
        telemetry.GALLERY_SUBJECTS.labels(SERVICE).set(self.index.subject_count)


def _candidate(found: Candidate, thresholds: dict[str, float]) -> types_pb2.MatchCandidate:
    return types_pb2.MatchCandidate(
        subject_id=found.subject_id, distance=found.distance, similarity=scores.similarity(found.distance),
        watchlists=sorted(found.watchlists), fmr=scores.fmr(found.distance),
        watchlist_thresholds={name: thresholds[name] for name in found.watchlists if name in thresholds},
    )  # fmt: skip
