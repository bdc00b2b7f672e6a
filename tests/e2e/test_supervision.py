"""Supervision of the local stack: a crashed service comes back, with a growing backoff, and can be restarted on
request.

The first tests run the CLI as a user does (``sightline up --detach``: a background ``sightline up`` supervises the
stack) and SIGKILL a service of it. The last one runs a stack of decision alone with a supervisor thread, as a
benchmark does, and breaks decision's policy file so that every start of it fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sightline.tooling.localstack import LocalStack, load_state, status
from sightline.tooling.processes import pid_alive
from sightline.tooling.supervisor import RestartSettings, Supervisor, restart_through

pytestmark = pytest.mark.e2e
CLI = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from sightline.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def sightline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args], check=False, capture_output=True, text=True, timeout=240)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


def service_status(run_dir: Path, name: str) -> dict[str, Any]:
    shown = sightline("status", "--json", "--run-dir", str(run_dir))
    return json.loads(shown.stdout)["services"][name]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def detached(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Path]:
    run_dir = tmp_path_factory.mktemp("supervised") / "run"
    up = sightline("up", "--detach", "--ports", "auto", "--run-dir", str(run_dir))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "supervised by pid" in up.stdout
    try:
        yield run_dir
    finally:
        state = load_state(run_dir)
        down = sightline("down", "--run-dir", str(run_dir))
        assert down.returncode == 0, down.stdout + down.stderr
        assert state is not None and not pid_alive(state.owner_pid or 0, state.owner_start_ticks)


def test_a_killed_service_comes_back_serving_with_one_restart(detached: Path) -> None:
    before = load_state(detached)
    assert before is not None and before.supervised and before.detached
    os.kill(before.services["detection"].pid, signal.SIGKILL)

    def back() -> dict[str, Any] | None:
        shown = service_status(detached, "detection")
        return shown if shown["health"] == "SERVING" and shown["pid"] != before.services["detection"].pid else None

    shown = wait_for(back, 120, "detection to be SERVING again")
    assert shown["restarts"] == 1
    assert shown["last_exit_code"] == -signal.SIGKILL
    text = sightline("status", "--run-dir", str(detached)).stdout
    assert "signal SIGKILL" in text and "supervised by pid" in text
    log = (detached / "logs" / "supervisor.log").read_text()
    assert "detection was killed by SIGKILL" in log and "restarted detection" in log


def test_restart_command_restarts_one_service_of_a_detached_stack(detached: Path) -> None:
    before = service_status(detached, "embedding")
    restarted = sightline("restart", "embedding", "--run-dir", str(detached))
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "restarted embedding" in restarted.stdout and "SERVING" in restarted.stdout
    after = service_status(detached, "embedding")
    assert after["pid"] != before["pid"] and after["health"] == "SERVING"
    assert after["restarts"] == before["restarts"] + 1
    assert not pid_alive(before["pid"])
    unknown = sightline("restart", "gateway", "--run-dir", str(detached))
    assert unknown.returncode == 2 and "no process 'gateway'" in unknown.stderr


def test_restart_without_a_stack_says_so(tmp_path: Path) -> None:
    missing = sightline("restart", "detection", "--run-dir", str(tmp_path))
    assert missing.returncode == 1 and "no local stack recorded" in missing.stderr


def test_a_service_that_fails_at_every_start_is_restarted_ever_more_slowly(tmp_path: Path, models_dir: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_agreeing_frames: 2\n")
    # reset_after_s well above how long a failing start takes on a loaded machine (imports alone can take seconds)
    settings = RestartSettings(initial_backoff_s=0.5, max_backoff_s=2.0, reset_after_s=12.0)
    with LocalStack(tmp_path / "run", ports="auto", services=("decision",), policy_file=policy) as stack:
        stack.start(timeout=120)
        messages: list[str] = []
        Supervisor(stack, settings, notify=messages.append).start()  # halted by the stack's stop
        policy.write_text("min_agreeing_frames: [unclosed\n")  # decision refuses to start from now on
        os.kill(stack.pids["decision"], signal.SIGKILL)

        healths: set[str] = set()

        def four_restarts() -> bool:
            healths.add(status(stack.run_dir).services["decision"].health)  # type: ignore[union-attr]
            return stack.record("decision").restarts >= 4

        wait_for(four_restarts, 120, "four restarts")
        waits = [float(m) for m in re.findall(r"restarting decision in ([0-9.]+) s", "\n".join(messages))]
        assert waits[:4] == [0.5, 1.0, 2.0, 2.0]  # doubling after each crash in a row, capped at max_backoff_s
        assert "BACKOFF" in healths
        assert stack.record("decision").last_exit_code not in (None, 0, -signal.SIGKILL)  # its own failure

        policy.write_text("min_agreeing_frames: 2\n")
        wait_for(lambda: _serving(stack, "decision"), 120, "decision to be SERVING once its policy is mended")

        # Up longer than reset_after_s: the next crash starts from the first wait again.
        record = stack.record("decision")
        wait_for(lambda: time.time() - (record.started_at or 0) > settings.reset_after_s + 0.5, 60, "uptime")
        restarts, told = record.restarts, len(messages)
        os.kill(record.pid, signal.SIGKILL)
        wait_for(lambda: stack.record("decision").restarts > restarts, 60, "the restart after the reset")
        assert stack.record("decision").backoff_s == settings.initial_backoff_s
        since_kill = "\n".join(messages[told:])  # the crash report, its wait, "restarted decision", in that order
        assert "crash 1 in a row" in since_kill and "in a row" not in since_kill.replace("crash 1 in a row", ""), (
            since_kill
        )
        wait_for(lambda: _serving(stack, "decision"), 120, "decision to be SERVING again")

        # A requested restart of a stack supervised in this process (the path `sightline restart` takes).
        before = stack.record("decision")
        [(name, after)] = restart_through(stack.run_dir, "decision", timeout=120)
        assert name == "decision" and after.pid != before.pid and after.restarts == before.restarts + 1


def _serving(stack: LocalStack, name: str) -> bool:
    current = status(stack.run_dir)
    return current is not None and current.services[name].health == "SERVING"
