"""Approximate 1:N search for large galleries: an IVF index (faiss) shortlists, float32 vectors re-rank exactly.

``AnnIndex`` has the public interface of ``index.SearchIndex`` (``replace_all``, ``add``, ``replace_watchlists``,
``remove_subject``, ``subject_ids``, ``size``, ``stats``, ``subject_count``, ``search``, ``verify``), the exact index
it is measured against; the gallery holds an ``AnnIndex``, which itself searches exactly below
``AnnSettings.exact_below`` templates. Why faiss IVF and not
HNSW (faiss's or usearch's): measured in docs/benchmarks.md; in short, at 1M templates on one core it reaches the
same recall in a fraction of the memory and build time, and it deletes entries for real.

How a search runs:

- The IVF index (``IVF<lists>,SQ8``: a k-means coarse quantizer, 8-bit codes) holds the searchable templates only;
  verify-only (session) subjects are never put in it. A probe is compared with the codes of its ``probes`` nearest
  lists and the nearest ``shortlist`` rows (at least ``top_k`` x the most templates any subject has) are re-ranked
  with the float32 vectors kept here, so every distance returned is exact: only recall is approximate.
- Each candidate subject's distance is the minimum over all its templates (not only those in the shortlist), and
  results hold one candidate per subject, like ``SearchIndex``.
- Watchlists: the rows a search may return are a bitmap per watchlist set (cached, and kept up to date by additions
  and removals). When few rows are allowed (at most ``exact_rows``, or ``exact_share`` of the IVF's rows, and never
  more than ``exact_rows_max``) the search is exact over just those rows: a small list's members need not be in the
  lists a probe scans. Otherwise the bitmap goes into faiss's search (``IDSelectorBitmap``), which skips other rows
  while it scans: no oversampling is needed, and when the probed lists hold fewer allowed rows than the shortlist
  wants the search widens (4x the lists, up to all of them, which is exhaustive).
- Below ``exact_below`` searchable templates no IVF is trained and every search is exact.

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
string, dict entry and 17 B of arrays. The IVF's lists are sized once when it is built (growing them entry by entry
would waste ~70 B per template in spare capacity).

``dump``/``load`` write and read the whole state (vectors, bookkeeping, watchlists, the IVF) as one stream, for
snapshots; encryption is the caller's.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sightline.common.models.descriptor_spec import DESCRIPTOR_SIZE
from sightline.common.subjects import is_session_subject
from sightline.matching.index import (
    DEFAULT_MASK_CACHE_SIZE,
    Candidate,
    IndexRecord,
    IndexStats,
    checked_vectors,
)

logger = logging.getLogger(__name__)

DEFAULT_EXACT_BELOW = 20_000
_MAGIC = b"SLANN001"
_FORMAT_VERSION = 1
_INITIAL_SLOTS = 1024
_RECENT_TIDS_MAX = 4096  # template ids kept in a set before they are merged into the sorted array
_TRAIN_POINTS_PER_LIST = 40  # faiss warns below 39 training points per list
_ADD_CHUNK = 65_536  # rows handed to faiss per call when building: bounds the temporary copies
_WIDEN = 4


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


# -- locks -------------------------------------------------------------------------------------------------------------


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer stops new readers from entering (so removals are not starved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# -- the IVF -----------------------------------------------------------------------------------------------------------


class _Ivf:
    """faiss ``IVF<lists>,SQ8`` keyed by slot number, with a hash map from slot to its place (for removal)."""

    def __init__(self, index: Any) -> None:
        import faiss

        self._faiss = faiss
        self.index = index
        self.ivf = faiss.extract_index_ivf(index)
        self.lists = int(self.ivf.nlist)

    @classmethod
    def trained(cls, sample: np.ndarray, lists: int, threads: int) -> _Ivf:
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.index_factory(sample.shape[1], f"IVF{lists},SQ8")
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        made = cls(index)
        made.ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return made

    @classmethod
    def from_bytes(cls, data: np.ndarray) -> _Ivf:
        import faiss

        return cls(faiss.deserialize_index(data))

    def to_bytes(self) -> np.ndarray:
        return np.asarray(self._faiss.serialize_index(self.index))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def nbytes(self) -> int:
        """Codes and ids in the lists, plus about 48 B per entry for the id hash map (measured: std::unordered_map)."""
        return self.size * (int(self.ivf.code_size) + 8 + 48) + self.lists * int(self.ivf.d) * 4

    def fill(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        """Adds ``vectors[slots]`` to the empty IVF with each list sized once: growing them entry by entry would
        leave up to half of their memory as spare capacity (about 70 B per template, measured at 1M)."""
        assigned = np.empty(len(slots), dtype=np.int64)
        for start in range(0, len(slots), _ADD_CHUNK):
            chunk = np.ascontiguousarray(vectors[slots[start : start + _ADD_CHUNK]])
            assigned[start : start + len(chunk)] = self.ivf.quantizer.assign(chunk, 1).ravel()
        lists = self.ivf.invlists
        for number, size in enumerate(np.bincount(assigned, minlength=self.lists).tolist()):
            lists.resize(number, size)  # allocates exactly this much...
            lists.resize(number, 0)  # ...and keeps it as capacity for the entries added below
        swig_ptr = self._faiss.swig_ptr
        for start in range(0, len(slots), _ADD_CHUNK):
            ids = slots[start : start + _ADD_CHUNK].astype(np.int64)
            chunk = np.ascontiguousarray(vectors[ids], dtype=np.float32)
            where = np.ascontiguousarray(assigned[start : start + len(ids)])
            self.ivf.add_core(len(ids), swig_ptr(chunk), swig_ptr(ids), swig_ptr(where))

    def add(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        if len(slots):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), slots.astype(np.int64))

    def remove(self, slots: Iterable[int]) -> None:
        """Removes the slots' entries; each code is zeroed first, so its bytes do not linger in a list's spare tail."""
        faiss = self._faiss
        zero = np.zeros(int(self.ivf.code_size), dtype=np.uint8)
        for slot in slots:
            try:
                place = self.ivf.direct_map.get(int(slot))
            except RuntimeError:  # not in the IVF (never added, or already removed)
                continue
            self.ivf.invlists.update_entry(
                faiss.lo_listno(place), faiss.lo_offset(place), int(slot), faiss.swig_ptr(zero)
            )
            self.index.remove_ids(np.array([slot], dtype=np.int64))

    def search(self, probes: np.ndarray, count: int, nprobe: int, bitmap: np.ndarray | None) -> np.ndarray:
        """Slots of the ``count`` nearest entries per probe (-1 where fewer were found), only bitmap slots if given."""
        faiss = self._faiss
        selector = None if bitmap is None else faiss.IDSelectorBitmap(len(bitmap) * 8, faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.lists), sel=selector)
        _, slots = self.index.search(np.ascontiguousarray(probes, dtype=np.float32), count, params=params)
        return slots


# -- template ids ------------------------------------------------------------------------------------------------------


class _TemplateIds:
    """Which template ids are present, in 16 B per template: a sorted array (with each id's slot, checked against the
    slot's current id, so removals need no update) and a small set of recent additions merged in from time to time."""

    def __init__(self, tid_of_slot: np.ndarray) -> None:
        self.rebuild(tid_of_slot)

    def rebuild(self, tid_of_slot: np.ndarray) -> None:
        live = np.flatnonzero(tid_of_slot >= 0)
        order = np.argsort(tid_of_slot[live], kind="stable")
        self._sorted = tid_of_slot[live][order]
        self._slots = live[order]
        self._recent: set[int] = set()

    def contains(self, tid: int, tid_of_slot: np.ndarray) -> bool:
        if tid in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, tid))
        return i < len(self._sorted) and self._sorted[i] == tid and tid_of_slot[self._slots[i]] == tid

    def slot_of(self, tid: int, tid_of_slot: np.ndarray) -> int | None:
        """The slot holding the template, or None (a recent addition is looked for among the slots)."""
        i = int(np.searchsorted(self._sorted, tid))
        if i < len(self._sorted) and self._sorted[i] == tid and tid_of_slot[self._slots[i]] == tid:
            return int(self._slots[i])
        if tid in self._recent:
            return int(np.flatnonzero(tid_of_slot == tid)[0])
        return None

    def added(self, tid: int, tid_of_slot: np.ndarray) -> None:
        self._recent.add(tid)
        if len(self._recent) > _RECENT_TIDS_MAX:
            self.rebuild(tid_of_slot)

    def removed(self, tid: int) -> None:
        self._recent.discard(tid)

    @property
    def nbytes(self) -> int:
        return int(self._sorted.nbytes + self._slots.nbytes) + 64 * len(self._recent)


# -- watchlist masks ---------------------------------------------------------------------------------------------------


@dataclass
class _Mask:
    """The slots a 1:N search on one watchlist set may return: a bitmap (faiss's bit order), their number, and the
    slots themselves while they are few enough for exact search."""

    bitmap: np.ndarray  # uint8, bit s of byte s >> 3 (least significant first)
    count: int
    slots: np.ndarray | None  # sorted, when count <= the exact limit

    def nbytes(self) -> int:
        return int(self.bitmap.nbytes + (self.slots.nbytes if self.slots is not None else 0))


# -- the state ---------------------------------------------------------------------------------------------------------


class _State:
    """Everything one index content is: slots (vectors and their bookkeeping), subjects, watchlists, the IVF.

    Slot s holds one template: ``vectors[s]``, its id ``tid[s]`` (-1: free), its subject's code ``code[s]`` and
    ``next[s]``, the subject's next slot (-1: last). Subject c: ``subject_of[c]`` (None: free code), ``head[c]`` (first
    slot), ``count[c]``, ``searchable[c]`` and ``wlset[c]``, an index into ``wl_sets`` (distinct watchlist tuples).
    Free slots and codes are reused, so memory stays bounded by the live content."""

    def __init__(self, dim: int, slots: int = _INITIAL_SLOTS, codes: int = _INITIAL_SLOTS) -> None:
        self.dim = dim
        self.vectors = np.zeros((slots, dim), dtype=np.float32)
        self.sq = np.zeros(slots, dtype=np.float32)
        self.tid = np.full(slots, -1, dtype=np.int64)
        self.code = np.full(slots, -1, dtype=np.int32)
        self.next = np.full(slots, -1, dtype=np.int32)
        self.used = 0  # slots ever used: free ones below it are in free_slots
        self.free_slots: list[int] = []
        self.head = np.full(codes, -1, dtype=np.int32)
        self.count = np.zeros(codes, dtype=np.int32)
        self.searchable = np.zeros(codes, dtype=bool)
        self.wlset = np.zeros(codes, dtype=np.int32)
        self.subject_of: list[str | None] = []
        self.code_of: dict[str, int] = {}
        self.free_codes: list[int] = []
        self.wl_sets: list[tuple[str, ...]] = [()]
        self.wl_set_id: dict[tuple[str, ...], int] = {(): 0}
        self.templates = 0
        self.searchable_templates = 0
        self.max_per_subject = 0
        self.tids = _TemplateIds(self.tid[:0])
        self.ivf: _Ivf | None = None
        self.trained_on = 0
        self.probes = 0

    @classmethod
    def bulk(
        cls,
        template_ids: np.ndarray,
        subject_ids: Sequence[str],
        vectors: np.ndarray,
        watchlists: Sequence[Sequence[str]] | None,
        verify_only: Callable[[str], bool],
    ) -> _State:
        """A state holding the given rows, built with array operations (a loop over the rows for the subjects only):
        each subject's chain links its slots in row order, as ``store`` one by one would."""
        _, first = np.unique(template_ids, return_index=True)
        keep = np.sort(first)
        rows = len(keep)
        state = cls(vectors.shape[1], max(_INITIAL_SLOTS, rows + rows // 4))
        codes = np.empty(rows, dtype=np.int32)
        names_of: dict[int, set[str]] = {}
        for slot, row in enumerate(keep.tolist()):
            subject = subject_ids[row]
            code = state.code_of.get(subject)
            if code is None:
                code = state.code_of[subject] = len(state.subject_of)
                state.subject_of.append(subject)
            codes[slot] = code
            if watchlists is not None and watchlists[row]:
                names_of.setdefault(code, set()).update(watchlists[row])
        subjects = len(state.subject_of)
        state._grow_codes(max(_INITIAL_SLOTS, subjects + subjects // 4))
        state.vectors[:rows] = vectors[keep]
        state.sq[:rows] = np.einsum("ij,ij->i", state.vectors[:rows], state.vectors[:rows])
        state.tid[:rows] = template_ids[keep]
        state.code[:rows] = codes
        order = np.argsort(codes, kind="stable")
        grouped = codes[order]
        same = grouped[1:] == grouped[:-1]
        state.next[order[1:][same]] = order[:-1][same]  # each slot links to its subject's previous one
        last = np.append(grouped[1:] != grouped[:-1], True) if rows else np.zeros(0, dtype=bool)
        state.head[grouped[last]] = order[last]
        state.count[:subjects] = np.bincount(codes, minlength=subjects)
        state.searchable[:subjects] = [not verify_only(s) for s in state.subject_of]
        for code, names in names_of.items():
            state.wlset[code] = state.watchlist_id(names)
        state.used = state.templates = rows
        state.searchable_templates = int(state.count[:subjects][state.searchable[:subjects]].sum())
        state.max_per_subject = int(state.count.max(initial=0))
        state.tids.rebuild(state.tid)
        return state

    # -- slots and subjects --

    def store(self, template_id: int, subject_id: str, vector: np.ndarray, searchable: bool) -> tuple[int, bool]:
        """Puts one template in a slot; returns the slot and whether its subject is new."""
        code = self.code_of.get(subject_id)
        created = code is None
        if code is None:
            code = self._new_code(subject_id, searchable)
        slot = self.free_slots.pop() if self.free_slots else self._grow_slots()
        self.vectors[slot] = vector
        self.sq[slot] = float(np.dot(vector, vector))
        self.tid[slot] = template_id
        self.code[slot] = code
        self.next[slot] = self.head[code]
        self.head[code] = slot
        self.count[code] += 1
        self.templates += 1
        self.searchable_templates += int(self.searchable[code])
        self.max_per_subject = max(self.max_per_subject, int(self.count[code]))
        self.tids.added(template_id, self.tid)
        return slot, created

    def drop_subject(self, code: int) -> list[int]:
        """Frees the subject's slots (vectors zeroed) and its code; returns the slots."""
        slots = self.slots_of(code)
        for slot in slots:
            self.tids.removed(int(self.tid[slot]))
        rows = np.array(slots, dtype=np.int64)
        self.vectors[rows] = 0.0
        self.sq[rows] = 0.0
        self.tid[rows] = -1
        self.code[rows] = -1
        self.next[rows] = -1
        self.free_slots.extend(slots)
        self.templates -= len(slots)
        self.searchable_templates -= len(slots) * int(self.searchable[code])
        subject = self.subject_of[code]
        if subject is not None:
            del self.code_of[subject]
        self.subject_of[code] = None
        self.head[code], self.count[code], self.searchable[code], self.wlset[code] = -1, 0, False, 0
        self.free_codes.append(code)
        if len(slots) >= self.max_per_subject:
            self.max_per_subject = int(self.count.max(initial=0))
        return slots

    def slots_of(self, code: int) -> list[int]:
        slots, slot = [], int(self.head[code])
        while slot >= 0:
            slots.append(slot)
            slot = int(self.next[slot])
        return slots

    def watchlist_id(self, names: Iterable[str]) -> int:
        key = tuple(sorted(set(names)))
        found = self.wl_set_id.get(key)
        if found is None:
            found = self.wl_set_id[key] = len(self.wl_sets)
            self.wl_sets.append(key)
        return found

    def _new_code(self, subject_id: str, searchable: bool) -> int:
        if self.free_codes:
            code = self.free_codes.pop()
            self.subject_of[code] = subject_id
        else:
            code = len(self.subject_of)
            self.subject_of.append(subject_id)
            if code >= len(self.head):
                self._grow_codes(2 * len(self.head))
        self.code_of[subject_id] = code
        self.head[code], self.count[code], self.searchable[code], self.wlset[code] = -1, 0, searchable, 0
        return code

    def _grow_slots(self) -> int:
        if self.used == len(self.tid):
            capacity = 2 * len(self.tid)
            self.vectors = _grown(self.vectors, capacity, 0.0)
            self.sq, self.tid = _grown(self.sq, capacity, 0.0), _grown(self.tid, capacity, -1)
            self.code, self.next = _grown(self.code, capacity, -1), _grown(self.next, capacity, -1)
        self.used += 1
        return self.used - 1

    def _grow_codes(self, capacity: int) -> None:
        self.head, self.count = _grown(self.head, capacity, -1), _grown(self.count, capacity, 0)
        self.searchable, self.wlset = _grown(self.searchable, capacity, False), _grown(self.wlset, capacity, 0)

    # -- searchable slots --

    def searchable_slots(self) -> np.ndarray:
        live = self.code[: self.used]
        ok = live >= 0
        ok[ok] = self.searchable[live[ok]]
        return np.flatnonzero(ok)

    def allowed(self, watchlists: frozenset[str]) -> np.ndarray:
        """Bool per used slot: a live searchable subject's, on one of ``watchlists`` when there are some."""
        codes = len(self.subject_of)
        eligible = self.searchable[:codes].copy()
        if watchlists:
            by_set = np.fromiter((not watchlists.isdisjoint(s) for s in self.wl_sets), bool, len(self.wl_sets))
            eligible &= by_set[self.wlset[:codes]]
        live = self.code[: self.used]
        ok = live >= 0
        ok[ok] = eligible[live[ok]]
        return ok

    def nbytes(self) -> int:
        arrays = (self.vectors, self.sq, self.tid, self.code, self.next, self.head, self.count, self.searchable)
        return sum(a.nbytes for a in arrays) + self.wlset.nbytes + self.tids.nbytes


def _grown(array: np.ndarray, capacity: int, fill: float | int | bool) -> np.ndarray:
    # np.zeros where it can: its pages stay unmapped until written, so headroom costs no memory.
    fresh = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    if fill:
        fresh[len(array) :] = fill
    fresh[: len(array)] = array
    return fresh


# -- the index ---------------------------------------------------------------------------------------------------------


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
        self._rw = _ReadWriteLock()  # searches read; the in-memory step of a mutation writes
        self._masks_lock = threading.Lock()  # the mask cache, which searches fill
        self._masks: OrderedDict[frozenset[str], _Mask] = OrderedDict()
        self._hidden: set[str] = set()  # subjects being removed: no search returns them from now on
        self._journal: set[int] | None = None  # slots touched while a retraining runs
        self._retrainer: threading.Thread | None = None
        self._s = _State(dim)
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
            state = _State.bulk(
                np.asarray(template_ids, dtype=np.int64), subject_ids, vectors, watchlists, self._verify_only
            )
            if state.searchable_templates >= self._settings.exact_below:
                self._train(state)
            with self._rw.writing():
                self._s = state
                self._journal = None  # a retraining of the old content is void
                self._clear_masks()
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
                    self._clear_masks()
                if state.searchable[code]:
                    if state.ivf is not None:
                        state.ivf.add(np.array([slot]), row)
                    self._masks_added(state, slot, code)
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
                self._clear_masks()

    def set_watchlists(self, subject_id: str, watchlists: Sequence[str]) -> bool:
        """Sets one subject's watchlists (a membership change); False when the subject is not in the index."""
        with self._mutex:
            state = self._s
            code = state.code_of.get(subject_id)
            if code is None:
                return False
            with self._rw.writing():
                state.wlset[code] = state.watchlist_id(watchlists)
                self._clear_masks()
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
                        self._masks_removed(slots)
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
                self._clear_masks()
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
            with self._masks_lock:
                masks = sum(mask.nbytes() for mask in self._masks.values())
                cached = len(self._masks)
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
            mask = self._mask(state, frozenset(watchlists))
            if mask.count == 0 or not len(probes):
                return [[] for _ in range(len(probes))]
            wanted = top_k * max(state.max_per_subject, 1)
            if mask.slots is not None or state.ivf is None:
                shortlists = self._exact_shortlists(state, probes, mask, wanted)
            else:
                shortlists = self._ann_shortlists(state, probes, mask if watchlists else None, wanted)
            hidden = set(self._hidden)
            return [self._candidates(state, p, s, top_k, hidden) for p, s in zip(probes, shortlists, strict=True)]

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
            return _write_state(self._s, self._settings, target)

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
        state, saved = _read_state(source)
        index = cls(state.dim, verify_only, settings or saved)
        index._s = state
        return index

    # -- internals ---------------------------------------------------------------------------------------------

    def _train(self, state: _State) -> None:
        slots = state.searchable_slots()
        lists = self._settings.lists or auto_lists(len(slots))
        state.ivf = self._build_ivf(state, slots, lists)
        state.trained_on = len(slots)
        state.probes = self._settings.probes or auto_probes(lists)

    def _build_ivf(self, state: _State, slots: np.ndarray, lists: int) -> _Ivf:
        """A trained IVF holding ``slots``. Reads ``state.vectors`` without a lock while mutations may go on: a slot
        they touch meanwhile is in the journal and replayed."""
        lists = max(1, min(lists, len(slots)))
        rng = np.random.default_rng(len(slots))
        sample = slots[rng.choice(len(slots), min(len(slots), _TRAIN_POINTS_PER_LIST * lists), replace=False)]
        vectors = state.vectors
        ivf = _Ivf.trained(vectors[np.sort(sample)], lists, self._settings.threads)
        ivf.fill(slots, vectors)
        return ivf

    def _retrain_due(self, state: _State) -> bool:
        if state.searchable_templates < self._settings.exact_below:
            return False
        return state.ivf is None or state.searchable_templates >= self._settings.retrain_growth * state.trained_on

    def _maybe_retrain(self, state: _State) -> None:
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

    def _exact_limit(self, state: _State) -> float:
        if state.ivf is None:
            return math.inf
        settings = self._settings
        return min(settings.exact_rows_max, max(settings.exact_rows, settings.exact_share * state.ivf.size))

    def _mask(self, state: _State, watchlists: frozenset[str]) -> _Mask:
        """The cached mask of a watchlist set (frozenset(): every searchable slot); computed on first use."""
        with self._masks_lock:
            mask = self._masks.get(watchlists)
            if mask is not None:
                self._masks.move_to_end(watchlists)
                return mask
        allowed = state.allowed(watchlists)
        count = int(np.count_nonzero(allowed))
        bitmap = np.packbits(allowed, bitorder="little")
        bitmap = np.concatenate([bitmap, np.zeros((len(state.tid) + 7) // 8 - len(bitmap), dtype=np.uint8)])
        slots = np.flatnonzero(allowed) if count <= self._exact_limit(state) else None
        mask = _Mask(bitmap, count, slots)
        with self._masks_lock:
            self._masks[watchlists] = mask
            while len(self._masks) > self._settings.mask_cache_size:
                self._masks.popitem(last=False)
        return mask

    def _clear_masks(self) -> None:
        with self._masks_lock:
            self._masks.clear()

    def _masks_added(self, state: _State, slot: int, code: int) -> None:
        """Keeps cached masks valid after a searchable template was added (hold the write lock)."""
        names = state.wl_sets[state.wlset[code]]
        limit = self._exact_limit(state)
        with self._masks_lock:
            if any(len(mask.bitmap) * 8 <= slot for mask in self._masks.values()):
                self._masks.clear()  # the slots grew past the bitmaps
                return
            for watchlists, mask in self._masks.items():
                if watchlists and watchlists.isdisjoint(names):
                    continue
                mask.bitmap[slot >> 3] |= np.uint8(1 << (slot & 7))
                mask.count += 1
                if mask.slots is not None:
                    mask.slots = np.sort(np.append(mask.slots, slot)) if mask.count <= limit else None

    def _masks_removed(self, slots: Sequence[int]) -> None:
        """Keeps cached masks valid after searchable templates left (hold the write lock)."""
        rows = np.array(slots, dtype=np.int64)
        with self._masks_lock:
            for mask in self._masks.values():
                had = (mask.bitmap[rows >> 3] >> (rows & 7)) & 1
                # ufunc.at: two slots may share a byte, which a fancy-indexed &= would apply only once
                np.bitwise_and.at(mask.bitmap, rows >> 3, ~(np.uint8(1) << (rows & 7).astype(np.uint8)))
                mask.count -= int(had.sum())
                if mask.slots is not None:
                    mask.slots = mask.slots[~np.isin(mask.slots, rows)]

    def _exact_shortlists(self, state: _State, probes: np.ndarray, mask: _Mask, wanted: int) -> list[np.ndarray]:
        """The ``wanted`` nearest allowed slots per probe, exactly."""
        if mask.slots is not None and mask.count < state.used // 2:
            slots = mask.slots
            matrix, sq = state.vectors[slots], state.sq[slots]
            distances = sq[None, :] - 2.0 * (probes @ matrix.T)
        else:
            slots = np.arange(state.used)
            distances = state.sq[None, : state.used] - 2.0 * (probes @ state.vectors[: state.used].T)
            if mask.count < state.used:  # some slots are free, verify-only or off the lists
                allowed = np.unpackbits(mask.bitmap, count=state.used, bitorder="little").astype(bool)
                distances[:, ~allowed] = np.inf
        wanted = min(wanted, mask.count)
        if wanted < distances.shape[1]:
            nearest = np.argpartition(distances, wanted - 1, axis=1)[:, :wanted]
        else:
            nearest = np.broadcast_to(np.arange(distances.shape[1]), (len(probes), distances.shape[1]))
        return [slots[row] for row in nearest]

    def _ann_shortlists(self, state: _State, probes: np.ndarray, mask: _Mask | None, wanted: int) -> list[np.ndarray]:
        """The IVF's nearest allowed slots per probe, widening the scan for probes that found too few."""
        assert state.ivf is not None
        ivf = state.ivf
        count = min(max(self._settings.shortlist, wanted), ivf.size)
        bitmap = mask.bitmap if mask is not None else None
        reachable = min(count, mask.count if mask is not None else ivf.size)
        nprobe = state.probes
        found = ivf.search(probes, count, nprobe, bitmap)
        shortlists = [row[row >= 0] for row in found]
        short = [i for i, s in enumerate(shortlists) if len(s) < reachable]
        while short and nprobe < ivf.lists:
            nprobe = min(ivf.lists, nprobe * _WIDEN)
            again = ivf.search(probes[short], count, nprobe, bitmap)
            for i, row in zip(short, again, strict=True):
                shortlists[i] = row[row >= 0]
            short = [i for i in short if len(shortlists[i]) < reachable]
        return shortlists

    @staticmethod
    def _candidates(
        state: _State, vector: np.ndarray, slots: np.ndarray, top_k: int, hidden: set[str]
    ) -> list[Candidate]:
        """One candidate per subject of the shortlist, at the exact distance of its nearest template, nearest first."""
        if not len(slots):
            return []
        distances = np.sqrt(np.sum((state.vectors[slots] - vector) ** 2, axis=1))
        best: dict[int, tuple[float, int]] = {}
        for i in np.argsort(distances, kind="stable").tolist():
            code = int(state.code[slots[i]])
            if code < 0 or code in best or not state.searchable[code]:
                continue  # a free slot or a verify-only subject never is a candidate (belt and braces)
            best[code] = (float(distances[i]), int(slots[i]))
        for code, (distance, _slot) in list(best.items()):
            if state.count[code] > 1:  # its nearest template may not be in the shortlist
                others = np.array(state.slots_of(code))
                own = np.sqrt(np.sum((state.vectors[others] - vector) ** 2, axis=1))
                if float(own.min()) < distance:
                    best[code] = (float(own.min()), int(others[int(own.argmin())]))
        ranked = sorted(best.items(), key=lambda item: item[1][0])
        candidates: list[Candidate] = []
        for code, (distance, slot) in ranked:
            subject = state.subject_of[code]
            if subject is None or subject in hidden:
                continue
            candidates.append(
                Candidate(
                    subject_id=subject,
                    distance=distance,
                    watchlists=state.wl_sets[state.wlset[code]],
                    template_id=int(state.tid[slot]),
                )
            )
            if len(candidates) == top_k:
                break
        return candidates


# -- the dump format ---------------------------------------------------------------------------------------------------
# MAGIC, a little-endian u64 header length, the JSON header (settings, counts, watchlist sets, and the name, dtype
# and shape of each array in order), then the arrays' raw bytes in that order: the used slots' arrays, the subjects'
# arrays, the subject ids (one UTF-8 string and the character offset where each id ends), the serialized IVF.

_SLOT_ARRAYS = ("vectors", "sq", "tid", "code", "next")
_CODE_ARRAYS = ("head", "count", "searchable", "wlset")


def _write_state(state: _State, settings: AnnSettings, stream: BinaryIO) -> int:
    codes = len(state.subject_of)
    ids = [s or "" for s in state.subject_of]
    joined = "".join(ids).encode("utf-8")
    ends = np.cumsum([len(s) for s in ids], dtype=np.int64) if ids else np.zeros(0, dtype=np.int64)
    arrays: list[tuple[str, np.ndarray]] = [(name, getattr(state, name)[: state.used]) for name in _SLOT_ARRAYS]
    arrays += [(name, getattr(state, name)[:codes]) for name in _CODE_ARRAYS]
    arrays += [("subject_ends", ends), ("subject_text", np.frombuffer(joined, dtype=np.uint8))]
    if state.ivf is not None:
        arrays.append(("ivf", state.ivf.to_bytes()))
    header = {
        "format": "sightline-ann",
        "version": _FORMAT_VERSION,
        "dim": state.dim,
        "settings": asdict(settings),
        "used": state.used,
        "trained_on": state.trained_on,
        "probes": state.probes,
        "wl_sets": [list(s) for s in state.wl_sets],
        "arrays": [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape)} for n, a in arrays],
    }
    encoded = json.dumps(header).encode("utf-8")
    stream.write(_MAGIC + struct.pack("<Q", len(encoded)) + encoded)
    written = len(_MAGIC) + 8 + len(encoded)
    for _, array in arrays:
        data = _bytes_of(np.ascontiguousarray(array))
        stream.write(data)
        written += len(data)
    return written


def _read_state(stream: BinaryIO) -> tuple[_State, AnnSettings]:
    if _read_exact(stream, len(_MAGIC)) != _MAGIC:
        raise ValueError("not a Sightline ANN index dump")
    (length,) = struct.unpack("<Q", _read_exact(stream, 8))
    header = json.loads(_read_exact(stream, length))
    if header.get("version") != _FORMAT_VERSION:
        raise ValueError(f"ANN index dump version {header.get('version')} is not {_FORMAT_VERSION}")
    specs = {spec["name"]: spec for spec in header["arrays"]}
    used, codes = int(header["used"]), int(specs["head"]["shape"][0])
    state = _State(int(header["dim"]), max(_INITIAL_SLOTS, used + used // 4), max(_INITIAL_SLOTS, codes))
    arrays: dict[str, np.ndarray] = {}
    for spec in header["arrays"]:
        name, dtype = spec["name"], np.dtype(spec["dtype"])
        if name in _SLOT_ARRAYS or name in _CODE_ARRAYS:  # straight into the state's arrays: no second copy
            array = getattr(state, name)[: spec["shape"][0]]
            if array.dtype != dtype or list(array.shape) != spec["shape"]:
                raise ValueError(f"ANN index dump: array {name} has an unexpected type or shape")
        else:
            array = np.empty(spec["shape"], dtype=dtype)
        _read_into(stream, _bytes_of(array))
        arrays[name] = array
    state.used = used
    text, ends = arrays["subject_text"].tobytes().decode("utf-8"), arrays["subject_ends"].tolist()
    counts = state.count[:codes].tolist()
    starts = [0, *ends[:-1]] if ends else []
    state.subject_of = [text[a:b] if n else None for a, b, n in zip(starts, ends, counts, strict=True)]
    state.code_of = {s: c for c, s in enumerate(state.subject_of) if s is not None}
    state.free_codes = [c for c, n in enumerate(counts) if not n]
    state.free_slots = np.flatnonzero(state.tid[:used] < 0).tolist()
    state.wl_sets = [tuple(s) for s in header["wl_sets"]]
    state.wl_set_id = {s: i for i, s in enumerate(state.wl_sets)}
    state.templates = used - len(state.free_slots)
    live = state.code[:used][state.code[:used] >= 0]
    state.searchable_templates = int(np.count_nonzero(state.searchable[live]))
    state.max_per_subject = int(state.count.max(initial=0))
    state.tids.rebuild(state.tid)
    if "ivf" in arrays:
        state.ivf = _Ivf.from_bytes(arrays["ivf"])
        state.trained_on, state.probes = int(header["trained_on"]), int(header["probes"])
    saved = replace(AnnSettings(), **header["settings"])
    return state, saved


def _bytes_of(array: np.ndarray) -> memoryview:
    """A byte view of a contiguous array, empty ones included (``memoryview.cast`` refuses a zero in the shape)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def _read_into(stream: BinaryIO, view: memoryview) -> None:
    """Fills ``view`` from the stream (which may return less than asked per call, like a decrypting reader)."""
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise ValueError("ANN index dump is truncated")
        done += got


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError("ANN index dump is truncated")
    return data
