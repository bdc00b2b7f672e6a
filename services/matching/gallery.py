"""The gallery as the matching service sees it: the encrypted store, the in-memory index, and how they stay in step.

Writes go to the store first and then to this replica's index; other replicas notice the store's version change
within ``refresh_interval_s`` and reload. Searches only ever touch the index.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from sightline.common import scores, telemetry
from sightline.matching.index import SearchIndex
from sightline.matching.store import GalleryStore
from sightline.v1 import types_pb2

log = logging.getLogger(__name__)
SERVICE = "matching"


class Gallery:
    def __init__(self, store: GalleryStore, max_distance: float, refresh_interval_s: float = 2.0) -> None:
        self.store = store
        self.index = SearchIndex()
        self.max_distance = max_distance
        self._version = -1
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self.reload()
        self._refresher = threading.Thread(target=self._refresh_loop, args=(refresh_interval_s,), daemon=True)
        self._refresher.start()

    def reload(self) -> None:
        version = self.store.version()
        self.index.replace_all(self.store.load_templates())
        self._version = version
        self._report_size()

    def _refresh_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                if self.store.version() != self._version:
                    with self._write_lock:
                        self.reload()
                    log.info("gallery reloaded after a change elsewhere", extra={"templates": self.index.size})
            except Exception:  # noqa: BLE001 - a database hiccup must not stop the refresher
                log.exception("gallery refresh failed; will retry")

    def close(self) -> None:
        self._stop.set()
        self.store.close()

    def enroll(self, subject_id: str, display_name: str, watchlists: Sequence[str],
               vectors: Sequence[np.ndarray], model: tuple[str, str], qualities: Sequence[float]) -> int:  # fmt: skip
        with self._write_lock:
            self.store.add_subject(subject_id, display_name, list(watchlists))
            record = self.store.get_subject(subject_id)
            memberships = list(record.watchlists) if record else list(watchlists)
            self.index.set_watchlists(subject_id, memberships)  # memberships may grow for an enrolled subject
            for vector, quality in zip(vectors, qualities, strict=True):
                template_id = self.store.add_template(subject_id, vector, model[0], model[1], quality)
                self.index.add(template_id, subject_id, vector, memberships)
            self._version = self.store.version()
        self._report_size()
        return len(vectors)

    def delete(self, subject_id: str) -> int:
        with self._write_lock:
            removed = self.store.delete_subject(subject_id)
            self.index.remove_subject(subject_id)
            self._version = self.store.version()
        self._report_size()
        return removed

    def search(self, vectors: np.ndarray, top_k: int, watchlists: Sequence[str] = ()) -> list[list[types_pb2.MatchCandidate]]:
        results = self.index.search(vectors, top_k=top_k, watchlists=list(watchlists))
        return [
            [types_pb2.MatchCandidate(subject_id=c.subject_id, distance=c.distance,
                                      similarity=scores.similarity(c.distance), watchlists=sorted(c.watchlists),
                                      fmr=scores.fmr(c.distance))
             for c in candidates]  # fmt: skip
            for candidates in results
        ]

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
