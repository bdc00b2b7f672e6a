"""The chaos benchmark in CI size: every service SIGKILLed once while frames of known faces stream, then every frame
accounted for (``sightline bench chaos``, services/cli/bench_chaos.py; the full size is in docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sightline.cli.bench_chaos import CHAOS_SERVICES, bench_chaos

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
FRAMES = 200


def test_every_frame_has_exactly_one_outcome_while_every_service_is_killed(models_dir: Path) -> None:
    result = bench_chaos(frames=FRAMES, kills=1, fps=10.0, seed=3, gate=True, timeout=300.0)

    assert result["kills_per_service"] == dict.fromkeys(CHAOS_SERVICES, 1)
    assert all(result["restarts"][service] >= 1 for service in CHAOS_SERVICES), result["restarts"]
    assert result["frames"] == FRAMES
    assert result["lost"] == 0, result["cameras"]["lost_examples"]
    assert result["duplicates_after_dedup"] == 0, result["cameras"]["duplicated_examples"]
    cameras = result["cameras"]
    assert cameras["decided"] + cameras["no_face_or_not_searched"] + cameras["dead_letter"] == cameras["frames"]
    assert cameras["decided"] > 0 and cameras["no_face_or_not_searched"] > 0  # both kinds of frame were streamed
    assert result["alerts"]["published"] > 0
    assert result["alerts"]["missing"] == 0 and result["alerts"]["doubled"] == 0, result["alerts"]
    assert result["gate"]["decided_twice"] == 0 and result["gate"]["undecided"] == 0, result["gate"]
    assert result["passed"]
