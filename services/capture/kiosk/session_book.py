"""The gate sessions of one capture replica, in memory: open ones and recently ended ones, with their watchers.

Bounded (``max_sessions`` open at once) and expiring (an ended session is kept ``ended_session_retention_s`` for a
kiosk that starts watching late). A frame's sequence number is handed out before it is published and never reused;
``frames_sent`` counts only the frames actually published, because decision waits for the results of that many
frames once the session is closed.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from sightline.capture.kiosk.claims import Claim
from sightline.common.rpc import NotFound
from sightline.v1 import session_pb2


class SessionNotOpen(RuntimeError):
    """The session is unknown here, closed or ended; becomes FAILED_PRECONDITION."""


class TooManySessions(RuntimeError):
    """The in-memory session limit is reached; becomes RESOURCE_EXHAUSTED."""


@dataclass
class GateSession:
    session_id: str
    gate_id: str
    claim: Claim
    stop_lists: list[str]
    opened_at: float  # epoch seconds
    deadline: float
    frames_sent: int = 0  # published on the frames topic
    frames_numbered: int = 0  # sequence numbers handed out: published, failed, or being published
    publishing: int = 0  # frames being published right now
    closed: bool = False
    outcome: session_pb2.SessionUpdate | None = None  # the final update, once the session has ended
    ended_at: float = 0.0
    progress: session_pb2.SessionUpdate | None = None
    watchers: list[queue.SimpleQueue] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.outcome is not None


class SessionBook:
    """Open sessions and recently ended ones (for kiosks that watch late), with their watchers; thread-safe."""

    def __init__(self, max_sessions: int, retention_s: float) -> None:
        self._sessions: dict[str, GateSession] = {}
        self._lock = threading.Lock()
        self._published = threading.Condition(self._lock)  # a frame's publication has finished
        self._max = max_sessions
        self._retention = retention_s

    def add(self, session: GateSession) -> None:
        with self._lock:
            if sum(not s.ended for s in self._sessions.values()) >= self._max:
                raise TooManySessions(f"{self._max} sessions are open on this capture replica")
            self._sessions[session.session_id] = session

    def next_frame(self, session_id: str) -> tuple[GateSession, int]:
        """The session and the sequence number of a frame about to be published, if frames may still be sent to it.
        ``frame_done`` must follow, whatever became of the frame."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.closed or session.ended:
                state = "unknown on this capture replica" if session is None else "ended" if session.ended else "closed"
                raise SessionNotOpen(f"session {session_id!r} is {state}: no more frames can be sent to it")
            session.frames_numbered += 1
            session.publishing += 1
            return session, session.frames_numbered

    def frame_done(self, session: GateSession, published: bool) -> int:
        """A frame's publication has finished (``published``: it is on the frames topic); returns the number of the
        session's frames published so far."""
        with self._lock:
            session.publishing -= 1
            session.frames_sent += published
            self._published.notify_all()
            return session.frames_sent

    def close(self, session_id: str, wait_s: float = 0.0) -> GateSession:
        """No more frames. Waits up to ``wait_s`` for frames still being published, so that ``frames_sent`` counts
        them (a kiosk may close while its last SendFrame is under way)."""
        with self._lock:
            session = self._get(session_id)
            session.closed = True
            self._published.wait_for(lambda: session.publishing == 0, timeout=wait_s)
            return session

    def subscribe(self, session_id: str) -> tuple[GateSession, queue.SimpleQueue]:
        """A queue of the session's updates, starting with its outcome (if it has ended) or its latest progress."""
        updates: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            session = self._get(session_id)
            latest = session.outcome or session.progress
            if latest is not None:
                updates.put(latest)
            if not session.ended:
                session.watchers.append(updates)
            return session, updates

    def unsubscribe(self, session: GateSession, updates: queue.SimpleQueue) -> None:
        with self._lock:
            if updates in session.watchers:
                session.watchers.remove(updates)

    def progress(self, session_id: str, update: session_pb2.SessionUpdate) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.ended:
                return
            session.progress = update
            for watcher in session.watchers:
                watcher.put(update)

    def finish(self, session_id: str, outcome: session_pb2.SessionUpdate) -> GateSession | None:
        """End the session with its outcome and tell its watchers; None if it is unknown here or already ended."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.ended:
                return None
            session.outcome, session.ended_at, session.closed = outcome, time.time(), True
            for watcher in session.watchers:
                watcher.put(outcome)
            session.watchers.clear()
            return session

    def still_open(self) -> list[GateSession]:
        """Sessions that have not ended (closed ones included: they wait for their outcome)."""
        with self._lock:
            return [s for s in self._sessions.values() if not s.ended]

    def overdue(self, now: float, grace_s: float) -> list[GateSession]:
        """Sessions still waiting for their outcome past the deadline plus the grace."""
        with self._lock:
            return [s for s in self._sessions.values() if not s.ended and now > s.deadline + grace_s]

    def forget_ended(self, now: float) -> None:
        with self._lock:
            for stale in [k for k, s in self._sessions.items() if s.ended and now - s.ended_at > self._retention]:
                del self._sessions[stale]

    def active_subjects(self) -> set[str]:
        with self._lock:
            return {s.claim.subject_id for s in self._sessions.values() if not s.ended}

    def _get(self, session_id: str) -> GateSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(
                f"session {session_id!r} is unknown on this capture replica (ended long ago, or opened on another one)"
            )
        return session
