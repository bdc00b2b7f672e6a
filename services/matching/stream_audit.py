"""Audit of stream searches, aggregated: one STREAM_SEARCH record per source and purpose per interval.

Matching searches every face on the embeddings topic against the gallery. Those searches are audited, but not one
record per face: a camera yields several faces a second, so per-face records would add millions of records a day to
the chain, each saying only "a camera saw someone", and every search would wait its turn on the chain's head row,
which all replicas of matching and decision share. What an auditor needs of the stream is which sources were searched
against which watchlists, when, how much, and how often something came within threshold; the hits that matter are
audited individually by the decision service (ALERT, then REVIEW).

So ``StreamSearchAudit.count`` adds each frame to a tally per (source, purpose), and every ``interval_s`` (default
60 s, ``SIGHTLINE_MATCHING_STREAM_AUDIT_INTERVAL_S``) and once more at shutdown each tally with activity becomes one
record: principal ``service:matching``, details ``source_id``, ``frames``, ``faces_searched``, ``verifications``,
``watchlists_searched`` ("*" for every list), ``candidates_within_threshold`` and the period covered. A tally whose
append fails (database down) is kept and merged into the next record, so nothing is lost while the process lives.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sightline.common.audit import Action, AuditLog, format_time
from sightline.matching.audit_trail import SERVICE_PRINCIPAL, joined_names
from sightline.v1 import types_pb2

log = logging.getLogger(__name__)

ALL_WATCHLISTS = "*"
PURPOSES = {
    types_pb2.PURPOSE_CCTV: "cctv-watchlist",
    types_pb2.PURPOSE_ECHANNEL: "border-echannel",
}
DEFAULT_PURPOSE = "stream-search"


@dataclass
class _Tally:
    frames: int = 0
    faces: int = 0
    verifications: int = 0
    within_threshold: int = 0
    watchlists: set[str] = field(default_factory=set)
    first_at: datetime | None = None
    last_at: datetime | None = None

    def merge(self, other: _Tally) -> None:
        self.frames += other.frames
        self.faces += other.faces
        self.verifications += other.verifications
        self.within_threshold += other.within_threshold
        self.watchlists |= other.watchlists
        starts = [at for at in (self.first_at, other.first_at) if at is not None]
        ends = [at for at in (self.last_at, other.last_at) if at is not None]
        self.first_at, self.last_at = min(starts, default=None), max(ends, default=None)

    def details(self, source_id: str) -> dict[str, object]:
        return {
            "source_id": source_id,
            "frames": self.frames,
            "faces_searched": self.faces,
            "verifications": self.verifications,
            "candidates_within_threshold": self.within_threshold,
            "watchlists_searched": _names(self.watchlists),
            "from": format_time(self.first_at) if self.first_at else "",
            "to": format_time(self.last_at) if self.last_at else "",
        }


def _names(watchlists: set[str]) -> str:
    return ALL_WATCHLISTS if ALL_WATCHLISTS in watchlists else joined_names(watchlists)


class StreamSearchAudit:
    """Tallies stream searches per (source, purpose) and writes them to the audit log every ``interval_s``."""

    def __init__(self, audit: AuditLog, interval_s: float = 60.0, principal: str = SERVICE_PRINCIPAL) -> None:
        if interval_s <= 0:
            raise ValueError(f"the stream audit interval must be positive, got {interval_s}")
        self._audit = audit
        self._interval = interval_s
        self._principal = principal
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time, so records of one source stay in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-audit", daemon=True)
        self._thread.start()

    def count(self, frame: types_pb2.FrameRef, faces: int, within_threshold: int, verifications: int = 0) -> None:
        """Adds one searched frame of ``frame.source_id``."""
        now = datetime.now(UTC)
        key = (frame.source_id, PURPOSES.get(frame.purpose, DEFAULT_PURPOSE))
        searched: Sequence[str] = frame.watchlists or (ALL_WATCHLISTS,)
        with self._lock:
            tally = self._tallies.setdefault(key, _Tally())
            tally.frames += 1
            tally.faces += faces
            tally.verifications += verifications
            tally.within_threshold += within_threshold
            if faces:
                tally.watchlists.update(searched)
            tally.first_at = tally.first_at or now
            tally.last_at = now

    def flush(self) -> int:
        """Writes one record per tally with activity; returns how many were written."""
        with self._flush_lock:
            with self._lock:
                tallies, self._tallies = self._tallies, {}
            written = 0
            for (source_id, purpose), tally in sorted(tallies.items()):
                try:
                    self._audit.append(
                        self._principal, Action.STREAM_SEARCH, "", purpose, "ok", tally.details(source_id)
                    )
                    written += 1
                except Exception:
                    log.warning("could not write a stream-search audit record; will retry", exc_info=True)
                    with self._lock:
                        tally.merge(self._tallies.get((source_id, purpose), _Tally()))
                        self._tallies[(source_id, purpose)] = tally
            return written

    def close(self) -> None:
        """Stops the timer and writes what is left (at shutdown)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()
