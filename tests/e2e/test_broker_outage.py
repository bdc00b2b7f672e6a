"""The broker-outage benchmark in CI size: the broker of a supervised local stack goes away for 10 s and comes back;
the services must ride it out (no exit, health SERVING throughout) and a batch sent after the return must arrive
whole (services/cli/bench_outage.py; the 30 s figures are in docs/reliability.md, "Broker outage")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sightline.cli.bench_outage import BATCH_FRAMES

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DOWN_S = 10


def test_the_services_ride_out_a_broker_outage_and_frames_flow_after_it(models_dir: Path) -> None:
    command = [sys.executable, "-m", "sightline.cli.main", "bench", "outage", "--down-s", str(DOWN_S), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    result = json.loads(done.stdout)

    assert done.returncode == (0 if result["passed"] else 1)
    assert result["before"] == {"sent": BATCH_FRAMES, "decided": BATCH_FRAMES}
    assert set(result["health_during"].values()) == {"SERVING"}, result["health_during"]  # nothing fell over
    assert set(result["health_after"].values()) == {"SERVING"}, result["health_after"]
    assert result["restarts"] and not any(result["restarts"].values()), result["restarts"]  # nothing exited
    last = result["after"][-1]
    assert last["sent"] == BATCH_FRAMES and last["decided"] == BATCH_FRAMES, result["after"]
    assert result["flowing_again_after_s"] is not None
    assert result["passed"]
