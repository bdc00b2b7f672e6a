"""When a replica writes an encrypted snapshot of its index: some time after the gallery changed, sooner after a
removal.

A snapshot lets the next start of a replica skip decrypting the whole gallery (snapshots.py). Writing one costs a
dump of the index (seconds at a million templates, during which enrolments wait), so it is not written on every
change: ``interval_s`` after the first change since the last snapshot. A deletion or erasure is different: the
snapshots on disk still hold the removed templates (encrypted), so a fresh snapshot replaces them within
``after_removal_s``, and the older ones are deleted with it. Each write is followed by pruning the change log of
what no replica needs any more (``after_write``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sightline.matching.ann import AnnIndex
from sightline.matching.snapshots import SnapshotStore

log = logging.getLogger(__name__)

_RETRY_S = 30.0  # after a failed write (disk full, directory gone)


class SnapshotWriter:
    """A background thread that writes ``snapshots`` of ``source()`` (the index and the version it covers)."""

    def __init__(
        self,
        snapshots: SnapshotStore,
        source: Callable[[], tuple[AnnIndex, int]],
        interval_s: float,
        after_removal_s: float,
        after_write: Callable[[], None] = lambda: None,
    ) -> None:
        self._snapshots = snapshots
        self._source = source
        self._interval = interval_s
        self._after_removal = after_removal_s
        self._after_write = after_write
        self._due: float | None = None  # monotonic time of the next write; None: nothing to write
        self._written_version: int | None = None
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="gallery-snapshot", daemon=True)
        self._thread.start()

    def changed(self, removal: bool = False, now: bool = False) -> None:
        """The index changed (``removal``: a subject left it; ``now``: write as soon as possible, e.g. after a full
        load, so that the next start is quick)."""
        self._schedule(0.0 if now else self._after_removal if removal else self._interval)

    def _schedule(self, delay: float) -> None:
        with self._wake:
            due = time.monotonic() + delay
            if self._due is None or due < self._due:
                self._due = due
                self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and (self._due is None or self._due > time.monotonic()):
                    self._wake.wait(None if self._due is None else self._due - time.monotonic())
                if self._stop:
                    return
                self._due = None
            try:
                self._write()
            except Exception:
                log.warning("gallery snapshot failed; will retry", exc_info=True)
                self._schedule(_RETRY_S)

    def _write(self) -> None:
        index, version = self._source()
        if version == self._written_version:
            return
        started = time.monotonic()
        info = self._snapshots.write(index, version)
        self._written_version = version
        log.info(
            "gallery snapshot written",
            extra={"version": version, "bytes": info.size_bytes, "seconds": round(time.monotonic() - started, 2)},
        )
        self._after_write()
