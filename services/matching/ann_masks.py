"""The watchlist masks of ``ann.AnnIndex``: which slots a 1:N search on one set of watchlists may return.

A mask is a bitmap over the slots (in faiss's bit order, so it goes straight into an ``IDSelectorBitmap``), the number
of slots it allows and, while that number is within the exact-search limit, the slots themselves. Masks are computed
on first use and cached per watchlist set, least recently used first out; additions and removals of searchable
templates update every cached mask in place rather than dropping them, and changes of watchlist membership clear the
cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sightline.matching.ann_state import State


@dataclass
class Mask:
    """The slots a 1:N search on one watchlist set may return: a bitmap (faiss's bit order), their number, and the
    slots themselves while they are few enough for exact search."""

    bitmap: np.ndarray  # uint8, bit s of byte s >> 3 (least significant first)
    count: int
    slots: np.ndarray | None  # sorted, when count <= the exact limit

    def nbytes(self) -> int:
        return int(self.bitmap.nbytes + (self.slots.nbytes if self.slots is not None else 0))


class MaskCache:
    """At most ``size`` masks, one per watchlist set (frozenset(): every searchable slot); thread-safe, since
    searches fill it under the shared read lock."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._masks: OrderedDict[frozenset[str], Mask] = OrderedDict()

    def get(self, state: State, watchlists: frozenset[str], exact_limit: float) -> Mask:
        """The cached mask of a watchlist set, computed on first use; its slots are kept when at most
        ``exact_limit``."""
        with self._lock:
            mask = self._masks.get(watchlists)
            if mask is not None:
                self._masks.move_to_end(watchlists)
                return mask
        allowed = state.allowed(watchlists)
        count = int(np.count_nonzero(allowed))
        bitmap = np.packbits(allowed, bitorder="little")
        bitmap = np.concatenate([bitmap, np.zeros((len(state.tid) + 7) // 8 - len(bitmap), dtype=np.uint8)])
        slots = np.flatnonzero(allowed) if count <= exact_limit else None
        mask = Mask(bitmap, count, slots)
        with self._lock:
            self._masks[watchlists] = mask
            while len(self._masks) > self._size:
                self._masks.popitem(last=False)
        return mask

    def clear(self) -> None:
        with self._lock:
            self._masks.clear()

    def usage(self) -> tuple[int, int]:
        """How many masks are cached and their bytes."""
        with self._lock:
            return len(self._masks), sum(mask.nbytes() for mask in self._masks.values())

    def added(self, state: State, slot: int, code: int, exact_limit: float) -> None:
        """Keeps cached masks valid after a searchable template was added (hold the index's write lock)."""
        names = state.wl_sets[state.wlset[code]]
        with self._lock:
            if any(len(mask.bitmap) * 8 <= slot for mask in self._masks.values()):
                self._masks.clear()  # the slots grew past the bitmaps
                return
            for watchlists, mask in self._masks.items():
                if watchlists and watchlists.isdisjoint(names):
                    continue
                mask.bitmap[slot >> 3] |= np.uint8(1 << (slot & 7))
                mask.count += 1
                if mask.slots is not None:
                    mask.slots = np.sort(np.append(mask.slots, slot)) if mask.count <= exact_limit else None

    def removed(self, slots: Sequence[int]) -> None:
        """Keeps cached masks valid after searchable templates left (hold the index's write lock)."""
        rows = np.array(slots, dtype=np.int64)
        with self._lock:
            for mask in self._masks.values():
                had = (mask.bitmap[rows >> 3] >> (rows & 7)) & 1
                # ufunc.at: two slots may share a byte, which a fancy-indexed &= would apply only once
                np.bitwise_and.at(mask.bitmap, rows >> 3, ~(np.uint8(1) << (rows & 7).astype(np.uint8)))
                mask.count -= int(had.sum())
                if mask.slots is not None:
                    mask.slots = mask.slots[~np.isin(mask.slots, rows)]
