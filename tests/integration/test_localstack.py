"""The local stack with the real processes: Tansu and the five services, started, inspected, crashed and stopped.

The tests in the first part share one stack (starting it takes seconds) and run in file order: the last two kill
one of its services and then stop it. The CLI tests start their own stacks, as a user would, in a subprocess.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sightline.common.ports import LOCAL_BROKER_PORT, SERVICES
from sightline.common.rpc import check_health
from sightline.tooling.broker import port_open
from sightline.tooling.localstack import LocalStack, StackError, load_state, status
from sightline.tooling.processes import pid_alive

START_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack") / "run", ports="auto") as running:
        running.start(timeout=START_TIMEOUT)
        yield running


def _wait_for(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# --- one shared stack -------------------------------------------------------------------------------------------------


def test_all_five_services_are_serving(stack: LocalStack) -> None:
    assert set(stack.addresses) == set(SERVICES)
    for name, address in stack.addresses.items():
        assert check_health(address) == "SERVING", name
    assert port_open("127.0.0.1", int(stack.bootstrap_servers.rsplit(":", 1)[1]))


def test_state_file_records_pids_ports_and_logs(stack: LocalStack) -> None:
    recorded = json.loads((stack.run_dir / "stack.json").read_text())
    assert recorded["phase"] == "running" and not recorded["detached"] and recorded["owner_pid"] == os.getpid()
    assert recorded["broker"]["pid"] == stack.pids["broker"]
    for name in SERVICES:
        service = recorded["services"][name]
        assert service["pid"] == stack.pids[name]
        assert f"127.0.0.1:{service['port']}" == stack.addresses[name]
        assert service["metrics_port"] == stack.metrics_ports[name]
        first_line = Path(service["log"]).read_text().splitlines()[0]
        assert json.loads(first_line)["service"] == name  # each service's JSON logs land in its own file
    assert (stack.run_dir / "logs" / "broker.log").exists()


def test_template_key_is_private_and_reused(stack: LocalStack) -> None:
    key_file = stack.run_dir / "template.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(base64.b64decode(key_file.read_text().strip(), validate=True)) == 32


def test_status_reports_every_process_alive_and_serving(stack: LocalStack) -> None:
    current = status(stack.run_dir)
    assert current is not None and current.healthy
    assert current.broker.alive and current.broker.reachable
    for name, service in current.services.items():
        assert service.alive and service.health == "SERVING", name
        assert service.pid == stack.pids[name]


def test_second_start_on_the_same_run_dir_is_refused(stack: LocalStack) -> None:
    before = (stack.run_dir / "stack.json").read_text()
    with pytest.raises(StackError, match="is in use — is a stack already running"):
        LocalStack(stack.run_dir, ports="auto").start(timeout=10)
    assert (stack.run_dir / "stack.json").read_text() == before  # the refused start touched nothing
    assert status(stack.run_dir).healthy  # type: ignore[union-attr]


def test_killed_service_is_reported(stack: LocalStack) -> None:
    os.kill(stack.pids["embedding"], signal.SIGKILL)
    assert _wait_for(lambda: ("embedding", -signal.SIGKILL) in stack.poll_crashed())
    current = status(stack.run_dir)
    assert current is not None and not current.healthy
    assert not current.services["embedding"].alive and current.services["embedding"].health == "STOPPED"
    assert all(s.health == "SERVING" for n, s in current.services.items() if n != "embedding")
    report = stack.crash_report("embedding")
    assert "killed by SIGKILL" in report and str(stack.log_path("embedding")) in report


def test_stop_leaves_no_process_behind(stack: LocalStack) -> None:
    state = load_state(stack.run_dir)
    assert state is not None
    stack.stop()
    for name, record in state.processes():
        assert not pid_alive(record.pid, record.start_ticks), f"{name} (pid {record.pid}) still runs"
    assert not (stack.run_dir / "stack.json").exists()
    assert not port_open("127.0.0.1", state.broker.port)
    stack.stop()  # stopping twice is harmless


# --- ports ------------------------------------------------------------------------------------------------------------


def test_taken_port_gives_a_clear_message(tmp_path: Path) -> None:
    # Hold the broker's default port (checked first); if a developer's stack already holds it, that is the same case.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if not port_open("127.0.0.1", LOCAL_BROKER_PORT):
            holder.bind(("127.0.0.1", LOCAL_BROKER_PORT))
            holder.listen()
        with pytest.raises(StackError) as error:
            LocalStack(tmp_path, ports="default").start(timeout=10)
    finally:
        holder.close()
    assert str(error.value).startswith(
        f"port {LOCAL_BROKER_PORT} is in use — is a stack already running? try `sightline status` or `sightline down`"
    )
    assert not (tmp_path / "stack.json").exists()


# --- the CLI, as a user runs it ---------------------------------------------------------------------------------------

# Ctrl-C is restored explicitly: a shell starting pytest in the background makes its children ignore SIGINT.
CLI = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from sightline.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def sightline(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], check=False, capture_output=True, text=True, timeout=180, **kwargs
    )


def _all_gone(run_dir: Path, recorded: dict) -> bool:  # type: ignore[type-arg]
    processes = [recorded["broker"], *recorded["services"].values()]
    return not any(pid_alive(p["pid"], p["start_ticks"]) for p in processes) and not (run_dir / "stack.json").exists()


def test_cli_detached_up_status_down(tmp_path: Path, models_dir: Path) -> None:
    run_dir = str(tmp_path / "run")
    up = sightline("up", "--detach", "--ports", "auto", "--run-dir", run_dir)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "all 5 services are SERVING" in up.stdout
    recorded = json.loads((tmp_path / "run" / "stack.json").read_text())
    try:
        shown = sightline("status", "--json", "--run-dir", run_dir)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        report = json.loads(shown.stdout)
        assert report["healthy"] and report["detached"]
        assert {name: s["health"] for name, s in report["services"].items()} == dict.fromkeys(SERVICES, "SERVING")
    finally:
        down = sightline("down", "--run-dir", run_dir)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert _all_gone(tmp_path / "run", recorded)
    assert recorded["supervised"] and not pid_alive(recorded["owner_pid"], recorded["owner_start_ticks"])
    assert sightline("status", "--run-dir", run_dir).returncode != 0
    assert "no local stack is running" in sightline("down", "--run-dir", run_dir).stdout


def test_cli_foreground_up_stops_cleanly_on_ctrl_c(tmp_path: Path, models_dir: Path) -> None:
    run_dir = tmp_path / "run"
    up = subprocess.Popen(
        [sys.executable, "-c", CLI, "up", "--ports", "auto", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:  # until the stack says it is up (or the process ends)
            lines.append(line)
            if "SERVING" in line:
                break
        assert any("SERVING" in line for line in lines), "".join(lines)
        recorded = json.loads((run_dir / "stack.json").read_text())
        up.send_signal(signal.SIGINT)
        output = up.communicate(timeout=60)[0]
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0, output
    assert "stopped" in output
    assert _all_gone(run_dir, recorded)


def test_a_foreground_stack_dies_with_the_process_that_owns_it(tmp_path: Path, models_dir: Path) -> None:
    """A killed test, demo or `sightline up` must not leave its broker and services running, unowned."""
    import signal as signals
    import subprocess
    import sys
    import time

    script = (
        "import sys, time; from pathlib import Path; from sightline.tooling.localstack import LocalStack\n"
        f"stack = LocalStack(Path({str(tmp_path / 'run')!r}), ports='auto', services=('decision',))\n"
        "stack.start(timeout=120); print(' '.join(map(str, stack.pids.values())), flush=True); time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    pids = [int(p) for p in owner.stdout.readline().split()]
    assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
    owner.send_signal(signals.SIGKILL)  # no chance to clean up
    owner.wait()
    deadline = time.monotonic() + 30
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(pid) for pid in pids)
