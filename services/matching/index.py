"""Exact in-memory search: 1:N search and 1:1 verification by Euclidean distance, and the types every index shares.

``SearchIndex`` is the reference the gallery's ``ann.AnnIndex`` is measured and tested against (``sightline bench
search``, tests/unit/test_ann_index.py); ``Candidate``, ``IndexRecord``, ``IndexStats`` and ``checked_vectors`` are
shared with it. Exact search is one matrix product per batch of probes and one ``argpartition``. Results hold one
candidate per subject (its best template), because an operator reviews people, not templates. To get the top k
subjects without grouping rows by subject, the search takes the ``k * T`` nearest rows, where T is the largest number
of templates any subject has: among them are at least k distinct subjects, and every subject's nearest row ranks
before the k-th subject's, so keeping the first row of each subject is exact.

Concurrency: mutations take an ``RLock``. A search copies a handful of references under the lock (a ``_View``) and
computes outside it, so searches run concurrently with each other (numpy releases the GIL in the matrix product) and
with enrolments. That is safe because the rows a search may return are only ever appended past the view's row count,
or written to fresh arrays (growth, compaction, ``replace_all``), never modified in place.

Some subjects are for 1:1 verification only: a gate session's own template (``session-<id>``, common/subjects.py) is
verified against the session's frames but must never turn up as a candidate of anyone's 1:N search. A search masks
their rows out, as it masks out the subjects on none of the watchlists it is limited to.

Removal frees memory. Removing a searchable subject (a deletion, an erasure) copies the remaining rows to fresh arrays
at once, so its descriptors leave the index immediately. Session subjects come and go at the rate of gate sessions,
and a copy of the whole gallery per session would be far too slow: their rows, which no search ever reads (they are
masked out of every search, and ``verify`` reads rows under the lock), are zeroed in place and left as dead rows, and
the index compacts (fresh arrays, fresh subject codes) once dead rows are a quarter of all rows. So the rows, the
per-subject lists and the memory stay bounded by the live gallery, however many sessions pass.

The masks of watchlist combinations are cached, least recently used first out, at most ``mask_cache_size`` of them
(each is one byte per row): a stream may name any number of distinct watchlist sets.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sightline.common.models.descriptor_spec import DESCRIPTOR_SIZE
from sightline.common.subjects import is_session_subject

logger = logging.getLogger(__name__)

_INITIAL_CAPACITY = 1024
DEFAULT_MASK_CACHE_SIZE = 64
# Dead (removed session) rows are compacted away once they are this share of all rows, and at least this many: the
# copy then costs a few rows per removal, amortised, and dead rows never outnumber a third of the live ones.
_COMPACT_DEAD_SHARE = 0.25
_COMPACT_MIN_DEAD = 64


@dataclass(frozen=True)
class Candidate:
    """One subject in a search result, with the distance of its closest template."""

    subject_id: str
    distance: float
    watchlists: tuple[str, ...]
    template_id: int = -1


class IndexRecord(Protocol):
    """What ``replace_all`` needs of each record; ``store.TemplateRecord`` fits."""

    template_id: int
    subject_id: str
    vector: np.ndarray
    watchlists: Sequence[str]


@dataclass(frozen=True)
class IndexStats:
    """How much the index holds, for tests and metrics: live content, allocated rows and bytes, cached masks."""

    templates: int  # live templates
    subjects: int  # live subjects
    rows: int  # rows in use, dead (removed, not yet compacted) ones included
    dead_rows: int
    capacity: int  # rows allocated
    subject_slots: int  # per-subject entries (codes), dead ones included
    cached_masks: int
    nbytes: int  # bytes of the row arrays and cached masks


@dataclass(frozen=True)
class _View:
    """What one search needs, captured under the lock; the rows ``[:n]`` it may return never change afterwards (a
    removed verify-only subject's, which it never returns, may be zeroed)."""

    n: int
    matrix: np.ndarray
    sq_norms: np.ndarray
    template_ids: np.ndarray
    codes: np.ndarray
    subject_of: list[str]
    watchlists_of: list[tuple[str, ...]]
    max_per_subject: int
    row_mask: np.ndarray | None


class SearchIndex:
    """Exact nearest-subject search over float32 templates; thread-safe."""

    def __init__(
        self,
        dim: int = DESCRIPTOR_SIZE,
        verify_only: Callable[[str], bool] = is_session_subject,
        mask_cache_size: int = DEFAULT_MASK_CACHE_SIZE,
    ) -> None:
        """``verify_only``: whether a subject id is for 1:1 verification only (never a 1:N candidate);
        ``mask_cache_size``: how many watchlist masks to keep between mutations (at least 1)."""
        if mask_cache_size < 1:
            raise ValueError(f"mask_cache_size must be at least 1, got {mask_cache_size}")
        self._dim = dim
        self._verify_only = verify_only
        self._mask_cache_size = mask_cache_size
        self._lock = threading.RLock()
        self._reset()

    # -- mutations ---------------------------------------------------------------------------------------------

    def replace_all(self, records: Iterable[IndexRecord]) -> None:
        """Replaces the whole content, e.g. after loading the gallery or noticing it changed elsewhere."""
        records = list(records)
        vectors = checked_vectors(self._dim, np.stack([r.vector for r in records]) if records else None)
        with self._lock:
            # Headroom, so the first enrolments after a load do not copy the whole matrix to grow it.
            self._reset(capacity=max(len(records) + len(records) // 4, _INITIAL_CAPACITY))
            for row, record in enumerate(records):
                self._append(int(record.template_id), record.subject_id, vectors[row], record.watchlists)
            logger.info("search index loaded: %d templates, %d subjects", self._n, self.subject_count)

    def add(self, template_id: int, subject_id: str, vector: np.ndarray, watchlists: Sequence[str] = ()) -> bool:
        """Adds one template; the subject's watchlists become the union with ``watchlists``.

        Returns False, changing nothing, when the template id is already present, so replayed events are harmless.
        """
        row = checked_vectors(self._dim, vector)
        if row.shape[0] != 1:
            raise ValueError(f"a template is one vector of shape ({self._dim},), got {np.shape(vector)}")
        with self._lock:
            return self._append(int(template_id), subject_id, row[0], watchlists)

    def replace_watchlists(self, watchlists: Mapping[str, Sequence[str]]) -> None:
        """Sets every subject's watchlists at once (a subject missing from ``watchlists`` is on none), e.g. when a
        membership expired: far cheaper than ``replace_all``, which would decrypt the whole gallery again."""
        with self._lock:
            # A fresh list, so running searches keep the one their view captured.
            self._watchlists_of = [tuple(sorted(set(watchlists.get(subject, ())))) for subject in self._subject_of]
            self._masks.clear()

    def remove_subject(self, subject_id: str) -> int:
        """Removes every template of the subject; returns how many were removed (0 if unknown).

        A searchable subject's rows leave at once (fresh arrays); a verify-only subject's rows are zeroed in place and
        compacted away later (see the module docstring)."""
        with self._lock:
            code = self._code_of.pop(subject_id, None)
            if code is None:
                return 0
            removed = self._count_of.pop(code)
            rows = np.flatnonzero(self._codes[: self._n] == code)
            self._tid_set.difference_update(self._tids[rows].tolist())
            self._max_per_subject = max(self._count_of.values(), default=0)
            self._masks.clear()
            if self._searchable_of[code]:
                self._dead_rows += removed
                self._compact()
            else:
                self._verify_only_count -= 1
                self._buf[rows] = 0.0  # its descriptors leave memory now; only verify reads these rows, locked
                self._dead_rows += removed
                if self._dead_rows >= max(_COMPACT_MIN_DEAD, _COMPACT_DEAD_SHARE * self._n):
                    self._compact()
            return removed

    # -- queries -----------------------------------------------------------------------------------------------

    def subject_ids(self) -> set[str]:
        """The subjects with at least one template in the index."""
        with self._lock:
            return set(self._code_of)

    @property
    def size(self) -> int:
        """Number of templates."""
        return self._n - self._dead_rows

    def stats(self) -> IndexStats:
        with self._lock:
            masks = sum(mask.nbytes for mask in self._masks.values())
            arrays = sum(getattr(self, name).nbytes for name in ("_buf", "_sq", "_tids", "_codes"))
            return IndexStats(
                templates=self._n - self._dead_rows,
                subjects=len(self._code_of),
                rows=self._n,
                dead_rows=self._dead_rows,
                capacity=len(self._buf),
                subject_slots=len(self._subject_of),
                cached_masks=len(self._masks),
                nbytes=arrays + masks,
            )

    @property
    def subject_count(self) -> int:
        """Number of subjects with at least one template."""
        return len(self._code_of)

    def search(self, probe: np.ndarray, top_k: int = 5, watchlists: Sequence[str] = ()) -> list[list[Candidate]]:
        """For each probe ([dim] or [K, dim]), the ``top_k`` closest subjects, nearest first.

        With ``watchlists``, only subjects on at least one of them are candidates; verify-only subjects never are.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        probes = checked_vectors(self._dim, probe)
        view = self._view(frozenset(watchlists))
        rows = np.arange(view.n) if view.row_mask is None else np.flatnonzero(view.row_mask)
        if rows.size == 0:
            return [[] for _ in range(len(probes))]
        # Squared distances by expansion (without the probe's own norm, which does not change the order).
        sq = view.sq_norms[: view.n][None, :] - 2.0 * (probes @ view.matrix[: view.n].T)
        if view.row_mask is not None:
            sq = sq[:, rows]
        wanted = min(rows.size, top_k * view.max_per_subject)
        if wanted < rows.size:
            nearest = np.argpartition(sq, wanted - 1, axis=1)[:, :wanted]
        else:
            nearest = np.broadcast_to(np.arange(rows.size), (len(probes), rows.size))
        return [self._candidates(view, vector, rows[nearest[i]], top_k) for i, vector in enumerate(probes)]

    def verify(self, probe: np.ndarray, subject_id: str) -> float | None:
        """Smallest distance from the probe to the subject's templates; None if the subject has none."""
        vector = checked_vectors(self._dim, probe)
        if len(vector) != 1:
            raise ValueError("verify takes a single probe vector")
        with self._lock:  # the subject's few rows are read under the lock: a verify-only row may be zeroed in place
            code = self._code_of.get(subject_id)
            if code is None:
                return None
            segment = self._buf[np.flatnonzero(self._codes[: self._n] == code)]
            return float(np.sqrt(np.min(np.sum((segment - vector[0]) ** 2, axis=1))))

    # -- internals ---------------------------------------------------------------------------------------------

    def _reset(self, capacity: int = _INITIAL_CAPACITY) -> None:
        self._buf = np.empty((capacity, self._dim), dtype=np.float32)
        self._sq = np.empty(capacity, dtype=np.float32)
        self._tids = np.empty(capacity, dtype=np.int64)
        self._codes = np.empty(capacity, dtype=np.int64)
        self._n = 0
        self._tid_set: set[int] = set()
        self._code_of: dict[str, int] = {}
        self._count_of: dict[int, int] = {}
        # Indexed by code; append-only (codes are never reused), so views may share them.
        self._subject_of: list[str] = []
        self._watchlists_of: list[tuple[str, ...]] = []
        self._searchable_of: list[bool] = []
        self._verify_only_count = 0  # present subjects that are verify-only: without any, no search needs a mask
        self._dead_rows = 0  # rows of removed subjects not compacted away yet: while any, every search needs a mask
        self._max_per_subject = 0
        self._masks: OrderedDict[frozenset[str], np.ndarray] = OrderedDict()

    def _compact(self) -> None:
        """Fresh arrays and fresh subject codes holding the live rows only. Hold the lock."""
        live_codes = sorted(self._count_of)
        renumber = np.full(len(self._subject_of), -1, dtype=np.int64)
        renumber[live_codes] = np.arange(len(live_codes))
        keep = renumber[self._codes[: self._n]] >= 0
        live = int(np.count_nonzero(keep))
        capacity = max(live + live // 4, _INITIAL_CAPACITY)
        for name, values in (("_buf", self._buf), ("_sq", self._sq), ("_tids", self._tids)):
            fresh = np.empty((capacity, *values.shape[1:]), dtype=values.dtype)
            fresh[:live] = values[: self._n][keep]
            setattr(self, name, fresh)
        codes = np.empty(capacity, dtype=np.int64)
        codes[:live] = renumber[self._codes[: self._n][keep]]
        self._codes = codes
        # Fresh lists too: running searches keep the ones their views captured.
        self._subject_of = [self._subject_of[code] for code in live_codes]
        self._watchlists_of = [self._watchlists_of[code] for code in live_codes]
        self._searchable_of = [self._searchable_of[code] for code in live_codes]
        self._code_of = {subject: index for index, subject in enumerate(self._subject_of)}
        self._count_of = {int(renumber[code]): count for code, count in self._count_of.items()}
        self._n, self._dead_rows = live, 0
        self._masks.clear()

    def _append(self, template_id: int, subject_id: str, vector: np.ndarray, watchlists: Sequence[str]) -> bool:
        if template_id in self._tid_set:
            return False
        self._ensure_capacity(self._n + 1)
        code = self._code_of.get(subject_id)
        if code is None:
            code = self._code_of[subject_id] = len(self._subject_of)
            self._subject_of.append(subject_id)
            self._watchlists_of.append(())
            self._searchable_of.append(not self._verify_only(subject_id))
            self._verify_only_count += not self._searchable_of[code]
            self._count_of[code] = 0
        if watchlists and not set(watchlists) <= set(self._watchlists_of[code]):
            self._watchlists_of[code] = tuple(sorted(set(self._watchlists_of[code]) | set(watchlists)))
        self._buf[self._n] = vector
        self._sq[self._n] = float(np.dot(vector, vector))
        self._tids[self._n] = template_id
        self._codes[self._n] = code
        self._n += 1
        self._tid_set.add(template_id)
        self._count_of[code] += 1
        self._max_per_subject = max(self._max_per_subject, self._count_of[code])
        self._masks.clear()
        return True

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= len(self._buf):
            return
        capacity = max(needed, 2 * len(self._buf))
        for name in ("_buf", "_sq", "_tids", "_codes"):
            old = getattr(self, name)
            new = np.empty((capacity, *old.shape[1:]), dtype=old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def _view(self, watchlists: frozenset[str]) -> _View:
        """The arrays as they are now, with the rows a 1:N search on ``watchlists`` may return."""
        with self._lock:
            return _View(
                n=self._n,
                matrix=self._buf,
                sq_norms=self._sq,
                template_ids=self._tids,
                codes=self._codes,
                subject_of=self._subject_of,
                watchlists_of=self._watchlists_of,
                max_per_subject=max(self._max_per_subject, 1),
                row_mask=self._row_mask(watchlists),
            )

    def _row_mask(self, watchlists: frozenset[str]) -> np.ndarray | None:
        """Rows a 1:N search may return: a live searchable subject's, on any of ``watchlists`` when there are some;
        None for every row. Cached until the next mutation, the least recently used dropped past the cache size."""
        if not watchlists and not self._verify_only_count and not self._dead_rows:
            return None
        mask = self._masks.get(watchlists)
        if mask is not None:
            self._masks.move_to_end(watchlists)
            return mask
        # Dead rows are always a removed verify-only subject's (a searchable one's are compacted away at once), so
        # ``_searchable_of`` already leaves them out.
        eligible = np.fromiter(self._searchable_of, bool, len(self._searchable_of))
        if watchlists:
            eligible &= np.fromiter(
                (not watchlists.isdisjoint(names) for names in self._watchlists_of), bool, len(self._watchlists_of)
            )
        mask = self._masks[watchlists] = eligible[self._codes[: self._n]]
        while len(self._masks) > self._mask_cache_size:
            self._masks.popitem(last=False)
        return mask

    @staticmethod
    def _candidates(view: _View, vector: np.ndarray, rows: np.ndarray, top_k: int) -> list[Candidate]:
        # Exact distances for the few rows kept: the expansion above loses a little float32 precision.
        distances = np.sqrt(np.sum((view.matrix[rows] - vector) ** 2, axis=1))
        candidates: list[Candidate] = []
        seen: set[int] = set()
        for i in np.argsort(distances, kind="stable").tolist():
            code = int(view.codes[rows[i]])
            if code in seen:
                continue
            seen.add(code)
            candidates.append(
                Candidate(
                    subject_id=view.subject_of[code],
                    distance=float(distances[i]),
                    watchlists=view.watchlists_of[code],
                    template_id=int(view.template_ids[rows[i]]),
                )
            )
            if len(candidates) == top_k:
                break
        return candidates


def checked_vectors(dim: int, probe: np.ndarray | None) -> np.ndarray:
    """``probe`` as a float32 [K, dim] array (one vector or several), or a ValueError saying what is wrong."""
    if probe is None:
        return np.empty((0, dim), dtype=np.float32)
    array = np.asarray(probe, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"expected vectors of shape ({dim},) or (K, {dim}), got {np.shape(probe)}")
    if not np.all(np.isfinite(array)):
        raise ValueError("vector holds NaN or infinite values")
    return array
