"""``sightline up``, ``sightline status`` and ``sightline down``: run the whole pipeline on this machine.

``up`` starts the embedded broker and the five services as separate processes (see sightline.tooling.localstack) and
either supervises them in the foreground (Ctrl-C stops everything) or, with ``--detach``, leaves them running in the
background for ``status`` and ``down`` to find through the run dir's state file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sightline.common.paths import run_dir

if TYPE_CHECKING:
    from sightline.tooling.localstack import LocalStack, StackStatus

POLL_SECONDS = 0.5


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
    up.add_argument("--exit-on-crash", action="store_true", help="stop everything and exit 1 if a service dies")
    up.add_argument(
        "--ports",
        choices=("default", "auto"),
        default="default",
        help="default: the documented ports; auto: free ports (to run beside another stack)",
    )
    up.set_defaults(func=cmd_up)

    status = subparsers.add_parser(
        "status", help="show the local stack's processes and health (exit 0 only if all are SERVING)"
    )
    _run_dir_option(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)

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
    from sightline.tooling.localstack import LocalStack, StackError

    stack = LocalStack(_run_dir(args), ports=args.ports, policy_file=args.policy)
    _interrupt_on(signal.SIGTERM, signal.SIGHUP)  # stop cleanly when asked to by a signal, not only by Ctrl-C
    print(f"starting the broker and {len(stack.services)} services (logs in {stack.log_dir}) ...", flush=True)
    try:
        stack.start(timeout=args.timeout, detach=args.detach)
    except StackError as exc:
        print(f"sightline up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted while starting; everything that had started is stopped", file=sys.stderr)
        return 130
    if args.detach:
        _print_ready(stack)
        print("running in the background: `sightline status` to check it, `sightline down` to stop it")
        return 0
    try:  # from here on a Ctrl-C, wherever it lands, stops the stack: it must never leave processes behind
        _print_ready(stack)
        print("press Ctrl-C to stop", flush=True)
        return _supervise(stack, args.exit_on_crash)
    except KeyboardInterrupt:
        _stop(stack)
        return 0


def _interrupt_on(*signals: signal.Signals) -> None:
    for sig in signals:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # keep `nohup sightline up` immune to hangups
            signal.signal(sig, signal.default_int_handler)


def _print_ready(stack: LocalStack) -> None:
    print(f"  {'broker':<10} {stack.bootstrap_servers:<16} kafka")
    for name, address in stack.process_addresses.items():  # every matching shard, when there are shards
        print(f"  {name:<10} {address:<16} metrics http://127.0.0.1:{stack.ports.metrics[name]}/metrics")
    print(f"all {len(stack.process_addresses)} services are SERVING", flush=True)


def _supervise(stack: LocalStack, exit_on_crash: bool) -> int:
    """Report each process that dies, once, as soon as it dies; stop everything on Ctrl-C or SIGTERM."""
    reported: set[str] = set()
    try:
        while True:
            time.sleep(POLL_SECONDS)
            for name, _ in stack.poll_crashed():
                if name in reported:
                    continue
                reported.add(name)
                print(f"sightline up: {stack.crash_report(name)}", file=sys.stderr, flush=True)
                if exit_on_crash:
                    _stop(stack)
                    return 1
                print("the other processes keep running (Ctrl-C stops them)", file=sys.stderr, flush=True)
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
    print(f"  {'NAME':<10} {'PID':>7}  {'ALIVE':<5}  {'HEALTH':<12} {'ADDRESS':<16} METRICS")
    broker = current.broker
    health = "REACHABLE" if broker.reachable else "UNREACHABLE"
    print(f"  {'broker':<10} {broker.pid:>7}  {_yes(broker.alive):<5}  {health:<12} {broker.bootstrap_servers:<16} -")
    for name, svc in current.services.items():
        metrics = f":{svc.metrics_port}" if svc.metrics_port else "-"
        print(f"  {name:<10} {svc.pid:>7}  {_yes(svc.alive):<5}  {svc.health:<12} {svc.address:<16} {metrics}")
    print(f"logs: {Path(current.run_dir) / 'logs'}")
    if not current.healthy:
        print("not all services are SERVING: see their logs, or restart with `sightline down && sightline up`")


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


# --- down ------------------------------------------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    from sightline.tooling.localstack import stop_detached

    directory = _run_dir(args)
    if stop_detached(directory, timeout=args.timeout):
        print(f"stopped the local stack in {directory}")
    else:
        print(f"no local stack is running in {directory}")
    return 0
