"""At-least-once delivery: a service killed mid-stream (SIGKILL, no chance to commit) and restarted loses no frame."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from sightline.cli.gallery import enroll
from sightline.cli.outcomes import collect
from sightline.cli.run import ingest
from sightline.common.config import KafkaSettings
from sightline.tooling.localstack import LocalStack

pytestmark = pytest.mark.e2e
FRAMES = 30


@pytest.mark.parametrize("victim", ["embedding", "decision"])
def test_killed_service_restarts_and_every_frame_is_decided(
    victim: str, tmp_path: Path, face_photos: Path, models_dir: Path
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    base = Image.open(face_photos / "obama2.jpg").convert("RGB").resize((313, 600))
    for i in range(FRAMES):
        shifted = Image.new("RGB", base.size, (120, 120, 120))
        shifted.paste(base, (i % 7, i % 5))
        shifted.save(folder / f"{i:03d}.jpg", quality=90)
    # Every face searched: thirty shifted copies of one photo are one track, and this test counts decisions per frame.
    env = {"SIGHTLINE_DETECTION_SEARCH_EVERY_FACE": "true"}
    with LocalStack(tmp_path / "run", ports="auto", env=env) as stack:
        stack.start(timeout=120)
        enroll("obama", [face_photos / "obama.jpg"], [], address=stack.addresses["matching"])
        since = int(time.time() * 1000) - 1000
        feeder = threading.Thread(
            target=ingest,
            args=(str(folder),),
            kwargs={"source_id": "cam", "fps": 10, "address": stack.addresses["capture"], "progress": False},
        )
        feeder.start()
        time.sleep(1.2)
        os.kill(stack.pids[victim], signal.SIGKILL)
        time.sleep(0.5)
        stack.restart(victim)
        feeder.join(timeout=60)
        outcomes = collect(
            KafkaSettings(bootstrap_servers=stack.bootstrap_servers),
            "cam",
            set(range(1, FRAMES + 1)),
            since,
            timeout_s=120,
        )
    assert outcomes.done(set(range(1, FRAMES + 1))), (
        f"frames lost: {sorted(set(range(1, FRAMES + 1)) - set(outcomes.matches))}"
    )
    decided = {d.frame.sequence for d in outcomes.decisions}
    assert decided == set(range(1, FRAMES + 1))
    assert {d.subject_id for d in outcomes.decisions} == {"obama"}
    # Replays are allowed (at least once) but carry the same decision id, so they can be recognised.
    by_frame: dict[int, set[str]] = {}
    for d in outcomes.decisions:
        by_frame.setdefault(d.frame.sequence, set()).add(d.decision_id)
    assert all(len(ids) == 1 for ids in by_frame.values())
