"""The local stack: the embedded broker and the five services as separate processes on one machine.

``sightline up``/``status``/``down``, the demo and the integration tests all run Sightline through this engine. It
starts the Tansu broker, creates the topics, starts every service (``python -m sightline.<service>``, configured only
by environment variables) and waits until each answers SERVING on its gRPC health service. Each process writes its
stdout and stderr to ``<run dir>/logs/<name>.log``, so all logs are in one place.

A state file, ``<run dir>/stack.json``, records pids, ports and log paths, so that a later command (``sightline
status``, ``sightline down``, ``sightline restart``) can find a stack started by another process, including one left
running in the background. Pids are stored with the kernel's start time of the process, so a recycled pid is never
mistaken for (or signalled as) one of ours. Each process's record also keeps how often it was restarted, how the
process before it ended, and, while it waits to be started again, when that will be.

Restarting crashed services is the supervisor's job (``supervisor.py``): the process that owns the stack (``sightline
up``, in the foreground or in the background behind ``--detach``, or a benchmark) runs one, and records it in the
state file. This module gives it the means: ``poll_crashed``, ``note_exit``, ``respawn`` and ``replace``, all safe to
call from the supervisor's thread while another thread uses the stack.

Every start makes fresh bearer tokens (see docs/security.md): ``<run dir>/tokens.yaml`` (0600) lets in
``local-admin`` (every role) and one ``service:<name>`` principal per service that calls another (matching calls
detection and embedding, capture's kiosk sessions call the gallery), plus the principals of a tokens file the caller
configured (``SIGHTLINE_AUTH_TOKENS_FILE``).
``local-admin``'s token is written to ``<run dir>/client-token`` (0600) for the CLI, and this process's own channels
to the stack's addresses use it too, so the demo, the CLI and tests work without handling tokens.

The gallery may be split into shards (``shards``, default ``SIGHTLINE_MATCHING_SHARDS``, else 1): matching then runs
as one process per shard, ``matching-0`` .. ``matching-<N-1>``, each on its own ports (``default`` ports: shard ``i``
listens on the matching ports plus ``100 * i``) and told its shard and every shard's address; all share the one
gallery database. With one shard the process is ``matching``, as without shards.

Capture's source policy (capture/source_policy.py) refuses every file and URL unless configured: the local stack lets
it read image and video files under the folders its caller names (by default the user's home, the temporary folder
and the folder the stack starts from) and the sample photos, and pull streams from loopback and private networks.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self

from sightline.common import auth
from sightline.common.audit_keys import LOCAL_KEYS_FILE, ensure_keys_file
from sightline.common.ports import GRPC_PORTS, LOCAL_BROKER_PORT, METRICS_PORTS, SERVICES
from sightline.tooling.broker import BrokerError, LocalBroker, free_port, port_open
from sightline.tooling.processes import (
    crash_report,
    exit_with_parent,
    kill_group,
    pid_alive,
    process_start_ticks,
    signal_if_alive,
    tail,
    wait_gone,
)

log = logging.getLogger(__name__)

PortMode = Literal["default", "auto"]

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
KEY_FILE = "template.key"
GALLERY_DB = "gallery.db"
DECISION_DB = "decision.db"  # alerts and reviews
CAPTURE_DB = "capture-sessions.db"  # the kiosk's gate sessions
AUDIT_DB = "audit.db"  # the audit trail, one chain every service appends to
TOKENS_FILE = "tokens.yaml"
CLIENT_TOKEN_FILE = "client-token"
ADMIN_PRINCIPAL = "local-admin"
STATE_VERSION = 1
SERVICE_STOP_TIMEOUT = 15.0  # services stop within ~10 s on SIGTERM; past this they are killed
BROKER_STOP_TIMEOUT = 5.0
# Where the local capture may pull streams from: loopback and the private ranges of a user's own cameras; never
# link-local (169.254.0.0/16 holds cloud metadata services) or the internet.
LOCAL_CAPTURE_NETWORKS = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]

# Internal: the package whose sub-modules are the services. Only the engine's own tests of process handling
# replace it (with stand-in services); the product always runs the real sightline.<service> modules.
_MODULE_PREFIX = "sightline"


class StackError(RuntimeError):
    """The local stack could not be started, or a stack is already running; the message says what to do."""


def in_use_message(port: int) -> str:
    return f"port {port} is in use — is a stack already running? try `sightline status` or `sightline down`"


# --- ports -------------------------------------------------------------------------------------------------------


SHARD_PORT_STEP = 100  # default ports of matching shard i: the matching ports plus i * this


def process_names(services: Sequence[str], shards: int) -> tuple[str, ...]:
    """The processes of a stack in pipeline order: each service, and matching as matching-0 .. matching-<N-1> when
    the gallery has several shards."""
    names: list[str] = []
    for service in services:
        if service == "matching" and shards > 1:
            names.extend(f"matching-{shard}" for shard in range(shards))
        else:
            names.append(service)
    return tuple(names)


def service_of(process: str) -> str:
    """The service a process runs: ``matching-1`` runs matching."""
    return process.rsplit("-", 1)[0] if process.startswith("matching-") else process


def shard_of_process(process: str) -> int:
    """The shard a matching process holds (0 for an unsharded one)."""
    return int(process.rsplit("-", 1)[1]) if process.startswith("matching-") else 0


@dataclass(frozen=True)
class PortPlan:
    """The broker's port and each process's gRPC and metrics ports, by process name (``process_names``)."""

    broker: int
    grpc: dict[str, int]
    metrics: dict[str, int]

    @classmethod
    def make(cls, mode: PortMode, processes: Sequence[str] = SERVICES) -> PortPlan:
        if mode == "default":
            offsets = {name: SHARD_PORT_STEP * shard_of_process(name) for name in processes}
            grpc = {name: GRPC_PORTS[service_of(name)] + offsets[name] for name in processes}
            metrics = {name: METRICS_PORTS[service_of(name)] + offsets[name] for name in processes}
            return cls(LOCAL_BROKER_PORT, grpc, metrics)
        if mode == "auto":
            ports = _distinct_free_ports(1 + 2 * len(processes))
            grpc = dict(zip(processes, ports[1 : 1 + len(processes)], strict=True))
            metrics = dict(zip(processes, ports[1 + len(processes) :], strict=True))
            return cls(ports[0], grpc, metrics)
        raise ValueError(f"ports must be 'default' or 'auto', not {mode!r}")

    def needed(self, processes: tuple[str, ...]) -> list[int]:
        """The ports the given processes and the broker will listen on, broker first."""
        return [
            self.broker,
            *(self.grpc[p] for p in processes),
            *(self.metrics[p] for p in processes if self.metrics[p]),
        ]


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(HOST)
        if port not in ports:
            ports.append(port)
    return ports


def port_in_use(port: int, host: str = HOST) -> bool:
    """True if something listens on the port or holds it bound.

    gRPC binds with SO_REUSEPORT, so a second stack's servers would silently share a port with the first one
    instead of failing: this check, made before anything starts, is what stops two stacks from overlapping.
    """
    if port_open(host, port):
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT left by a stack just stopped
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def open_log(path: Path, fresh: bool = True) -> IO[bytes]:
    """A log file to write: ``fresh`` starts it anew, keeping the previous one as <name>.1 for a post-mortem;
    otherwise it is appended to."""
    if not fresh:
        return path.open("ab")
    if path.exists() and path.stat().st_size:
        os.replace(path, path.with_name(path.name + ".1"))
    return path.open("wb")


def check_ports_free(ports: list[int]) -> None:
    for port in ports:
        if port_in_use(port):
            raise StackError(in_use_message(port))


# --- the template key --------------------------------------------------------------------------------------------


def template_key(run_dir: Path) -> str:
    """The base64 key that encrypts the gallery's templates: made once per run dir (mode 0600), then reused.

    Reusing it is what keeps an existing gallery.db readable across restarts; it is never logged.
    """
    path = run_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "w") as file:
        file.write(base64.b64encode(secrets.token_bytes(32)).decode("ascii") + "\n")
    log.info("created a new gallery template key in %s", path)
    return _read_key(path)


def _read_key(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by others; restricting it to its owner", path)
        path.chmod(0o600)
    text = path.read_text().strip()
    try:
        valid = len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise StackError(
            f"{path} is not a base64-encoded 32-byte key: restore it from a backup, or delete it together with "
            f"{path.parent / GALLERY_DB} (the gallery cannot be read without its key)"
        )
    return text


# --- bearer tokens -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackTokens:
    """The tokens of one run of a stack: the CLI's (local-admin) and those of the services that call others."""

    admin: str
    services: dict[str, str]


def write_tokens(run_dir: Path, extra_principals: Sequence[auth.Principal] = ()) -> StackTokens:
    """Fresh tokens for a stack: the tokens file its services read and the CLI's token file, both 0600."""
    tokens = StackTokens(auth.new_token(), {name: auth.new_token() for name in auth.SERVICE_CALLER_ROLES})
    principals = [
        auth.Principal(ADMIN_PRINCIPAL, frozenset(auth.Role), auth.hash_token(tokens.admin)),
        *(
            auth.Principal(auth.service_principal(name), auth.SERVICE_CALLER_ROLES[name], auth.hash_token(token))
            for name, token in tokens.services.items()
        ),
        *extra_principals,
    ]
    auth.parse_principals(auth.dump_principals(principals), "the local stack's tokens")  # refuses clashes
    _write_private(run_dir / TOKENS_FILE, auth.dump_principals(principals))
    _write_private(run_dir / CLIENT_TOKEN_FILE, tokens.admin + "\n")
    return tokens


def client_token(run_dir: Path) -> str:
    """The CLI's token of the stack in a run dir ("" when there is none)."""
    try:
        return (Path(run_dir) / CLIENT_TOKEN_FILE).read_text().strip()
    except OSError:
        return ""


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, whole: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a file left over from a crash
    os.replace(tmp, path)


# --- the state file ----------------------------------------------------------------------------------------------


@dataclass
class ProcessRecord:
    """One process of a stack as written in stack.json."""

    pid: int
    start_ticks: int | None
    log: str
    port: int  # the broker's Kafka port, or a service's gRPC port
    metrics_port: int | None = None
    started_at: float | None = None  # epoch seconds
    restarts: int = 0  # times this process was started again, after a crash or on request
    last_exit_code: int | None = None  # how the process before this one ended (negative: killed by that signal)
    last_exit_at: float | None = None  # epoch seconds
    restart_at: float | None = None  # set while the process is down and due to be started again (epoch seconds)
    backoff_s: float | None = None  # the wait the supervisor chose before the last restart after a crash

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_ticks)


@dataclass
class StackState:
    """The content of ``<run dir>/stack.json``."""

    run_dir: str
    started_at: float
    detached: bool
    owner_pid: int | None  # the foreground `sightline up` (or test) process that will stop the stack
    owner_start_ticks: int | None
    phase: Literal["starting", "running"]
    broker: ProcessRecord
    services: dict[str, ProcessRecord] = field(default_factory=dict)
    version: int = STATE_VERSION
    supervised: bool = False  # the owner restarts crashed services and serves restart requests (supervisor.py)

    def processes(self) -> list[tuple[str, ProcessRecord]]:
        return [("broker", self.broker), *self.services.items()]

    def any_alive(self) -> bool:
        return any(record.alive() for _, record in self.processes())

    def owner_alive(self) -> bool:
        return self.owner_pid is not None and pid_alive(self.owner_pid, self.owner_start_ticks)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackState:
        data = dict(data)
        data["broker"] = ProcessRecord(**data["broker"])
        data["services"] = {name: ProcessRecord(**rec) for name, rec in data["services"].items()}
        return cls(**data)


def state_path(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_FILE


def load_state(run_dir: Path) -> StackState | None:
    """The recorded stack of a run dir, or None if there is none (or the file is unreadable)."""
    path = state_path(run_dir)
    try:
        return StackState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("ignoring the unreadable stack state file %s: %s", path, exc)
        return None


def _write_state(run_dir: Path, state: StackState) -> None:
    # Written whole and renamed, so a concurrent `sightline status` never reads half a file.
    path = state_path(run_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


def _remove_state(run_dir: Path) -> None:
    state_path(run_dir).unlink(missing_ok=True)


def refuse_if_running(run_dir: Path) -> None:
    state = load_state(run_dir)
    if state is None:
        return
    if state.any_alive() or state.owner_alive():
        port = state.services[next(iter(state.services))].port if state.services else state.broker.port
        raise StackError(f"{in_use_message(port)} (a stack recorded in {state_path(run_dir)} is still running)")
    log.info("removing the state file of a stack that no longer runs in %s", run_dir)
    _remove_state(run_dir)


# --- status ------------------------------------------------------------------------------------------------------


@dataclass
class ServiceStatus:
    pid: int
    alive: bool
    # SERVING, NOT_SERVING, UNREACHABLE...; BACKOFF when the process is gone and the supervisor will start it again,
    # STOPPED when it is gone for good
    health: str
    grpc_port: int
    metrics_port: int | None
    address: str
    log: str
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_at: float | None = None
    restart_in_s: float | None = None  # with BACKOFF: seconds until the supervisor starts it again


@dataclass
class BrokerStatus:
    pid: int
    alive: bool
    reachable: bool
    port: int
    bootstrap_servers: str
    log: str


@dataclass
class SupervisorStatus:
    """The process that owns the stack and restarts its crashed services."""

    pid: int
    alive: bool


@dataclass
class StackStatus:
    run_dir: str
    started_at: float
    detached: bool
    phase: str
    broker: BrokerStatus
    services: dict[str, ServiceStatus]
    supervisor: SupervisorStatus | None = None  # None: nothing restarts a crashed service

    @property
    def healthy(self) -> bool:
        return self.broker.reachable and all(s.health == "SERVING" for s in self.services.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "healthy": self.healthy}


def status(run_dir: Path, health_timeout: float = 1.0) -> StackStatus | None:
    """Each recorded process of the stack in a run dir: alive or not, and each service's gRPC health."""
    state = load_state(run_dir)
    if state is None:
        return None
    supervised = state.supervised and state.owner_alive()
    services = {name: _service_status(rec, supervised, health_timeout) for name, rec in state.services.items()}
    broker_alive = state.broker.alive()
    broker = BrokerStatus(
        state.broker.pid,
        broker_alive,
        broker_alive and port_open(HOST, state.broker.port),
        state.broker.port,
        f"{HOST}:{state.broker.port}",
        state.broker.log,
    )
    supervisor = None
    if state.supervised and state.owner_pid is not None:
        supervisor = SupervisorStatus(state.owner_pid, state.owner_alive())
    return StackStatus(state.run_dir, state.started_at, state.detached, state.phase, broker, services, supervisor)


def _service_status(rec: ProcessRecord, supervised: bool, health_timeout: float) -> ServiceStatus:
    from sightline.common.rpc import check_health  # grpc is heavy; only status needs it here

    alive = rec.alive()
    address = f"{HOST}:{rec.port}"
    restart_in = max(0.0, rec.restart_at - time.time()) if rec.restart_at is not None and supervised else None
    if alive:
        health = check_health(address, timeout=health_timeout)
    else:
        health = "BACKOFF" if restart_in is not None else "STOPPED"
    return ServiceStatus(
        rec.pid,
        alive,
        health,
        rec.port,
        rec.metrics_port,
        address,
        rec.log,
        rec.restarts,
        rec.last_exit_code,
        rec.last_exit_at,
        None if restart_in is None else round(restart_in, 1),
    )


# --- stopping a stack this process did not start -------------------------------------------------------------------


def stop_detached(run_dir: Path, timeout: float = SERVICE_STOP_TIMEOUT) -> bool:
    """Stop the stack recorded in a run dir; False if none was running. Works for detached and foreground stacks."""
    state = load_state(run_dir)
    if state is None:
        return False
    if not state.any_alive() and not state.owner_alive():
        _remove_state(run_dir)
        return False
    # A foreground stack's owner, or a detached one's supervisor, stops it in order; else its records are stopped.
    if (not state.detached or state.supervised) and state.owner_alive() and _stop_via_owner(state, timeout):
        _remove_state(run_dir)
        return True
    _stop_records(state, timeout)
    _remove_state(run_dir)
    return True


def _stop_via_owner(state: StackState, timeout: float) -> bool:
    """Ask the owner (the foreground or background `sightline up`) to stop its stack, so it shuts down in order and
    exits cleanly."""
    assert state.owner_pid is not None
    log.info("asking the stack's owner process (pid %d) to stop it", state.owner_pid)
    signal_if_alive(state.owner_pid, state.owner_start_ticks, signal.SIGTERM)
    owner = [(state.owner_pid, state.owner_start_ticks)]
    return wait_gone(owner, timeout + BROKER_STOP_TIMEOUT + 5) and not state.any_alive()


def _stop_records(state: StackState, timeout: float) -> None:
    services = list(reversed(state.services.items()))
    for name, rec in services:
        log.info("stopping %s (pid %d)", name, rec.pid)
        signal_if_alive(rec.pid, rec.start_ticks, signal.SIGTERM)
    if not wait_gone([(r.pid, r.start_ticks) for _, r in services], timeout):
        for name, rec in services:
            if rec.alive():
                log.warning("%s (pid %d) did not stop in time; killing it", name, rec.pid)
                kill_group(rec.pid, rec.start_ticks)
        wait_gone([(r.pid, r.start_ticks) for _, r in services], 5)
    broker = state.broker
    signal_if_alive(
        broker.pid, broker.start_ticks, signal.SIGINT
    )  # Tansu waits 5 s on SIGTERM while clients are connected
    if not wait_gone([(broker.pid, broker.start_ticks)], BROKER_STOP_TIMEOUT):
        kill_group(broker.pid, broker.start_ticks)
        wait_gone([(broker.pid, broker.start_ticks)], 5)


# --- what the local capture may read ------------------------------------------------------------------------------


def local_capture_roots() -> list[Path]:
    """Where a user's own frames are on a laptop: home, the temporary folder, the folder the stack starts from.

    The stack serves its user only (loopback, tokens in 0600 files), and capture still reads only image and video
    files there, never /proc, devices or files of other kinds (capture/source_policy.py).
    """
    roots = [Path.home(), Path(tempfile.gettempdir()), Path.cwd()]
    return [root for root in roots if root != Path(root.anchor)]  # never the whole file system


def local_capture_policy(roots: Sequence[Path] | None = None) -> dict[str, str]:
    """The capture source policy of the local stack, as environment variables: the given folders (or the user's
    own) and the sample photos; streams over RTSP(S) from loopback and private networks only. Not HTTP(S): a web
    server on a private network is not a camera, and one could serve FFmpeg anything (docs/security.md)."""
    from sightline.common.paths import samples_dir

    folders = [*(local_capture_roots() if roots is None else roots), samples_dir()]
    return {
        "SIGHTLINE_CAPTURE_ALLOWED_ROOTS": json.dumps(list(dict.fromkeys(str(Path(f).resolve()) for f in folders))),
        "SIGHTLINE_CAPTURE_ALLOWED_SCHEMES": json.dumps(["rtsp", "rtsps"]),
        "SIGHTLINE_CAPTURE_ALLOWED_HOSTS": json.dumps(LOCAL_CAPTURE_NETWORKS),
    }


# --- the stack -----------------------------------------------------------------------------------------------------

SHARDS_ENV = "SIGHTLINE_MATCHING_SHARDS"
MAX_SHARDS = 64  # MatchingSettings.shards


def _shard_count(shards: int | None, env: dict[str, str]) -> int:
    """The stack's shard count: the argument, else SIGHTLINE_MATCHING_SHARDS (``env`` first), else 1."""
    if shards is None:
        text = (env.get(SHARDS_ENV) or os.environ.get(SHARDS_ENV) or "1").strip()
        try:
            shards = int(text)
        except ValueError:
            raise StackError(
                f"{SHARDS_ENV} must be a whole number of shards, 1 to {MAX_SHARDS}; got {text!r}"
            ) from None
    if not 1 <= shards <= MAX_SHARDS:
        raise StackError(f"the gallery takes 1 to {MAX_SHARDS} shards, not {shards}")
    return shards


class LocalStack:
    """The broker and the services as child processes.

    Use ``start()`` and ``stop()``, or ``with LocalStack(...) as stack: stack.start(); ...``, which stops the
    stack when the block ends.

    ``ports="default"`` uses the documented ports (ports.py) and fails clearly if one is taken; ``"auto"`` picks
    free ports, so tests and a second stack can run beside a developer's stack. ``env`` adds variables to (or
    overrides) the caller's environment for every process.

    ``capture_roots`` are the folders capture may read files from (with the sample photos); None: the user's own
    folders (``local_capture_roots``). Capture's source policy is set only where neither the caller's environment
    nor ``env`` sets it (``SIGHTLINE_CAPTURE_ALLOWED_*``).

    ``shards``: how many shards the gallery is split into (1 to 64); None: ``SIGHTLINE_MATCHING_SHARDS`` from ``env``
    or the environment, else 1. ``addresses`` and ``metrics_ports`` name services (matching: shard 0's process,
    which serves the whole gallery API); ``processes``, ``process_addresses`` and ``pids`` name processes.
    """

    def __init__(
        self,
        run_dir: Path,
        ports: PortMode = "default",
        policy_file: Path | None = None,
        services: tuple[str, ...] = SERVICES,
        env: dict[str, str] | None = None,
        *,
        capture_roots: Sequence[Path] | None = None,
        shards: int | None = None,
        module_prefix: str | None = None,  # internal: see _MODULE_PREFIX
    ) -> None:
        unknown = [s for s in services if s not in SERVICES]
        if unknown or not services:
            raise ValueError(f"unknown services {unknown}; choose from {', '.join(SERVICES)}")
        self._preexec: Callable[[], None] | None = None
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.log_dir = self.run_dir / "logs"
        self.services = tuple(s for s in SERVICES if s in services)  # always in pipeline order
        self.policy_file = Path(policy_file).expanduser().resolve() if policy_file else None
        self._extra_env = dict(env or {})
        self.shards = _shard_count(shards, self._extra_env)
        self.processes = process_names(self.services, self.shards)
        self.ports = PortPlan.make(ports, self.processes)
        self._capture_roots = capture_roots
        self._module_prefix = module_prefix or _MODULE_PREFIX
        self._broker: LocalBroker | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._state: StackState | None = None
        self._tokens: StackTokens | None = None
        # Held while a process is spawned, replaced or stopped and while the state is written: a supervisor's thread
        # and the caller's may both do so.
        self._lock = threading.RLock()
        self._stopping = False
        self._before_stop: list[Callable[[], None]] = []

    # Addresses --------------------------------------------------------------------------------------------------

    @property
    def addresses(self) -> dict[str, str]:
        """Each service's gRPC address; matching's is its first shard's (every shard serves the gallery API)."""
        return {s: f"{HOST}:{self.ports.grpc[self._first_process(s)]}" for s in self.services}

    @property
    def metrics_ports(self) -> dict[str, int]:
        return {s: self.ports.metrics[self._first_process(s)] for s in self.services}

    @property
    def process_addresses(self) -> dict[str, str]:
        """Each process's gRPC address: the services', every matching shard's included."""
        return {p: f"{HOST}:{self.ports.grpc[p]}" for p in self.processes}

    @property
    def shard_addresses(self) -> list[str]:
        """The matching shards' addresses in shard order (SIGHTLINE_MATCHING_SHARD_ADDRESSES); [] without shards."""
        return [address for p, address in self.process_addresses.items() if p.startswith("matching-")]

    def _first_process(self, service: str) -> str:
        return next(p for p in self.processes if service_of(p) == service)

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.ports.broker}"

    def log_path(self, name: str) -> Path:
        """The log file of a service or of the broker ("broker")."""
        return self.log_dir / f"{name}.log"

    @property
    def pids(self) -> dict[str, int]:
        pids = {name: proc.pid for name, proc in self._procs.items()}
        if self._broker and self._broker.process:
            pids = {"broker": self._broker.process.pid, **pids}
        return pids

    # Lifecycle --------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0, detach: bool = False) -> None:
        """Start the broker, create the topics, start all services and wait until each is SERVING.

        With ``detach`` the stack is recorded as running in the background: it keeps running when this process
        exits, and ``stop_detached`` (``sightline down``) stops it. Raises StackError, after stopping whatever
        had started, if a port is taken, a stack already runs from this run dir, or a process fails.
        """
        if self._state is not None:
            raise StackError("this stack is already started")
        self._broker, self._procs = None, {}  # a stack may be started again after stop()
        deadline = time.monotonic() + timeout
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # holds the gallery and its key
        self.log_dir.mkdir(exist_ok=True)
        refuse_if_running(self.run_dir)
        if self.policy_file and not self.policy_file.is_file():
            raise StackError(f"policy file {self.policy_file} not found")
        check_ports_free(self.ports.needed(self.processes))
        key = template_key(self.run_dir) if "matching" in self.services else ""
        # Made before any service starts, so none of them logs the creation in plain text before its JSON logs, and a
        # stack whose audit log is a configured PostgreSQL database still has a keyring.
        ensure_keys_file(self.run_dir / LOCAL_KEYS_FILE, f"sqlite:///{self.run_dir / AUDIT_DB}")
        self._tokens = write_tokens(self.run_dir, self._configured_principals())
        auth.remember_stack_token(self.process_addresses.values(), self._tokens.admin)
        try:
            # A foreground stack dies with its owner (test, demo, `sightline up`); a detached one outlives it.
            self._preexec = None if detach else exit_with_parent
            self._start_broker(detach)
            self._ensure_topics()
            for name in self.processes:
                self._spawn(name, key)
            self._save_state("starting")
            self._wait_healthy(deadline)
            self._save_state("running")
        except BaseException:  # also Ctrl-C while starting: never leave half a stack behind
            self.stop()
            raise
        log.info("local stack is up in %s: pids %s", self.run_dir, self.pids)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Start one process again (stopping it first if it runs), as Kubernetes restarts a crashed pod, and wait
        until it is SERVING. ``name`` is a process (``matching-1``) or a service: a sharded matching restarts every
        shard, one after the other."""
        for process in self.processes_of(name):
            self.replace(process)
            self._wait_healthy(time.monotonic() + timeout, [process])

    def stop_broker(self) -> None:
        """Stop the broker alone, as an outage would: the services keep running, and must ride it out."""
        if self._broker is None:
            raise StackError("the stack is not started")
        self._broker.stop()

    def start_broker_again(self, timeout: float = 30.0) -> None:
        """Start the broker again after ``stop_broker``, on the same port, and create the topics. The embedded broker
        keeps its records in memory only: this one starts empty, without records, topics or consumer offsets."""
        if self._state is None:
            raise StackError("the stack is not started")
        with self._open_log("broker", fresh=False) as log_file:
            self._broker = LocalBroker(self.ports.broker, log=log_file)
            try:
                self._broker.start(timeout=timeout, detach=True, preexec_fn=self._preexec)
            except BrokerError as exc:
                raise StackError(f"{exc}; see {self.log_path('broker')}") from exc
        assert self._broker.process is not None
        pid = self._broker.process.pid
        with self._lock:
            self._state.broker = ProcessRecord(
                pid, process_start_ticks(pid), str(self.log_path("broker")), self.ports.broker
            )
            _write_state(self.run_dir, self._state)
        self._ensure_topics()

    def processes_of(self, name: str) -> list[str]:
        """The processes a name stands for: itself (``matching-1``), or every process of a service, in order."""
        names = [name] if name in self.processes else [p for p in self.processes if service_of(p) == name]
        if not names:
            raise ValueError(f"no process {name!r} in this stack; it runs {', '.join(self.processes)}")
        return names

    # Supervision (supervisor.py) ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Started and not being stopped: a supervisor may restart processes."""
        return self._state is not None and not self._stopping

    def mark_supervised(self) -> None:
        """Record that this process supervises the stack: it owns it (``sightline down`` asks it to stop the stack,
        also a detached one) and ``sightline restart`` may ask it to restart a process."""
        with self._lock:
            if self._state is None:
                raise StackError("the stack is not started")
            self._state.supervised = True
            self._state.owner_pid = os.getpid()
            self._state.owner_start_ticks = process_start_ticks(os.getpid())
            _write_state(self.run_dir, self._state)

    def before_stop(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` first when the stack is stopped (a supervisor halts there, before anything is stopped)."""
        self._before_stop.append(hook)

    def record(self, name: str) -> ProcessRecord:
        """The state file's record of a service process."""
        with self._lock:
            if self._state is None or name not in self._state.services:
                raise KeyError(name)
            return self._state.services[name]

    def note_exit(
        self, name: str, returncode: int, restart_at: float | None = None, backoff_s: float | None = None
    ) -> None:
        """Record how a service process ended and, when it will be started again, when (epoch seconds)."""
        with self._lock:
            if self._state is None or name not in self._state.services:
                return
            record = self._state.services[name]
            record.last_exit_code, record.last_exit_at = returncode, time.time()
            record.restart_at = restart_at
            if backoff_s is not None:
                record.backoff_s = backoff_s
            _write_state(self.run_dir, self._state)

    def respawn(self, name: str) -> bool:
        """Start a service process that has exited again, without waiting for it to be healthy; False when the
        stack is stopping (or the process still runs)."""
        with self._lock:
            proc = self._procs.get(name)
            if not self.running or (proc is not None and proc.poll() is None):
                return False
            self._spawn(name, self._key_for(name))
            self._save_state("running")
            return True

    def replace(self, name: str) -> bool:
        """Stop a service process if it runs (SIGTERM, killed after SERVICE_STOP_TIMEOUT) and start it again, without
        waiting for it to be healthy; False when the stack is stopping."""
        with self._lock:
            if not self.running:
                return False
            proc = self._procs.get(name)
            if proc is not None:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=SERVICE_STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        kill_group(proc.pid, None)
                        proc.wait()
                self.note_exit(name, proc.returncode)
            self._spawn(name, self._key_for(name))
            self._save_state("running")
            return True

    def _key_for(self, process: str) -> str:
        return template_key(self.run_dir) if service_of(process) == "matching" else ""

    def stop(self, timeout: float = SERVICE_STOP_TIMEOUT) -> None:
        """Stop the services (SIGTERM, newest stage first), kill those still running after ``timeout``, then the
        broker. Safe to call more than once."""
        self._stopping = True  # from now on nothing is restarted
        try:
            for hook in self._before_stop:
                hook()
            with self._lock:
                self._stop_all(timeout)
        finally:
            self._before_stop = []
            self._stopping = False  # a stack may be started again after stop()

    def _stop_all(self, timeout: float) -> None:
        running = [(n, p) for n, p in reversed(self._procs.items()) if p.poll() is None]
        for name, proc in running:
            log.info("stopping %s (pid %d)", name, proc.pid)
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop in time; killing it", name, proc.pid)
                kill_group(proc.pid, None)
                proc.wait()
        if self._broker is not None:
            self._broker.stop()
        if self._tokens is not None:
            auth.forget_stack_token(self.process_addresses.values())
            (self.run_dir / CLIENT_TOKEN_FILE).unlink(missing_ok=True)
            self._tokens = None
        if self._state is not None:
            _remove_state(self.run_dir)  # only our own: a refused start never wrote one
            self._state = None

    def poll_crashed(self) -> list[tuple[str, int]]:
        """The processes (services, and "broker") that have exited, with their return codes."""
        with self._lock:
            crashed = [(name, rc) for name, proc in self._procs.items() if (rc := proc.poll()) is not None]
        if self._broker and self._broker.process and (rc := self._broker.process.poll()) is not None:
            crashed.insert(0, ("broker", rc))
        return crashed

    def crash_report(self, name: str) -> str:
        proc = self._broker.process if name == "broker" and self._broker else self._procs.get(name)
        return crash_report(name, proc.poll() if proc else None, self.log_path(name))

    def status(self, health_timeout: float = 1.0) -> StackStatus | None:
        return status(self.run_dir, health_timeout)

    def __enter__(self) -> Self:
        # Entering does not start: callers choose start()'s timeout and mode inside the block, and leaving the
        # block stops whatever was started, however far start() got.
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # Steps of start() ---------------------------------------------------------------------------------------------

    def _start_broker(self, detach: bool) -> None:
        with self._open_log("broker") as log_file:
            self._broker = LocalBroker(self.ports.broker, log=log_file)
            try:
                # Every process gets its own session, so a Ctrl-C in the terminal reaches only `sightline up`,
                # which then stops the services before the broker they need to shut down cleanly.
                self._broker.start(detach=True, preexec_fn=self._preexec)
            except BrokerError as exc:
                raise StackError(f"{exc}; see {self.log_path('broker')}") from exc
        log.info("broker is up on %s", self.bootstrap_servers)
        self._state = self._new_state(detach)
        _write_state(self.run_dir, self._state)  # from now on `sightline down` can clean up after a crash

    def _ensure_topics(self) -> None:
        from sightline.common.bus import ensure_topics  # kafka-python is heavy: imported only when starting
        from sightline.common.config import KafkaSettings

        try:
            states = ensure_topics(KafkaSettings(**self._kafka_settings()))
        except Exception as exc:  # kafka-python raises many types; the user needs the broker's log either way
            raise StackError(
                f"could not create the topics on {self.bootstrap_servers}: {exc!r}; see {self.log_path('broker')}"
            ) from exc
        log.info("topics ready: %s", states)

    def _kafka_settings(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": "PLAINTEXT",  # the local broker; a user's SASL/TLS settings are for their cluster
            "session_timeout_ms": 2000,  # Tansu holds group joins for session_timeout / 2
            "heartbeat_interval_ms": 500,
            "fetch_max_wait_ms": 25,  # Tansu holds each fetch for the whole wait (see docs/broker.md)
        }

    def _spawn(self, name: str, key: str) -> None:
        previous = self._state.services.get(name) if self._state is not None else None
        with self._open_log(name, fresh=previous is None) as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"{self._module_prefix}.{service_of(name)}"],
                env=self._service_env(name, key),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        self._procs[name] = proc
        assert self._state is not None
        record = ProcessRecord(
            proc.pid,
            process_start_ticks(proc.pid),
            str(self.log_path(name)),
            self.ports.grpc[name],
            self.ports.metrics[name],
            started_at=time.time(),
        )
        if previous is not None:  # started again: the count and how the one before ended carry over
            record.restarts = previous.restarts + 1
            record.last_exit_code, record.last_exit_at = previous.last_exit_code, previous.last_exit_at
            record.backoff_s = previous.backoff_s
        self._state.services[name] = record
        log.info("started %s (pid %d) on %s", name, proc.pid, self.process_addresses[name])

    def _service_env(self, process: str, key: str) -> dict[str, str]:
        name = service_of(process)
        prefix = f"SIGHTLINE_{name.upper()}_"
        env = {**os.environ, **self._extra_env, "PYTHONUNBUFFERED": "1"}
        env.update({f"SIGHTLINE_KAFKA_{k.upper()}": str(v) for k, v in self._kafka_settings().items()})
        env.update(
            {
                f"{prefix}GRPC_HOST": HOST,
                f"{prefix}GRPC_PORT": str(self.ports.grpc[process]),
                f"{prefix}METRICS_PORT": str(self.ports.metrics[process]),
                f"{prefix}LOG_JSON": "true",
            }
        )
        assert self._tokens is not None
        env["SIGHTLINE_AUTH_TOKENS_FILE"] = str(self.run_dir / TOKENS_FILE)
        if name in self._tokens.services:
            env["SIGHTLINE_AUTH_TOKEN"] = self._tokens.services[name]
        if name == "matching":
            # A database or key the user configured wins: "SQLite by default, PostgreSQL when configured".
            env.setdefault("SIGHTLINE_MATCHING_DATABASE_URL", f"sqlite:///{self.run_dir / GALLERY_DB}")
            env.setdefault("SIGHTLINE_MATCHING_TEMPLATE_KEY", key)
            env["SIGHTLINE_MATCHING_DETECTION_ADDR"] = f"{HOST}:{self.ports.grpc['detection']}"
            env["SIGHTLINE_MATCHING_EMBEDDING_ADDR"] = f"{HOST}:{self.ports.grpc['embedding']}"
            if self.shards > 1:  # one shard of the gallery; the others are the sibling processes
                env["SIGHTLINE_MATCHING_SHARDS"] = str(self.shards)
                env["SIGHTLINE_MATCHING_SHARD"] = str(shard_of_process(process))
                env["SIGHTLINE_MATCHING_SHARD_ADDRESSES"] = json.dumps(self.shard_addresses)
        # One chain for the stack: matching's and decision's records, and every service's refused calls.
        env.setdefault("SIGHTLINE_AUDIT_DATABASE_URL", f"sqlite:///{self.run_dir / AUDIT_DB}")
        if "SIGHTLINE_AUDIT_KEYS" not in env:
            env.setdefault("SIGHTLINE_AUDIT_KEYS_FILE", str(self.run_dir / LOCAL_KEYS_FILE))
        if name == "capture":
            env.setdefault("SIGHTLINE_CAPTURE_MATCHING_ADDR", self.addresses["matching"])  # kiosk sessions
            env.setdefault("SIGHTLINE_CAPTURE_DATABASE_URL", f"sqlite:///{self.run_dir / CAPTURE_DB}")
            for variable, value in local_capture_policy(self._capture_roots).items():
                env.setdefault(variable, value)
        if name == "decision":
            env.setdefault("SIGHTLINE_DECISION_DATABASE_URL", f"sqlite:///{self.run_dir / DECISION_DB}")
        if name == "decision" and self.policy_file:
            env["SIGHTLINE_DECISION_POLICY_FILE"] = str(self.policy_file)
        return env

    def _wait_healthy(self, deadline: float, processes: Sequence[str] | None = None) -> None:
        from sightline.common.rpc import check_health

        addresses = self.process_addresses
        pending = list(self.processes if processes is None else processes)
        while pending:
            self._raise_if_exited()
            pending = [name for name in pending if check_health(addresses[name], timeout=1.0) != "SERVING"]
            if pending and time.monotonic() > deadline:
                raise StackError(self._not_healthy_message(pending))
            if pending:
                time.sleep(0.25)

    def _raise_if_exited(self) -> None:
        for name, _ in self.poll_crashed():
            raise StackError(f"{self.crash_report(name)}\nthe stack did not start")

    def _not_healthy_message(self, pending: list[str]) -> str:
        parts = [f"not SERVING in time: {', '.join(pending)}"]
        for name in pending:
            parts.append(f"{name} ({self.process_addresses[name]}), last log lines:")
            parts.extend(f"  {line}" for line in tail(self.log_path(name), 5))
        parts.append(f"logs: {self.log_dir}")
        return "\n".join(parts)

    # Helpers ------------------------------------------------------------------------------------------------------

    def _configured_principals(self) -> list[auth.Principal]:
        """The principals of the tokens file the caller configured for the services, if any (added to the stack's)."""
        configured = self._extra_env.get("SIGHTLINE_AUTH_TOKENS_FILE") or os.environ.get("SIGHTLINE_AUTH_TOKENS_FILE")
        if not configured:
            return []
        try:
            return auth.load_principals(Path(configured))
        except auth.TokensFileError as error:
            raise StackError(str(error)) from None

    def _open_log(self, name: str, fresh: bool = True) -> IO[bytes]:
        """The process's log: a fresh one for each run of the stack, appended to when the process is restarted within
        a run, so the lines before a crash stay just above the restart's."""
        return open_log(self.log_path(name), fresh=fresh)

    def _new_state(self, detach: bool) -> StackState:
        assert self._broker is not None and self._broker.process is not None
        pid = self._broker.process.pid
        broker = ProcessRecord(pid, process_start_ticks(pid), str(self.log_path("broker")), self.ports.broker)
        owner = None if detach else os.getpid()
        owner_ticks = process_start_ticks(owner) if owner else None
        return StackState(str(self.run_dir), time.time(), detach, owner, owner_ticks, "starting", broker)

    def _save_state(self, phase: Literal["starting", "running"]) -> None:
        with self._lock:
            assert self._state is not None
            self._state.phase = phase
            _write_state(self.run_dir, self._state)
