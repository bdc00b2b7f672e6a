"""The IVF of ``ann.AnnIndex``: a faiss ``IVF<lists>,SQ8`` index (a k-means coarse quantizer, 8-bit codes) keyed by
slot number, which shortlists the rows a probe is then compared with exactly.

It holds the searchable templates only (verify-only subjects are never put in it). Its lists are sized once when it
is built: growing them entry by entry would leave up to half of their memory as spare capacity (~70 B per template,
measured at 1M). A removed entry's code is zeroed before faiss drops it, so its bytes do not linger in a list's spare
tail. faiss is imported only when an IVF is made, so exact-only uses of the index do not need it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

_TRAIN_POINTS_PER_LIST = 40  # faiss warns below 39 training points per list
_ADD_CHUNK = 65_536  # rows handed to faiss per call when building: bounds the temporary copies


class Ivf:
    """faiss ``IVF<lists>,SQ8`` keyed by slot number, with a hash map from slot to its place (for removal)."""

    def __init__(self, index: Any) -> None:
        import faiss

        self._faiss = faiss
        self.index = index
        self.ivf = faiss.extract_index_ivf(index)
        self.lists = int(self.ivf.nlist)

    @classmethod
    def trained(cls, sample: np.ndarray, lists: int, threads: int) -> Ivf:
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.index_factory(sample.shape[1], f"IVF{lists},SQ8")
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        made = cls(index)
        made.ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return made

    @classmethod
    def built(cls, vectors: np.ndarray, slots: np.ndarray, lists: int, threads: int) -> Ivf:
        """An IVF trained on a sample of ``vectors[slots]`` (seeded by their number, so a rebuild is repeatable) and
        holding all of them; at most one list per slot."""
        lists = max(1, min(lists, len(slots)))
        rng = np.random.default_rng(len(slots))
        sample = slots[rng.choice(len(slots), min(len(slots), _TRAIN_POINTS_PER_LIST * lists), replace=False)]
        ivf = cls.trained(vectors[np.sort(sample)], lists, threads)
        ivf.fill(slots, vectors)
        return ivf

    @classmethod
    def from_bytes(cls, data: np.ndarray) -> Ivf:
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
