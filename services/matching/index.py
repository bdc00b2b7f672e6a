"""In-memory exact search over the decrypted gallery: 1:N search and 1:1 verification by Euclidean distance.

The gallery is small enough (tens of thousands of 128-d templates) for exact search: one matrix product per batch of
probes, then a per-subject minimum, then ``argpartition`` for the top k. Results hold one candidate per subject (its
best template), because an operator reviews people, not templates.

Concurrency: mutations take an ``RLock`` and mark the index dirty; the first search afterwards builds an immutable
snapshot (a copy of the rows, regrouped by subject) under the lock, and the search itself runs on that snapshot
outside the lock.
So searches run concurrently with each other (numpy releases the GIL in the matrix product) and with enrolments,
and a search sees either all or none of a mutation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sightline.matching.templates import EMBEDDING_DIM

logger = logging.getLogger(__name__)

_INITIAL_CAPACITY = 1024


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
class _Snapshot:
    """An immutable, search-ready copy of the index: rows grouped by subject, segment ``s`` is ``starts[s]:ends[s]``."""

    matrix: np.ndarray
    sq_norms: np.ndarray
    template_ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    subjects: list[str]
    watchlists: list[tuple[str, ...]]
    position: dict[str, int]
    # Subject masks per watchlist filter; filled lazily, a racing duplicate fill is harmless.
    masks: dict[frozenset[str], np.ndarray] = field(default_factory=dict)

    def mask(self, wanted: frozenset[str]) -> np.ndarray:
        cached = self.masks.get(wanted)
        if cached is None:
            cached = np.fromiter((not wanted.isdisjoint(w) for w in self.watchlists), bool, len(self.watchlists))
            self.masks[wanted] = cached
        return cached


class SearchIndex:
    """Exact nearest-subject search over float32 templates; thread-safe."""

    def __init__(self, dim: int = EMBEDDING_DIM) -> None:
        self._dim = dim
        self._lock = threading.RLock()
        self._clear()

    # -- mutations ---------------------------------------------------------------------------------------------

    def replace_all(self, records: Iterable[IndexRecord]) -> None:
        """Replaces the whole content, e.g. after loading the gallery or noticing it changed elsewhere."""
        with self._lock:
            self._clear()
            for record in records:
                self._append(record.template_id, record.subject_id, record.vector, record.watchlists)
            logger.info("search index loaded: %d templates, %d subjects", self._n, self.subject_count)

    def add(self, template_id: int, subject_id: str, vector: np.ndarray, watchlists: Sequence[str] = ()) -> bool:
        """Adds one template; the subject's watchlists become the union with ``watchlists``.

        Returns False, changing nothing, when the template id is already present, so replayed events are harmless.
        """
        with self._lock:
            return self._append(template_id, subject_id, vector, watchlists)

    def set_watchlists(self, subject_id: str, watchlists: Sequence[str]) -> None:
        """Replaces a subject's watchlist membership (kept even before the subject has templates)."""
        with self._lock:
            self._watchlists[subject_id] = set(watchlists)
            self._dirty = True

    def remove_subject(self, subject_id: str) -> int:
        """Removes every template of the subject; returns how many were removed (0 if unknown)."""
        with self._lock:
            self._watchlists.pop(subject_id, None)
            code = self._code_of.pop(subject_id, None)
            if code is None:
                return 0
            del self._subject_of[code]
            keep = self._codes[: self._n] != code
            removed = int(self._n - keep.sum())
            self._tid_set.difference_update(self._tids[: self._n][~keep].tolist())
            self._buf, self._tids, self._codes = (
                np.ascontiguousarray(self._buf[: self._n][keep]),
                self._tids[: self._n][keep],
                self._codes[: self._n][keep],
            )
            self._n -= removed
            self._dirty = True
            return removed

    # -- queries -----------------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of templates."""
        return self._n

    @property
    def subject_count(self) -> int:
        """Number of subjects with at least one template."""
        return len(self._code_of)

    def search(self, probe: np.ndarray, top_k: int = 5, watchlists: Sequence[str] = ()) -> list[list[Candidate]]:
        """For each probe ([dim] or [K, dim]), the ``top_k`` closest subjects, nearest first.

        With ``watchlists``, only subjects on at least one of them are candidates.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        probes = self._check_probes(probe)
        snap = self._snapshot()
        if not snap.subjects:
            return [[] for _ in range(len(probes))]
        eligible = np.flatnonzero(snap.mask(frozenset(watchlists))) if watchlists else None
        if eligible is not None and eligible.size == 0:
            return [[] for _ in range(len(probes))]
        # Squared distances by expansion: one matrix product for all probes and templates.
        sq = snap.sq_norms[None, :] - 2.0 * (probes @ snap.matrix.T)
        per_subject = np.minimum.reduceat(sq, snap.starts, axis=1)
        columns = np.arange(len(snap.subjects)) if eligible is None else eligible
        if eligible is not None:
            per_subject = per_subject[:, eligible]
        k = min(top_k, per_subject.shape[1])
        best = np.argpartition(per_subject, k - 1, axis=1)[:, :k] if k < per_subject.shape[1] else None
        results = []
        for row, vector in enumerate(probes):
            chosen = columns[best[row]] if best is not None else columns
            results.append(self._exact_candidates(snap, vector, chosen))
        return results

    def verify(self, probe: np.ndarray, subject_id: str) -> float | None:
        """Smallest distance from the probe to the subject's templates; None if the subject has none."""
        vector = self._check_probes(probe)
        if len(vector) != 1:
            raise ValueError("verify takes a single probe vector")
        snap = self._snapshot()
        position = snap.position.get(subject_id)
        if position is None:
            return None
        segment = snap.matrix[snap.starts[position] : snap.ends[position]]
        return float(np.sqrt(np.min(np.sum((segment - vector[0]) ** 2, axis=1))))

    # -- internals ---------------------------------------------------------------------------------------------

    def _clear(self) -> None:
        self._buf = np.empty((_INITIAL_CAPACITY, self._dim), dtype=np.float32)
        self._tids = np.empty(_INITIAL_CAPACITY, dtype=np.int64)
        self._codes = np.empty(_INITIAL_CAPACITY, dtype=np.int64)
        self._n = 0
        self._tid_set: set[int] = set()
        self._code_of: dict[str, int] = {}
        self._subject_of: dict[int, str] = {}
        self._next_code = 0
        self._watchlists: dict[str, set[str]] = {}
        self._dirty = True
        self._snap: _Snapshot | None = None

    def _append(self, template_id: int, subject_id: str, vector: np.ndarray, watchlists: Sequence[str]) -> bool:
        template_id = int(template_id)
        if template_id in self._tid_set:
            return False
        row = self._check_probes(vector)
        if row.shape[0] != 1:
            raise ValueError(f"a template is one vector of shape ({self._dim},), got {np.shape(vector)}")
        self._ensure_capacity(self._n + 1)
        code = self._code_of.get(subject_id)
        if code is None:
            code = self._code_of[subject_id] = self._next_code
            self._subject_of[code] = subject_id
            self._next_code += 1
        self._buf[self._n] = row[0]
        self._tids[self._n] = template_id
        self._codes[self._n] = code
        self._n += 1
        self._tid_set.add(template_id)
        self._watchlists.setdefault(subject_id, set()).update(watchlists)
        self._dirty = True
        return True

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= len(self._buf):
            return
        capacity = max(needed, 2 * len(self._buf))
        for name in ("_buf", "_tids", "_codes"):
            old = getattr(self, name)
            new = np.empty((capacity, *old.shape[1:]), dtype=old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def _snapshot(self) -> _Snapshot:
        with self._lock:
            if self._dirty or self._snap is None:
                self._snap = self._build_snapshot()
                self._dirty = False
            return self._snap

    def _build_snapshot(self) -> _Snapshot:
        n = self._n
        order = np.argsort(self._codes[:n], kind="stable")
        codes = self._codes[:n][order]
        boundaries = np.flatnonzero(np.diff(codes)) + 1 if n else np.empty(0, dtype=np.int64)
        starts = np.concatenate(([0], boundaries)).astype(np.intp) if n else np.empty(0, dtype=np.intp)
        ends = np.append(starts[1:], n).astype(np.intp)
        matrix = np.ascontiguousarray(self._buf[:n][order])
        subjects = [self._subject_of[int(c)] for c in codes[starts]]
        return _Snapshot(
            matrix=matrix,
            sq_norms=np.einsum("ij,ij->i", matrix, matrix),
            template_ids=self._tids[:n][order].copy(),
            starts=starts,
            ends=ends,
            subjects=subjects,
            watchlists=[tuple(sorted(self._watchlists.get(s, ()))) for s in subjects],
            position={s: i for i, s in enumerate(subjects)},
        )

    def _check_probes(self, probe: np.ndarray) -> np.ndarray:
        array = np.asarray(probe, dtype=np.float32)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self._dim:
            raise ValueError(f"expected vectors of shape ({self._dim},) or (K, {self._dim}), got {np.shape(probe)}")
        if not np.all(np.isfinite(array)):
            raise ValueError("vector holds NaN or infinite values")
        return array

    @staticmethod
    def _exact_candidates(snap: _Snapshot, vector: np.ndarray, chosen: np.ndarray) -> list[Candidate]:
        # Distances by expansion lose a little float32 precision; recompute the few chosen ones directly.
        candidates = []
        for s in chosen.tolist():
            segment = snap.matrix[snap.starts[s] : snap.ends[s]]
            sq = np.sum((segment - vector) ** 2, axis=1)
            j = int(np.argmin(sq))
            candidates.append(
                Candidate(
                    subject_id=snap.subjects[s],
                    distance=float(np.sqrt(sq[j])),
                    watchlists=snap.watchlists[s],
                    template_id=int(snap.template_ids[snap.starts[s] + j]),
                )
            )
        candidates.sort(key=lambda c: (c.distance, c.subject_id))
        return candidates
