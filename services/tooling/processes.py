"""Processes on this machine, told apart from later reuses of their pid, and reports on why one stopped.

Used by the local stack to find, signal and wait for processes it started, including ones started by an earlier
command and left running in the background (which are not our children, so ``wait()`` cannot be used).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 20
PR_SET_PDEATHSIG = 1

_prctl: Any
try:  # looked up here, in the parent: the child between fork and exec must not load libraries (locks)
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def exit_with_parent() -> None:
    """``preexec_fn`` for a child that must not outlive the process that started it (Linux: SIGTERM on its death).

    A foreground stack's services and broker belong to the test, demo or `sightline up` that started them; if that
    process is killed, they would otherwise run on, unowned, holding ports and CPU.
    """
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of a process (Linux /proc), which tells a pid apart from a later reuse of it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: fields are counted after its closing ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True if the process runs (not a zombie) and, when start_ticks is known, is still the same process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): fall back to signal 0, which cannot tell zombies or reuse apart
        return signal_zero(pid)
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def signal_zero(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_if_alive(pid: int, start_ticks: int | None, sig: int) -> None:
    if pid_alive(pid, start_ticks):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_group(pid: int, start_ticks: int | None) -> None:
    """SIGKILL a process and anything it started: each process leads its own session, so its group is its pid."""
    if pid_alive(pid, start_ticks):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            signal_if_alive(pid, start_ticks, signal.SIGKILL)


def wait_gone(records: list[tuple[int, int | None]], timeout: float) -> bool:
    """Wait until none of the (pid, start_ticks) processes runs; works for processes that are not our children."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid, ticks) for pid, ticks in records):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last lines of a log file (reads only its end: logs of a long run can be large)."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 64 * 1024))
            data = file.read()
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def crash_report(name: str, returncode: int | None, log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """What a user needs when a process died: who, how, its last log lines and where the full log is."""
    how = "is not running" if returncode is None else describe_exit(returncode)
    last = tail(log_path, lines)
    body = "\n".join(f"  {line}" for line in last) if last else "  (log is empty)"
    return f"{name} {how}; last lines of its log:\n{body}\nfull log: {log_path}"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name} (exit code {returncode})"
        except ValueError:
            pass
    return f"exited with code {returncode}"
