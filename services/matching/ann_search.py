"""How ``ann.AnnIndex`` answers a 1:N search: shortlist the slots near each probe, then rank subjects exactly.

- Shortlist by the IVF (``ann_ivf``): a probe is compared with the codes of its ``probes`` nearest lists and the
  nearest ``shortlist`` rows (at least ``top_k`` x the most templates any subject has) are re-ranked with the float32
  vectors, so every distance returned is exact: only recall is approximate.
- Each candidate subject's distance is the minimum over all its templates (not only those in the shortlist), and
  results hold one candidate per subject, like ``index.SearchIndex``.
- Watchlists: a search may return only the slots of its mask (``ann_masks``). When few slots are allowed (at most
  ``exact_rows``, or ``exact_share`` of the IVF's rows, and never more than ``exact_rows_max``) the search is exact
  over just those slots: a small list's members need not be in the lists a probe scans. Otherwise the bitmap goes into
  faiss's search (``IDSelectorBitmap``), which skips other slots while it scans: no oversampling is needed, and when
  the probed lists hold fewer allowed slots than the shortlist wants the search widens (4x the lists, up to all of
  them, which is exhaustive).
- Below ``exact_below`` searchable templates no IVF is trained and every search is exact.

The caller holds the index's read lock.
"""

from __future__ import annotations

import numpy as np

from sightline.matching.ann_masks import Mask
from sightline.matching.ann_state import State
from sightline.matching.index import Candidate

_WIDEN = 4


def exact_shortlists(state: State, probes: np.ndarray, mask: Mask, wanted: int) -> list[np.ndarray]:
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


def ann_shortlists(
    state: State, probes: np.ndarray, mask: Mask | None, wanted: int, shortlist: int
) -> list[np.ndarray]:
    """The IVF's nearest allowed slots per probe (at least ``shortlist``), widening the scan for probes that found
    too few."""
    assert state.ivf is not None
    ivf = state.ivf
    count = min(max(shortlist, wanted), ivf.size)
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


def candidates(state: State, vector: np.ndarray, slots: np.ndarray, top_k: int, hidden: set[str]) -> list[Candidate]:
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
    # Ties by subject id, as shards.merge breaks them: a sharded gallery then gives exactly the same candidates.
    ranked = sorted(best.items(), key=lambda item: (item[1][0], state.subject_of[item[0]] or ""))
    found: list[Candidate] = []
    for code, (distance, slot) in ranked:
        subject = state.subject_of[code]
        if subject is None or subject in hidden:
            continue
        found.append(
            Candidate(
                subject_id=subject,
                distance=distance,
                watchlists=state.wl_sets[state.wlset[code]],
                template_id=int(state.tid[slot]),
            )
        )
        if len(found) == top_k:
            break
    return found
