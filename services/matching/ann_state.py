"""The content of ``ann.AnnIndex``: templates in slots, subjects as integer codes, their watchlists and the IVF.

Slot s holds one template: its float32 vector and squared norm, its template id, its subject's code and the next slot
of the same subject (each subject's templates form a chain from its head slot). Subject c has its id string, head
slot, template count, whether it is searchable (verify-only session subjects are not) and its set of watchlists (an
index into the distinct watchlist tuples). Free slots and codes are reused, so memory stays bounded by the live
content; arrays grow by doubling into zeroed memory, whose pages cost nothing until written.

Which template ids are present is a sorted array of ids with each id's slot, checked against the slot's current id
(so a removal needs no update), and a small set of recent additions merged in from time to time: 16 B per template.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from sightline.matching.ann_ivf import Ivf

INITIAL_SLOTS = 1024
_RECENT_TIDS_MAX = 4096  # template ids kept in a set before they are merged into the sorted array


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


class State:
    """Everything one index content is: slots (vectors and their bookkeeping), subjects, watchlists, the IVF.

    Slot s holds one template: ``vectors[s]``, its id ``tid[s]`` (-1: free), its subject's code ``code[s]`` and
    ``next[s]``, the subject's next slot (-1: last). Subject c: ``subject_of[c]`` (None: free code), ``head[c]`` (first
    slot), ``count[c]``, ``searchable[c]`` and ``wlset[c]``, an index into ``wl_sets`` (distinct watchlist tuples).
    Free slots and codes are reused, so memory stays bounded by the live content."""

    def __init__(self, dim: int, slots: int = INITIAL_SLOTS, codes: int = INITIAL_SLOTS) -> None:
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
        self.ivf: Ivf | None = None
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
    ) -> State:
        """A state holding the given rows, built with array operations (a loop over the rows for the subjects only):
        each subject's chain links its slots in row order, as ``store`` one by one would."""
        _, first = np.unique(template_ids, return_index=True)
        keep = np.sort(first)
        rows = len(keep)
        state = cls(vectors.shape[1], max(INITIAL_SLOTS, rows + rows // 4))
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
        state._grow_codes(max(INITIAL_SLOTS, subjects + subjects // 4))
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
