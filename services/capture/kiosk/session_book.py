"""The gate sessions as one capture replica serves them: the shared store, plus what only this replica knows.

The sessions themselves (claim, deadline, frame counters, closed, outcome) are in the store every replica shares
(``session_store.py``), so any replica can continue any session. This replica's memory keeps only what belongs to its
own connections and threads: the kiosks watching a session through it, the frames it is publishing right now (a
close waits for them, so that they are counted), and the latest progress its relay read for each session (for a
kiosk that starts watching between two updates).

A frame's sequence number is handed out by the store before the frame is published and never reused;
``frames_sent`` counts only the frames actually published, because decision waits for the results of that many
frames once the session is closed. An ended session stays in the store ``retention_s`` for a kiosk that watches late.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from sightline.capture.kiosk.session_store import GateSession, GateSessionStore, SessionNotOpen
from sightline.common.rpc import NotFound
from sightline.v1 import session_pb2

Update = session_pb2.SessionUpdate
Told = tuple[Update, bool]  # what a watcher's queue holds: an update, and whether it is the outcome (the last one)


@dataclass
class _Local:
    """What this replica alone knows of a session."""

    watchers: list[queue.SimpleQueue[Told]] = field(default_factory=list)
    publishing: int = 0  # frames being published by this replica right now
    progress: Update | None = None  # the latest PROGRESS this replica's relay read
    ended: bool = False  # its watchers here have been told the outcome
    seen_at: float = field(default_factory=time.monotonic)


class SessionBook:
    """Gate sessions over the shared store, with this replica's watchers and publications; thread-safe."""

    def __init__(self, store: GateSessionStore, max_sessions: int, retention_s: float, idle_s: float) -> None:
        """``idle_s``: how long this replica keeps its memory of a session nobody watches or sends frames to here
        (longer than a session lives plus ``retention_s``)."""
        self.store = store
        self._local: dict[str, _Local] = {}
        self._lock = threading.Lock()
        self._published = threading.Condition(self._lock)  # a frame's publication has finished
        self._max = max_sessions
        self._retention = retention_s
        self._idle = idle_s

    def add(self, session: GateSession) -> None:
        """Store a new session; TooManySessions when ``max_sessions`` are open over all replicas."""
        self.store.add(session, self._max)

    def next_frame(self, session_id: str) -> tuple[GateSession, int]:
        """The session and the sequence number of a frame about to be published, if frames may still be sent to it.
        ``frame_done`` must follow, whatever became of the frame."""
        with self._lock:  # counted before the number is taken: a close on this replica then waits for the frame
            self._of(session_id).publishing += 1
        try:
            session, sequence = self.store.number_frame(session_id)
        except BaseException:
            self._publication_over(session_id)
            raise
        if not sequence:
            self._publication_over(session_id)
            state = "unknown" if session is None else session.state
            raise SessionNotOpen(f"session {session_id!r} is {state}: no more frames can be sent to it")
        assert session is not None
        return session, sequence

    def frame_done(self, session: GateSession, published: bool) -> int | None:
        """A frame's publication has finished (``published``: it is on the frames topic); the number of the session's
        frames published so far, or None when this one was not."""
        try:
            return self.store.count_published(session.session_id) if published else None
        finally:
            self._publication_over(session.session_id)

    def close(self, session_id: str, wait_s: float = 0.0) -> GateSession:
        """No more frames. Waits up to ``wait_s`` for frames this replica is still publishing, so that ``frames_sent``
        counts them (a kiosk may close while its last SendFrame is under way)."""
        session = self.store.close_session(session_id)
        if session is None:
            raise _unknown(session_id)
        with self._lock:
            local = self._local.get(session_id)
            if local is None or local.publishing == 0:
                return session
            self._published.wait_for(lambda: local.publishing == 0, timeout=wait_s)
        return self.store.get(session_id) or session

    def subscribe(self, session_id: str) -> tuple[GateSession, queue.SimpleQueue[Told]]:
        """A queue of the session's updates, starting with its outcome (if it has ended) or its latest progress."""
        session = self.store.get(session_id)
        if session is None:
            raise _unknown(session_id)
        updates: queue.SimpleQueue[Told] = queue.SimpleQueue()
        with self._lock:
            local = self._of(session_id)
            if session.outcome is not None:
                updates.put((session.outcome, True))
                return session, updates
            if local.progress is not None:
                updates.put((local.progress, False))
            # An outcome stored between the read above and now is told by the next ``sync``.
            local.watchers.append(updates)
            return session, updates

    def unsubscribe(self, session_id: str, updates: queue.SimpleQueue[Told]) -> None:
        with self._lock:
            local = self._local.get(session_id)
            if local is not None and updates in local.watchers:
                local.watchers.remove(updates)

    def progress(self, session_id: str, update: Update) -> None:
        """Decision's latest progress, for this replica's watchers (every replica reads every progress)."""
        with self._lock:
            local = self._of(session_id)
            if local.ended:
                return
            local.progress = update
            for watcher in local.watchers:
                watcher.put((update, False))

    def latest_progress(self, session_id: str) -> Update | None:
        with self._lock:
            local = self._local.get(session_id)
            return local.progress if local is not None else None

    def finish(self, session_id: str, outcome: Update) -> GateSession | None:
        """End the session with its outcome and tell this replica's watchers; the session when this call ended it,
        None when it is unknown or had ended already (its watchers here are then told the outcome that stands)."""
        ended_here, session = self.store.finish(session_id, outcome, time.time())
        if session is not None and session.outcome is not None:
            self._tell(session_id, session.outcome)
        return session if ended_here else None

    def sync(self) -> None:
        """Tell this replica's watchers the outcomes stored by other replicas (a cancellation or an expiry there), or
        stored while they subscribed."""
        with self._lock:
            watched = [session_id for session_id, local in self._local.items() if local.watchers]
        if watched:
            for session in self.store.ended_among(watched):
                assert session.outcome is not None
                self._tell(session.session_id, session.outcome)

    def open_sessions(self) -> list[GateSession]:
        """Sessions that have not ended, on every replica (closed ones included: they wait for their outcome)."""
        return self.store.open_sessions()

    def overdue(self, now: float, grace_s: float) -> list[GateSession]:
        """Sessions still waiting for their outcome past the deadline plus the grace."""
        return self.store.overdue(now - grace_s)

    def forget_ended(self, now: float) -> int:
        """Purge the sessions ended more than the retention ago from the store, and this replica's memory of sessions
        idle here; how many were purged."""
        purged = self.store.purge_ended(now - self._retention)
        idle_since = time.monotonic() - self._idle
        with self._lock:
            for stale in [
                session_id
                for session_id, local in self._local.items()
                if not local.watchers and not local.publishing and local.seen_at < idle_since
            ]:
                del self._local[stale]
        return purged

    def active_subjects(self) -> set[str]:
        """The claimed subjects of the sessions that have not ended, on every replica."""
        return self.store.active_subjects()

    def _of(self, session_id: str) -> _Local:
        """This replica's memory of the session, made when first needed (under the lock)."""
        local = self._local.get(session_id)
        if local is None:
            local = self._local[session_id] = _Local()
        local.seen_at = time.monotonic()
        return local

    def _publication_over(self, session_id: str) -> None:
        with self._lock:
            self._of(session_id).publishing -= 1
            self._published.notify_all()

    def _tell(self, session_id: str, outcome: Update) -> None:
        with self._lock:
            local = self._of(session_id)
            local.ended = True
            for watcher in local.watchers:
                watcher.put((outcome, True))
            local.watchers.clear()


def _unknown(session_id: str) -> NotFound:
    return NotFound(f"session {session_id!r} is unknown (ended long ago, or never opened)")
