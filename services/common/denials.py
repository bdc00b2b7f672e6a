"""Refused gRPC calls in the audit trail, without letting a flood of them flood the chain.

Refused are calls the access policy does not admit (UNAUTHENTICATED, PERMISSION_DENIED), requests over the field
limits (INVALID_ARGUMENT) and streams beyond the server's limit (RESOURCE_EXHAUSTED); the purpose of the record tells
the two groups apart (``access-control``, ``request-limits``).

Every refused call is logged (``rpc.py``); ``DenialAudit`` also appends it to the audit chain as ACCESS_DENIED, but
not one record per call: a client retrying with a bad token would otherwise grow the shared, append-only, never purged
chain as fast as it can call. Refusals are grouped by kind: the peer's address (without its port, which changes with
every connection), the principal, the method and the reason. The first refusal of a kind is appended at once and opens
a window (``window_s``, a minute by default); repeats within it are only counted, and when the window closes one more
record carries their number (``repeats``). So a kind costs at most two records a window, however fast it repeats.

The number of kinds open at once is bounded too (``max_kinds``): past it, refusals of further kinds (a client cycling
through addresses, say) are only counted, under one overflow kind per status code whose principal, method and peer are
``*``. Open windows are written out when the service stops (``close``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sightline.common.audit import ANONYMOUS, Action, AuditLog
from sightline.common.auth import Denial

log = logging.getLogger(__name__)

ACCESS_PURPOSE = "access-control"
LIMITS_PURPOSE = "request-limits"
_LIMIT_CODES = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"})
WINDOW_S = 60.0
MAX_KINDS = 1000
_OVERFLOW_REASON = "refused calls of more kinds than are counted one by one"
_Kind = tuple[str, str, str, str, str]


@dataclass
class _Window:
    sample: Denial  # the refusal the window's records describe
    opened: float  # time.monotonic()
    unwritten: int = 0  # refusals counted but not yet in the chain


class DenialAudit:
    """A GrpcServer ``on_denied`` callback that audits refused calls, repeats aggregated; thread-safe.

    Call ``close`` when the server has stopped and before the audit log closes: it writes the open windows' counts.
    """

    def __init__(self, audit: AuditLog, window_s: float = WINDOW_S, max_kinds: int = MAX_KINDS) -> None:
        self._audit = audit
        self._window_s = window_s
        self._max_kinds = max_kinds
        self._windows: dict[_Kind, _Window] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._closer = threading.Thread(target=self._close_due_windows, name="denial-audit", daemon=True)
        self._closer.start()

    def __call__(self, denial: Denial) -> None:
        kind = _kind_of(denial)
        with self._lock:
            overflowing = kind not in self._windows and len(self._windows) >= self._max_kinds
            if overflowing:  # only counted, under one kind per status code, until windows close
                denial = Denial(denial.code, "*", "*", _OVERFLOW_REASON, "*")
                kind = _kind_of(denial)
            window = self._windows.get(kind)
            if window is not None:
                window.unwritten += 1
                return
            self._windows[kind] = _Window(denial, time.monotonic(), unwritten=int(overflowing))
        self._wake.set()  # the closer may be waiting for a first window
        if not overflowing:
            self._append(denial, denial.peer)

    def close(self) -> None:
        """Stop closing windows on a timer and write every open window's repeats now."""
        self._stopping.set()
        self._wake.set()
        self._closer.join()
        with self._lock:
            windows, self._windows = list(self._windows.values()), {}
        self._write_repeats(windows)

    # -- internals ---------------------------------------------------------------------------------------------------

    def _close_due_windows(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                due = [kind for kind, window in self._windows.items() if now - window.opened >= self._window_s]
                closed = [self._windows.pop(kind) for kind in due]
                # Every window lasts as long, so the oldest open one closes first; none open: wait for a refusal.
                next_close = min((w.opened for w in self._windows.values()), default=None)
            self._write_repeats(closed)
            self._wake.wait(None if next_close is None else max(0.0, next_close + self._window_s - now))

    def _write_repeats(self, windows: list[_Window]) -> None:
        for window in windows:
            if not window.unwritten:
                continue
            counts: dict[str, int | str] = {"repeats": window.unwritten, "window_s": f"{self._window_s:g}"}
            try:
                self._append(window.sample, _host_of(window.sample.peer), counts)
            except Exception:
                log.error(
                    "could not audit %d repeated refused calls",
                    window.unwritten,
                    exc_info=True,
                    extra={"method": window.sample.method},
                )

    def _append(self, denial: Denial, peer: str, counts: dict[str, int | str] | None = None) -> None:
        purpose = LIMITS_PURPOSE if denial.code in _LIMIT_CODES else ACCESS_PURPOSE
        self._audit.append(
            denial.principal or ANONYMOUS,
            Action.ACCESS_DENIED,
            "",
            purpose,
            f"refused: {denial.code}",
            {"method": denial.method, "reason": denial.reason[:500], "peer": peer[:200], **(counts or {})},
        )


def _kind_of(denial: Denial) -> _Kind:
    return (_host_of(denial.peer), denial.principal, denial.method, denial.code, denial.reason)


def _host_of(peer: str) -> str:
    """A gRPC peer without its port ("ipv4:10.1.2.3:51234" -> "ipv4:10.1.2.3"): one client, however many connections."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
