"""Whether this replica may match: only while its index is known to be in step with the gallery database.

A replica's index can miss an erasure made elsewhere in two ways: it got the erasure notice but could not yet check the
database (an erasure pending), or it has not reached the database for a while (it cannot know what changed). In
either case it stops matching rather than serve subjects that may be erased: 1:N searches and 1:1 verifications raise
``GalleryUnavailable`` (UNAVAILABLE on the request path; a transient error on the stream path, so the frame is retried
later, not matched), and its gRPC health reports NOT_SERVING, until a check of the database succeeds again.

"Known to be in step" means: no erasure pending, and a successful check of the database within the last
``refresh_interval_s + max_staleness_s`` seconds (the refresher checks every ``refresh_interval_s``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sightline.common.rpc import Unavailable
from sightline.common.transient import TransientError

log = logging.getLogger(__name__)

# A search waits this long for a replica that is catching up (e.g. the moment after an erasure notice) before it is
# refused: catching up usually takes one database round trip.
READY_WAIT_S = 1.0


class GalleryUnavailable(Unavailable, TransientError):
    """This replica's index may be behind the gallery database; it refuses to match until it has caught up.

    UNAVAILABLE on the request path (``Unavailable``); on the stream path a transient failure (``TransientError``):
    the frame is retried later, never dead-lettered, as it says nothing about the frame."""


class Readiness:
    """The replica's in-step state; thread-safe. Listeners hear each change (True: ready), e.g. the gRPC health."""

    def __init__(self, stale_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._stale_after = stale_after_s
        self._clock = clock
        self._changed = threading.Condition()
        self._last_ok = clock()
        self._pending: dict[str, int] = {}  # subject id -> erasure notices not yet confirmed against the database
        self._listeners: list[Callable[[bool], None]] = []
        self._reported: bool | None = None
        self._report_lock = threading.Lock()  # one report at a time: listeners hear the changes in order
        self._closed = False
        self._watcher = threading.Thread(target=self._watch, name="gallery-readiness", daemon=True)
        self._watcher.start()

    # -- what the gallery reports ------------------------------------------------------------------------------

    def checked(self) -> None:
        """A check of the database succeeded: the index is in step as of now."""
        with self._changed:
            self._last_ok = self._clock()
            self._changed.notify_all()
        self._report()

    def erasure_pending(self, subject_id: str) -> None:
        """An erasure notice arrived: not ready until ``erasures_confirmed`` for a check that started after this."""
        with self._changed:
            self._pending[subject_id] = self._pending.get(subject_id, 0) + 1
            self._changed.notify_all()
        self._report()

    def pending_erasures(self) -> dict[str, int]:
        """The erasures pending now; pass them to ``erasures_confirmed`` once a check started after this succeeded."""
        with self._changed:
            return dict(self._pending)

    def erasures_confirmed(self, confirmed: dict[str, int]) -> None:
        """Those pending erasures are applied (notices arrived since stay pending)."""
        with self._changed:
            for subject_id, count in confirmed.items():
                left = self._pending.get(subject_id, 0) - count
                if left > 0:
                    self._pending[subject_id] = left
                else:
                    self._pending.pop(subject_id, None)
            self._changed.notify_all()
        self._report()

    # -- what searches and probes ask --------------------------------------------------------------------------

    def why_not_ready(self) -> str:
        """ "" when ready, else why not (no subject ids: they would end up in callers' logs)."""
        with self._changed:
            return self._why_not()

    def require(self, wait_s: float = READY_WAIT_S) -> None:
        """Returns when ready, waiting up to ``wait_s`` for a replica catching up; else raises GalleryUnavailable."""
        deadline = self._clock() + wait_s
        with self._changed:
            while why := self._why_not():
                left = deadline - self._clock()
                if left <= 0:
                    raise GalleryUnavailable(f"this matching replica is not matching: {why}; retry later")
                self._changed.wait(left)

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        """Calls ``listener(ready)`` now and at every change."""
        with self._report_lock:
            with self._changed:
                self._listeners.append(listener)
                ready = not self._why_not()
            listener(ready)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._watcher.join(timeout=2)

    # -- internals ---------------------------------------------------------------------------------------------

    def _why_not(self) -> str:
        if self._pending:
            count = sum(self._pending.values())
            return f"{count} erasure notice(s) not yet confirmed against the gallery database"
        age = self._clock() - self._last_ok
        if age > self._stale_after:
            return f"no successful check of the gallery database for {age:.0f} s (it may have missed erasures)"
        return ""

    def _report(self) -> None:
        with self._report_lock:
            with self._changed:
                why = self._why_not()
                ready = not why
                if ready == self._reported:
                    return
                self._reported = ready
                listeners = list(self._listeners)
            if ready:
                log.info("matching replica in step with the gallery database again: matching")
            else:
                log.warning("matching replica stops matching: %s", why)
            for listener in listeners:
                listener(ready)

    def _watch(self) -> None:
        """Turns NOT_SERVING when the last check grows too old, even while a check hangs (nothing else reports)."""
        while True:
            with self._changed:
                if self._closed:
                    return
                until_stale = self._last_ok + self._stale_after - self._clock()
                self._changed.wait(max(0.05, min(until_stale + 0.01, 1.0)))
            self._report()
