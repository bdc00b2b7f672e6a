"""Keeps the local stack's services running: a crashed service is started again after a backoff, as Kubernetes does.

Kubernetes restarts a crashed container after 10 s, doubling the wait after each crash that follows up to 5 minutes,
and forgets the crashes once the container has run for 10 minutes. The local stack does the same with waits suited
to a laptop (``RestartSettings``): 1 s, doubling up to 60 s, forgotten after 60 s up. A crash is any exit of a
service process the stack did not ask for (a SIGKILL, an uncaught error, a failed start), so a service that fails at
every start is retried ever more slowly instead of in a tight loop; ``sightline status`` shows it as BACKOFF with the
time to its next start, its restart count and how it last ended.

The process that owns a stack supervises it: ``sightline up`` (in the foreground, or the background process behind
``--detach``) calls ``tick`` in its loop; a benchmark or a test runs ``Supervisor.start``, a thread that lives as long
as the stack (a child is sent SIGTERM when the thread that started it ends: PR_SET_PDEATHSIG, processes.py).

``sightline restart NAME`` reaches the supervisor through the run dir: ``request_restart`` drops a file in
``<run dir>/requests/``, the supervisor stops that process (SIGTERM) and starts it again, and ``restart_through``
waits until the new process is SERVING. A requested restart counts as a restart and clears the crash backoff.
The broker is not restarted: its storage is memory only, so a new one would hold no topics, offsets or records
(``sightline down && sightline up`` starts afresh).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common.config import SightlineSettings
from sightline.common.transient import Backoff
from sightline.tooling.localstack import HOST, LocalStack, ProcessRecord, StackError, load_state, service_of
from sightline.tooling.processes import tail

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the supervisor looks for crashed processes and restart requests
REQUESTS_DIR = "requests"
_REQUEST_PREFIX = "restart-"


class RestartSettings(SightlineSettings):
    """How the local stack restarts a crashed service (``SIGHTLINE_LOCAL_RESTART_*``); see the module docstring."""

    config_section: ClassVar[str] = "local_restart"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_LOCAL_RESTART_", extra="ignore")

    enabled: bool = Field(True, description="Restart a crashed service of the local stack (false: report it only).")
    initial_backoff_s: float = Field(
        1.0, gt=0, le=3600, description="Wait before restarting a service after its first crash, in seconds."
    )
    max_backoff_s: float = Field(
        60.0, gt=0, le=3600, description="Longest wait between restarts: the wait doubles after each crash up to this."
    )
    reset_after_s: float = Field(
        60.0, gt=0, description="A service that ran this long before it crashed starts again from the first wait."
    )

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.initial_backoff_s, max(self.initial_backoff_s, self.max_backoff_s))


@dataclass
class _Watch:
    """The supervisor's memory of one process: its crashes in a row, and when it is due to start again."""

    crashes: int = 0
    due: float | None = None  # monotonic time of the next start while it is down


Notify = Callable[[str], None]


class Supervisor:
    """Restarts the crashed services of a started ``LocalStack`` and serves restart requests.

    ``notify`` receives one human-readable message per event (a crash with its log tail, a restart); by default
    they are logged. Use ``tick()`` from the owner's own loop, or ``start()`` for a thread (``with`` stops it).
    """

    def __init__(self, stack: LocalStack, settings: RestartSettings | None = None, notify: Notify | None = None):
        self.stack = stack
        self.settings = settings or RestartSettings()
        self._notify = notify or (lambda message: log.warning("%s", message))
        self._watches: dict[str, _Watch] = {}
        self._broker_reported = False
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self) -> Self:
        """Record the supervision in the stack's state file (so ``sightline restart`` and ``down`` find it)."""
        self.stack.mark_supervised()
        self.stack.before_stop(self.halt)
        return self

    # One round ----------------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Serve restart requests, notice crashed processes, and start those whose backoff has passed."""
        if not self.stack.running:
            return
        for name in take_requests(self.stack.run_dir, self.stack.processes):
            self._restart_on_request(name)
        now = time.monotonic()
        for name, returncode in self.stack.poll_crashed():
            if name == "broker":
                self._broker_died(returncode)
                continue
            watch = self._watches.setdefault(name, _Watch())
            if watch.due is None:
                self._crashed(name, returncode, watch, now)
            elif now >= watch.due:
                self._restart_crashed(name, watch)

    def _crashed(self, name: str, returncode: int, watch: _Watch, now: float) -> None:
        record = self.stack.record(name)
        report = self.stack.crash_report(name)
        if not self.settings.enabled:
            watch.due = float("inf")  # reported once, never restarted
            self.stack.note_exit(name, returncode)
            self._notify(f"{report}\n{name} is not restarted (SIGHTLINE_LOCAL_RESTART_ENABLED is false)")
            return
        uptime = time.time() - (record.started_at or time.time())
        if uptime >= self.settings.reset_after_s:
            watch.crashes = 0  # it had been running well: a fresh start of the backoff, as Kubernetes does
        watch.crashes += 1
        delay = self.settings.backoff.delay(watch.crashes)
        watch.due = now + delay
        self.stack.note_exit(name, returncode, restart_at=time.time() + delay, backoff_s=delay)
        self._notify(
            f"{report}\nrestarting {name} in {delay:g} s (it ran {uptime:.1f} s; crash {watch.crashes} in a row, "
            f"restart {record.restarts + 1})"
        )

    def _restart_crashed(self, name: str, watch: _Watch) -> None:
        try:
            started = self.stack.respawn(name)
        except OSError as error:  # e.g. out of processes: try again after the next wait
            watch.crashes += 1
            delay = self.settings.backoff.delay(watch.crashes)
            watch.due = time.monotonic() + delay
            self._notify(f"could not start {name} again ({error}); trying again in {delay:g} s")
            return
        watch.due = None
        if started:
            self._notify(f"restarted {name} (pid {self.stack.record(name).pid})")

    def _restart_on_request(self, name: str) -> None:
        if self.stack.replace(name):
            self._watches[name] = _Watch()  # asked for: a fresh start, not a crash
            self._notify(f"restarted {name} on request (pid {self.stack.record(name).pid})")

    def _broker_died(self, returncode: int) -> None:
        if not self._broker_reported:
            self._broker_reported = True
            self._notify(
                f"{self.stack.crash_report('broker')}\nthe broker is not restarted: its storage is memory only, so a "
                "new one would hold none of the topics or records; stop the stack and start it again"
            )

    # As a thread ----------------------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Attach and supervise from a thread until the stack stops (or ``halt``)."""
        self.attach()
        self._thread = threading.Thread(target=self._run, name="stack-supervisor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._halt.wait(POLL_S):
            try:
                self.tick()
            except Exception:  # the supervisor must outlive one bad round
                log.exception("supervisor round failed")

    def halt(self) -> None:
        """Stop supervising (the stack calls this first when it stops)."""
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.halt()


# --- restart requests: `sightline restart` and the supervisor, through the run dir ----------------------------------


def request_restart(run_dir: Path, process: str) -> None:
    """Ask the supervisor of the stack in ``run_dir`` to restart one of its processes."""
    folder = Path(run_dir) / REQUESTS_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / f"{_REQUEST_PREFIX}{process}").touch()


def take_requests(run_dir: Path, processes: tuple[str, ...]) -> list[str]:
    """The processes asked to be restarted since the last look, in pipeline order; the requests are consumed.
    Only the stack's own process names are taken from the file names."""
    folder = Path(run_dir) / REQUESTS_DIR
    try:
        names = {path.name.removeprefix(_REQUEST_PREFIX): path for path in folder.iterdir()}
    except FileNotFoundError:
        return []
    for path in names.values():
        path.unlink(missing_ok=True)
    return [process for process in processes if process in names]


def restart_through(run_dir: Path, name: str, timeout: float = 120.0) -> list[tuple[str, ProcessRecord]]:
    """Restart a process of a running stack through its supervisor and wait until it is SERVING again; ``name`` is a
    process or a service (every matching shard, one after the other). Returns each process's new record.

    Raises KeyError for a name the stack does not run and StackError when no stack or no supervisor runs, or a
    process is not SERVING again within ``timeout``.
    """
    state = load_state(run_dir)
    if state is None:
        raise StackError(f"no local stack recorded in {run_dir} (start one with `sightline up`)")
    names = [process for process in state.services if name in (process, service_of(process))]
    if not names:
        raise KeyError(f"no process {name!r} in the stack; it runs {', '.join(state.services)}")
    if not (state.supervised and state.owner_alive()):
        raise StackError(
            f"the stack in {run_dir} has no supervisor running (it was started by a program that does not restart "
            "services, or its `sightline up` is gone): stop it with `sightline down` and start it with `sightline up`"
        )
    done = []
    for process in names:
        before = state.services[process]
        request_restart(run_dir, process)
        done.append((process, _wait_restarted(Path(run_dir), process, before, time.monotonic() + timeout)))
    return done


def _wait_restarted(run_dir: Path, process: str, before: ProcessRecord, deadline: float) -> ProcessRecord:
    from sightline.common.rpc import check_health  # grpc is heavy: only the waiting needs it

    while True:
        state = load_state(run_dir)
        if state is None or not state.owner_alive():
            raise StackError(f"the stack in {run_dir} stopped while {process} was being restarted")
        record = state.services[process]
        if (record.pid, record.start_ticks) != (before.pid, before.start_ticks) and record.alive():
            if check_health(f"{HOST}:{record.port}", timeout=1.0) == "SERVING":
                return record
        if time.monotonic() > deadline:
            lines = "\n".join(f"  {line}" for line in tail(Path(record.log), 10))
            raise StackError(f"{process} is not SERVING again in time; last lines of {record.log}:\n{lines}")
        time.sleep(0.25)
