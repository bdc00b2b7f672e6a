"""Approximate 1:N search for large galleries: an IVF index (faiss) shortlists, float32 vectors re-rank exactly.

``AnnIndex`` has the public interface of ``index.SearchIndex`` (``replace_all``, ``add``, ``replace_watchlists``,
``remove_subject``, ``subject_ids``, ``size``, ``stats``, ``subject_count``, ``search``, ``verify``), the exact index
it is measured against; the gallery holds an ``AnnIndex``, which itself searches exactly below
``AnnSettings.exact_below`` templates. Why faiss IVF and not
HNSW (faiss's or usearch's): measured in docs/benchmarks.md; in short, at 1M templates on one core it reaches the
same recall in a fraction of the memory and build time, and it deletes entries for real.

This module is the index itself: its settings, its mutations, retraining, and its locking. The parts it is made of:
``ann_state`` (the slots, subjects and watchlists one content is), ``ann_ivf`` (the faiss IVF), ``ann_masks`` (the
per-watchlist-set masks of the slots a search may return), ``ann_search`` (how a search runs), ``ann_lock`` (the
read/write lock) and ``ann_dump`` (the dump format).

Removal is at once: ``remove_subject`` first hides the subject from every search that starts afterwards (a set the
searches read without a lock), then takes it out of the IVF (its code is zeroed before faiss drops it), zeroes its
float32 rows and frees its slots for later enrolments. So a removed subject never comes back from a search, even
while a long operation (a dump, a ``replace_all``) holds the index.

Concurrency: searches and ``verify`` share a read lock and run in parallel (faiss and numpy release the GIL);
mutations are serialised by a mutex and take the write lock only for their short in-memory step. ``replace_all``
builds the new content outside the write lock (searches go on against the old one) and swaps it in. Retraining the
IVF when the gallery has grown ``retrain_growth`` times past the size it was trained on runs on a background thread;
mutations meanwhile are remembered (the slots they touched) and replayed onto the new IVF before it is swapped in.

Memory per template at 1M, one template per subject (``sightline bench search --gallery 1000000``): 942 B of
resident memory: the float32 vector 512 B and its norm 4 B, template id, subject code and next-slot link 16 B, the
template-id lookup 16 B, the IVF's 8-bit code and id 136 B plus its id hash map (~40 B), and per subject its id
string, dict entry and 17 B of arrays.

``dump``/``load`` write and read the whole state (vectors, bookkeeping, watchlists, the IVF) as one stream, for
snapshots; encryption is the caller's.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sightline.common.models.descriptor_spec import DESCRIPTOR_SIZE
from sightline.common.subjects import is_session_subject
from sightline.matching.ann_dump import read_state, write_state
from sightline.matching.ann_ivf import Ivf
from sightline.matching.ann_lock import ReadWriteLock
from sightline.matching.ann_masks import MaskCache
from sightline.matching.ann_search import ann_shortlists, candidates, exact_shortlists
from sightline.matching.ann_state import State
from sightline.matching.index import (
    DEFAULT_MASK_CACHE_SIZE,
    Candidate,
    IndexRecord,
    IndexStats,
    checked_vectors,
)

logger = logging.getLogger(__name__)

DEFAULT_EXACT_BELOW = 20_000


@dataclass(frozen=True)
class AnnSettings:
    """How ``AnnIndex`` searches; the defaults are the ones measured in docs/benchmarks.md."""

    exact_below: int = DEFAULT_EXACT_BELOW  # fewer searchable templates: no IVF, exact search
    lists: int = 0  # IVF lists; 0: a power of two near 4 sqrt(n) when trained
    probes: int = 0  # lists scanned per probe; 0: lists / 32, at least 32 (or all lists, when fewer)
    shortlist: int = 32  # rows re-ranked exactly per probe (at least top_k x the most templates of one subject)
    exact_rows: int = 4_096  # a search allowed at most this many rows is exact over them...
    exact_share: float = 0.01  # ... or at most this share of the IVF's rows...
    exact_rows_max: int = 16_384  # ... but never more rows than this (exact search costs ~0.1 ms per 1,000 rows)
    retrain_growth: float = 4.0  # retrain once the searchable templates are this many times those trained on
    auto_retrain: bool = True  # retrain on a background thread when that happens (else call ``retrain``)
    threads: int = 1  # faiss (OpenMP) threads; process-wide
    mask_cache_size: int = DEFAULT_MASK_CACHE_SIZE


def auto_lists(templates: int) -> int:
    """IVF lists for a gallery of this size: the power of two nearest 4 sqrt(n), between 16 and 65,536."""
    return int(min(65_536, max(16, 2 ** round(math.log2(max(4 * math.sqrt(max(templates, 1)), 1))))))


def auto_probes(lists: int) -> int:
    return min(lists, max(32, lists // 32))


class AnnIndex:
    """Nearest-subject search over float32 templates: IVF shortlist, exact re-ranking; thread-safe."""

    def __init__(
        self,
        dim: int = DESCRIPTOR_SIZE,
        verify_only: Callable[[str], bool] = is_session_subject,
        settings: AnnSettings | None = None,
    ) -> None:
        self._settings = settings or AnnSettings()
        if self._settings.mask_cache_size < 1:
            raise ValueError(f"mask_cache_size must be at least 1, got {self._settings.mask_cache_size}")
        self._dim = dim
        self._verify_only = verify_only
        self._mutex = threading.RLock()  # serialises mutations (and dumps against them)
        self._rw = ReadWriteLock()  # searches read; the in-memory step of a mutation writes
        self._masks = MaskCache(self._settings.mask_cache_size)  # watchlist masks; searches fill it
        self._hidden: set[str] = set()  # subjects being removed: no search returns them from now on
        self._journal: set[int] | None = None  # slots touched while a retraining runs
        self._retrainer: threading.Thread | None = None
        self._s = State(dim)
        import faiss  # here, not at module import: make_index's exact branch does not need it

        faiss.omp_set_num_threads(self._settings.threads)

    # -- mutations ---------------------------------------------------------------------------------------------

    def replace_all(self, records: Iterable[IndexRecord]) -> None:
        """Replaces the whole content, e.g. after loading the gallery. The new content (and its IVF) is built while
        searches go on against the old one; mutations wait for it."""
        records = list(records)
        vectors = np.stack([r.vector for r in records]) if records else None
        self.load_arrays(
            np.array([int(r.template_id) for r in records], dtype=np.int64),
            [r.subject_id for r in records],
            checked_vectors(self._dim, vectors),
            [r.watchlists for r in records],
        )

    def load_arrays(
        self,
        template_ids: np.ndarray,
        subject_ids: Sequence[str],
        vectors: np.ndarray,
        watchlists: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """``replace_all`` from arrays (row i: template ``template_ids[i]`` of ``subject_ids[i]``), without a record
        object per template; a template id given twice keeps its first row."""
        vectors = checked_vectors(self._dim, vectors)
        if not len(template_ids) == len(subject_ids) == len(vectors):
            raise ValueError("template_ids, subject_ids and vectors must have the same length")
        with self._mutex:
            state = State.bulk(
                np.asarray(template_ids, dtype=np.int64), subject_ids, vectors, watchlists, self._verify_only
            )
            if state.searchable_templates >= self._settings.exact_below:
                self._train(state)
            with self._rw.writing():
                self._s = state
                self._journal = None  # a retraining of the old content is void
                self._masks.clear()
            logger.info("ANN index loaded: %d templates, %d subjects", state.templates, len(state.code_of))

    def add(self, template_id: int, subject_id: str, vector: np.ndarray, watchlists: Sequence[str] = ()) -> bool:
        """Adds one template; the subject's watchlists become the union with ``watchlists``. Returns False, changing
        nothing, when the template id is already present."""
        row = checked_vectors(self._dim, vector)
        if row.shape[0] != 1:
            raise ValueError(f"a template is one vector of shape ({self._dim},), got {np.shape(vector)}")
        with self._mutex:
            state = self._s
            if state.tids.contains(int(template_id), state.tid):
                return False
            searchable = not self._verify_only(subject_id)
            with self._rw.writing():
                slot, _ = state.store(int(template_id), subject_id, row[0], searchable)
                code = int(state.code[slot])
                names = state.wl_sets[state.wlset[code]]
                if watchlists and not set(watchlists) <= set(names):
                    state.wlset[code] = state.watchlist_id(set(names) | set(watchlists))
                    self._masks.clear()
                if state.searchable[code]:
                    if state.ivf is not None:
                        state.ivf.add(np.array([slot]), row)
                    self._masks.added(state, slot, code, self._exact_limit(state))
                self._touched([slot])
            self._maybe_retrain(state)
            return True

    def replace_watchlists(self, watchlists: Mapping[str, Sequence[str]]) -> None:
        """Sets every subject's watchlists at once (a subject missing from ``watchlists`` is on none)."""
        with self._mutex:
            state = self._s
            wlset = np.zeros_like(state.wlset)
            for code, subject in enumerate(state.subject_of):  # outside the write lock: searches go on meanwhile
                if subject is not None and subject in watchlists:
                    wlset[code] = state.watchlist_id(watchlists[subject])
            with self._rw.writing():
                state.wlset = wlset
                self._masks.clear()

    def set_watchlists(self, subject_id: str, watchlists: Sequence[str]) -> bool:
        """Sets one subject's watchlists (a membership change); False when the subject is not in the index."""
        with self._mutex:
            state = self._s
            code = state.code_of.get(subject_id)
            if code is None:
                return False
            with self._rw.writing():
                state.wlset[code] = state.watchlist_id(watchlists)
                self._masks.clear()
            return True

    def remove_subject(self, subject_id: str) -> int:
        """Removes every template of the subject; returns how many were removed (0 if unknown). Searches that start
        after this call has begun never return the subject, even while it waits for a long operation to finish."""
        self._hidden.add(subject_id)
        try:
            with self._mutex:
                state = self._s
                code = state.code_of.get(subject_id)
                if code is None:
                    return 0
                with self._rw.writing():
                    searchable = bool(state.searchable[code])
                    slots = state.slots_of(code)
                    if searchable and state.ivf is not None:
                        state.ivf.remove(slots)
                    state.drop_subject(code)
                    if searchable:
                        self._masks.removed(slots)
                    self._touched(slots)
                return len(slots)
        finally:
            self._hidden.discard(subject_id)

    def retrain(self) -> None:
        """Trains a fresh IVF on the current searchable templates (lists and probes sized for them) and swaps it in.
        Searches and mutations go on meanwhile; the slots mutations touch are replayed onto the new IVF."""
        with self._mutex:
            state = self._s
            slots = state.searchable_slots()
            if len(slots) < self._settings.exact_below or self._journal is not None:
                return  # too small, or a retraining runs already
            self._journal = set()
        lists = self._settings.lists or auto_lists(len(slots))
        fresh = self._build_ivf(state, slots, lists)
        with self._mutex:
            if self._s is not state or self._journal is None:
                return  # replaced meanwhile
            touched, self._journal = self._journal, None
            with self._rw.writing():
                fresh.remove(touched)
                current = [s for s in sorted(touched) if state.code[s] >= 0 and state.searchable[state.code[s]]]
                fresh.add(np.array(current, dtype=np.int64), state.vectors[current])
                state.ivf, state.trained_on = fresh, len(slots)
                state.probes = self._settings.probes or auto_probes(fresh.lists)
                self._masks.clear()
        logger.info("ANN index retrained: %d templates, %d lists", len(slots), lists)

    # -- queries -----------------------------------------------------------------------------------------------

    def subject_ids(self) -> set[str]:
        with self._mutex:
            return set(self._s.code_of)

    def subjects_of_templates(self, template_ids: Iterable[int]) -> set[str]:
        """The subjects holding any of these templates (the others are not in the index)."""
        with self._mutex:
            state = self._s
            slots = [state.tids.slot_of(int(tid), state.tid) for tid in template_ids]
            return {str(state.subject_of[int(state.code[slot])]) for slot in slots if slot is not None}

    @property
    def size(self) -> int:
        """Number of templates."""
        return self._s.templates

    @property
    def subject_count(self) -> int:
        return len(self._s.code_of)

    def stats(self) -> IndexStats:
        with self._rw.reading():
            state = self._s
            cached, masks = self._masks.usage()
            ivf = state.ivf.nbytes() if state.ivf is not None else 0
            return IndexStats(
                templates=state.templates,
                subjects=len(state.code_of),
                rows=state.used,
                dead_rows=len(state.free_slots),
                capacity=len(state.tid),
                subject_slots=len(state.subject_of),
                cached_masks=cached,
                nbytes=state.nbytes() + ivf + masks,
            )

    def ann_stats(self) -> dict[str, Any]:
        """What only this index has: whether and how its IVF is trained, for metrics and the benchmark."""
        with self._rw.reading():
            state = self._s
            ivf = state.ivf
            return {
                "trained": ivf is not None,
                "ivf_templates": ivf.size if ivf else 0,
                "lists": ivf.lists if ivf else 0,
                "probes": state.probes,
                "trained_on": state.trained_on,
                "ivf_nbytes": ivf.nbytes() if ivf else 0,
                "retrain_advised": self._retrain_due(state),
            }

    def search(self, probe: np.ndarray, top_k: int = 5, watchlists: Sequence[str] = ()) -> list[list[Candidate]]:
        """For each probe ([dim] or [K, dim]), the ``top_k`` closest subjects, nearest first; with ``watchlists``,
        only subjects on at least one of them; verify-only subjects never."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        probes = checked_vectors(self._dim, probe)
        with self._rw.reading():
            state = self._s
            mask = self._masks.get(state, frozenset(watchlists), self._exact_limit(state))
            if mask.count == 0 or not len(probes):
                return [[] for _ in range(len(probes))]
            wanted = top_k * max(state.max_per_subject, 1)
            if mask.slots is not None or state.ivf is None:
                shortlists = exact_shortlists(state, probes, mask, wanted)
            else:
                only = mask if watchlists else None
                shortlists = ann_shortlists(state, probes, only, wanted, self._settings.shortlist)
            hidden = set(self._hidden)
            return [candidates(state, p, s, top_k, hidden) for p, s in zip(probes, shortlists, strict=True)]

    def verify(self, probe: np.ndarray, subject_id: str) -> float | None:
        """Smallest distance from the probe to the subject's templates; None if the subject has none."""
        vector = checked_vectors(self._dim, probe)
        if len(vector) != 1:
            raise ValueError("verify takes a single probe vector")
        with self._rw.reading():
            state = self._s
            code = state.code_of.get(subject_id)
            if code is None or subject_id in self._hidden:
                return None
            segment = state.vectors[state.slots_of(code)]
            return float(np.sqrt(np.min(np.sum((segment - vector[0]) ** 2, axis=1))))

    # -- snapshots ---------------------------------------------------------------------------------------------

    def dump(self, target: Path | str | BinaryIO) -> int:
        """Writes the whole content to a file or a binary stream; returns the bytes written. Mutations wait for it,
        searches do not."""
        if isinstance(target, (str, Path)):
            with open(target, "wb") as stream:
                return self.dump(stream)
        with self._mutex:
            return write_state(self._s, asdict(self._settings), target)

    @classmethod
    def load(
        cls,
        source: Path | str | BinaryIO,
        verify_only: Callable[[str], bool] = is_session_subject,
        settings: AnnSettings | None = None,
    ) -> AnnIndex:
        """An index with the content of a dump (its settings unless ``settings`` are given)."""
        if isinstance(source, (str, Path)):
            with open(source, "rb") as stream:
                return cls.load(stream, verify_only, settings)
        state, saved = read_state(source)
        index = cls(state.dim, verify_only, settings or replace(AnnSettings(), **saved))
        index._s = state
        return index

    # -- internals ---------------------------------------------------------------------------------------------

    def _train(self, state: State) -> None:
        slots = state.searchable_slots()
        lists = self._settings.lists or auto_lists(len(slots))
        state.ivf = self._build_ivf(state, slots, lists)
        state.trained_on = len(slots)
        state.probes = self._settings.probes or auto_probes(lists)

    def _build_ivf(self, state: State, slots: np.ndarray, lists: int) -> Ivf:
        """A trained IVF holding ``slots``. Reads ``state.vectors`` without a lock while mutations may go on: a slot
        they touch meanwhile is in the journal and replayed."""
        return Ivf.built(state.vectors, slots, lists, self._settings.threads)

    def _retrain_due(self, state: State) -> bool:
        if state.searchable_templates < self._settings.exact_below:
            return False
        return state.ivf is None or state.searchable_templates >= self._settings.retrain_growth * state.trained_on

    def _maybe_retrain(self, state: State) -> None:
        """Hold the mutex."""
        if not self._settings.auto_retrain or not self._retrain_due(state) or self._journal is not None:
            return
        if self._retrainer is not None and self._retrainer.is_alive():
            return
        self._retrainer = threading.Thread(target=self._retrain_logged, name="ann-retrain", daemon=True)
        self._retrainer.start()

    def _retrain_logged(self) -> None:
        try:
            self.retrain()
        except Exception:
            logger.exception("ANN index retraining failed; the current IVF stays in use")
            with self._mutex:
                self._journal = None

    def wait_retrained(self, timeout: float | None = None) -> None:
        """Waits for a background retraining, if one runs (for tests and the benchmark)."""
        thread = self._retrainer
        if thread is not None:
            thread.join(timeout)

    def _touched(self, slots: Iterable[int]) -> None:
        if self._journal is not None:
            self._journal.update(int(s) for s in slots)

    def _exact_limit(self, state: State) -> float:
        if state.ivf is None:
            return math.inf
        settings = self._settings
        return min(settings.exact_rows_max, max(settings.exact_rows, settings.exact_share * state.ivf.size))
