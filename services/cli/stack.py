"""``sightline up``, ``status``, ``restart`` and ``down``: run the whole pipeline on this machine.

``up`` starts the embedded broker and the five services as separate processes (see sightline.tooling.localstack) and
supervises them: a crashed service is restarted with a growing backoff (sightline.tooling.supervisor). In the
foreground Ctrl-C stops everything; with ``--detach`` the same supervision runs in a background ``sightline up``
(its output in ``<run dir>/logs/supervisor.log``), which ``status``, ``restart`` and ``down`` find through the run
dir's state file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sightline.common.paths import run_dir

if TYPE_CHECKING:
    from sightline.tooling.localstack import LocalStack, StackState, StackStatus
    from sightline.tooling.supervisor import RestartSettings

POLL_SECONDS = 0.5
SUPERVISOR_LOG = "supervisor.log"  # the background `sightline up` of a detached stack writes here


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up",
        help="start the broker and all services on this machine",
        description="Start the embedded Kafka broker and the five services, each its own process, and wait until "
        "all are healthy. Logs go to <run dir>/logs/. In the foreground, Ctrl-C stops everything.",
    )
    _run_dir_option(up)
    up.add_argument("--detach", "-d", action="store_true", help="return once healthy, leave the stack running")
    up.add_argument("--policy", type=Path, metavar="FILE", help="decision policy file for the decision service")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all services (default 120)")
    up.add_argument(
        "--exit-on-crash", action="store_true", help="stop everything and exit 1 if a service dies (no restarts)"
    )
    up.add_argument(
        "--ports",
        choices=("default", "auto"),
        default="default",
        help="default: the documented ports; auto: free ports (to run beside another stack)",
    )
    # Internal: the background `sightline up` that `--detach` starts to own and supervise the stack.
    up.add_argument("--supervise-detached", action="store_true", help=argparse.SUPPRESS)
    up.set_defaults(func=cmd_up)

    status = subparsers.add_parser(
        "status", help="show the local stack's processes and health (exit 0 only if all are SERVING)"
    )
    _run_dir_option(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)

    restart = subparsers.add_parser(
        "restart",
        help="restart one service (or matching shard) of the running local stack",
        description="Stop one process of the running local stack (detached or foreground) and start it again, "
        "then wait until it is SERVING. A service name restarts each of its processes in turn (every matching "
        "shard); a process name (matching-1) only that one.",
    )
    restart.add_argument("name", help="capture, detection, embedding, matching, decision, or a shard (matching-1)")
    _run_dir_option(restart)
    restart.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each process (default 120)")
    restart.set_defaults(func=cmd_restart)

    down = subparsers.add_parser("down", help="stop the local stack (detached or foreground)")
    _run_dir_option(down)
    down.add_argument("--timeout", type=float, default=15.0, help="seconds each service gets before it is killed")
    down.set_defaults(func=cmd_down)


def _run_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help=f"state, logs and gallery of the local stack (default {run_dir()})",
    )


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else run_dir()


# --- up ------------------------------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from sightline.tooling.localstack import LocalStack, StackError
    from sightline.tooling.supervisor import RestartSettings

    try:
        restarts = RestartSettings()
    except ValidationError as exc:
        print(f"sightline up: {exc}", file=sys.stderr)
        return 2
    if args.detach:
        return _up_in_background(args)
    stack = LocalStack(_run_dir(args), ports=args.ports, policy_file=args.policy)
    _interrupt_on(signal.SIGTERM, signal.SIGHUP)  # stop cleanly when asked to by a signal, not only by Ctrl-C
    print(f"starting the broker and {len(stack.services)} services (logs in {stack.log_dir}) ...", flush=True)
    try:
        # The background `sightline up` of --detach starts a detached stack: its services outlive it if it dies.
        stack.start(timeout=args.timeout, detach=args.supervise_detached)
    except StackError as exc:
        print(f"sightline up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted while starting; everything that had started is stopped", file=sys.stderr)
        return 130
    try:  # from here on a Ctrl-C, wherever it lands, stops the stack: it must never leave processes behind
        _print_ready(stack.run_dir)
        if not args.supervise_detached:
            print("press Ctrl-C to stop", flush=True)
        return _supervise(stack, restarts, args.exit_on_crash)
    except KeyboardInterrupt:
        _stop(stack)
        return 0


def _up_in_background(args: argparse.Namespace) -> int:
    """``up --detach``: start a background ``sightline up`` that owns and supervises the stack, and return once it
    reports every service SERVING (or print why it failed)."""
    from sightline.tooling.localstack import StackError, load_state, open_log, refuse_if_running

    directory = _run_dir(args).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # holds the gallery and its key
    (directory / "logs").mkdir(exist_ok=True)
    try:
        refuse_if_running(directory)  # before anything, so a running stack's supervisor log is left alone
    except StackError as exc:
        print(f"sightline up: {exc}", file=sys.stderr)
        return 1
    command = [sys.executable, "-m", "sightline.cli.main", "up", "--supervise-detached", "--run-dir", str(directory)]
    command += ["--ports", args.ports, "--timeout", str(args.timeout)]
    if args.policy:
        command += ["--policy", str(Path(args.policy).expanduser().resolve())]
    log_path = directory / "logs" / SUPERVISOR_LOG
    print(f"starting the broker and the services in the background (logs in {log_path.parent}) ...", flush=True)
    with open_log(log_path) as log_file:
        owner = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + args.timeout + 30
    try:
        while (state := load_state(directory)) is None or not _ready(state, owner.pid):
            if owner.poll() is not None or time.monotonic() > deadline:
                return _background_failed(owner, log_path)
            time.sleep(0.2)
    except KeyboardInterrupt:
        owner.terminate()  # it stops whatever it had started
        owner.wait()
        print("interrupted while starting; everything that had started is stopped", file=sys.stderr)
        return 130
    _print_ready(directory)
    print(
        f"running in the background, supervised by pid {owner.pid} (crashed services are restarted): "
        "`sightline status` to check it, `sightline down` to stop it"
    )
    return 0


def _ready(state: StackState, owner_pid: int) -> bool:
    return state.phase == "running" and state.supervised and state.owner_pid == owner_pid


def _background_failed(owner: subprocess.Popen[bytes], log_path: Path) -> int:
    from sightline.tooling.processes import tail

    if owner.poll() is None:  # not up in time: it stops what it started
        owner.terminate()
        owner.wait()
    lines = [line for line in tail(log_path, 40) if line.strip()]
    print(
        "\n".join(lines) or f"sightline up: the background process exited with code {owner.returncode}", file=sys.stderr
    )
    return 1


def _interrupt_on(*signals: signal.Signals) -> None:
    for sig in signals:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # keep `nohup sightline up` immune to hangups
            signal.signal(sig, signal.default_int_handler)


def _print_ready(directory: Path) -> None:
    from sightline.tooling.localstack import HOST, load_state

    state = load_state(directory)
    assert state is not None
    print(f"  {'broker':<10} {HOST}:{state.broker.port:<6} kafka")
    for name, record in state.services.items():  # every matching shard, when there are shards
        print(f"  {name:<10} {HOST}:{record.port:<6} metrics http://{HOST}:{record.metrics_port}/metrics")
    print(f"all {len(state.services)} services are SERVING", flush=True)


def _supervise(stack: LocalStack, restarts: RestartSettings, exit_on_crash: bool) -> int:
    """Restart each service that crashes, with backoff, reporting the crash and the restart; stop everything on
    Ctrl-C or SIGTERM. With ``exit_on_crash``, the first crash stops everything instead (exit 1)."""
    from sightline.tooling.supervisor import Supervisor

    supervisor = Supervisor(stack, restarts, notify=lambda message: print(f"sightline up: {message}", flush=True))
    supervisor.attach()
    try:
        while True:
            time.sleep(POLL_SECONDS)
            crashed = stack.poll_crashed()
            if exit_on_crash and crashed:
                print(f"sightline up: {stack.crash_report(crashed[0][0])}", file=sys.stderr, flush=True)
                _stop(stack)
                return 1
            supervisor.tick()
    except KeyboardInterrupt:
        _stop(stack)
        return 0


def _stop(stack: LocalStack) -> None:
    # A second Ctrl-C must not abandon half-stopped services, which run in their own sessions.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    print("stopping the stack ...", flush=True)
    stack.stop()
    print("stopped", flush=True)


# --- status ----------------------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from sightline.tooling.localstack import status

    directory = _run_dir(args)
    current = status(directory)
    if current is None:
        if args.json:
            print(json.dumps({"run_dir": str(directory), "running": False}))
        else:
            print(f"no local stack recorded in {directory} (start one with `sightline up`)")
        return 1
    if args.json:
        print(json.dumps({**current.to_dict(), "running": True}, indent=2))
    else:
        _print_status(current)
    return 0 if current.healthy else 1


def _print_status(current: StackStatus) -> None:
    started = datetime.datetime.fromtimestamp(current.started_at).strftime("%Y-%m-%d %H:%M:%S")
    mode = "detached" if current.detached else "foreground"
    print(f"stack in {current.run_dir} ({mode}, {current.phase}, started {started})")
    print(f"  {'NAME':<12} {'PID':>7}  {'ALIVE':<5}  {'HEALTH':<12} {'ADDRESS':<16} {'METRICS':<7} RESTARTS  LAST EXIT")
    broker = current.broker
    health = "REACHABLE" if broker.reachable else "UNREACHABLE"
    print(f"  {'broker':<12} {broker.pid:>7}  {_yes(broker.alive):<5}  {health:<12} {broker.bootstrap_servers:<16} -")
    for name, svc in current.services.items():
        metrics = f":{svc.metrics_port}" if svc.metrics_port else "-"
        print(
            f"  {name:<12} {svc.pid:>7}  {_yes(svc.alive):<5}  {svc.health:<12} {svc.address:<16} {metrics:<7} "
            f"{svc.restarts:>8}  {_last_exit(svc.last_exit_code, svc.last_exit_at, svc.restart_in_s)}"
        )
    print(f"logs: {Path(current.run_dir) / 'logs'}")
    if current.supervisor is None or not current.supervisor.alive:
        print("no supervisor runs: a crashed service stays down (`sightline down && sightline up` starts afresh)")
    else:
        print(f"supervised by pid {current.supervisor.pid}: a crashed service is restarted, with backoff")
    if not current.healthy:
        print("not all services are SERVING: see their logs, or `sightline restart SERVICE`")


def _last_exit(code: int | None, at: float | None, restart_in_s: float | None) -> str:
    if code is None:
        return "-"
    how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"code {code}"
    ago = f", {time.time() - at:.0f} s ago" if at else ""
    due = f"; restart in {restart_in_s:g} s" if restart_in_s is not None else ""
    return f"{how}{ago}{due}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


# --- restart ---------------------------------------------------------------------------------------------------------


def cmd_restart(args: argparse.Namespace) -> int:
    from sightline.tooling.localstack import StackError
    from sightline.tooling.supervisor import restart_through

    directory = _run_dir(args)
    try:
        for name, record in restart_through(directory, args.name, timeout=args.timeout):
            print(f"restarted {name}: pid {record.pid}, SERVING (restarts: {record.restarts})")
    except KeyError as exc:
        print(f"sightline restart: {exc.args[0]}", file=sys.stderr)
        return 2
    except StackError as exc:
        print(f"sightline restart: {exc}", file=sys.stderr)
        return 1
    return 0


# --- down ------------------------------------------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    from sightline.tooling.localstack import stop_detached

    directory = _run_dir(args)
    if stop_detached(directory, timeout=args.timeout):
        print(f"stopped the local stack in {directory}")
    else:
        print(f"no local stack is running in {directory}")
    return 0
