"""Detection's per-session liveness: verdicts accumulate per session, on the real models and real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sightline.common.images import decode_image
from sightline.common.liveness import LivenessSettings
from sightline.common.models.pipeline import FaceAnalyzer
from sightline.common.models.registry import model_files
from sightline.detection.session_liveness import SessionLiveness, traveller


@pytest.fixture(scope="module")
def analyzer(models_dir: Path) -> FaceAnalyzer:
    return FaceAnalyzer(model_files(models_dir))


def on_canvas(chip: Path, dx: int, dy: int) -> np.ndarray:
    canvas = Image.new("RGB", (480, 400), (96, 100, 104))
    canvas.paste(Image.open(chip).convert("RGB").resize((240, 240)), (120 + dx, 80 + dy))
    return np.asarray(canvas)


def feed(liveness: SessionLiveness, analyzer: FaceAnalyzer, session: str, frames: list[np.ndarray]) -> list:
    results = []
    for i, rgb in enumerate(frames):
        face = traveller(analyzer.analyze(rgb))
        assert face is not None
        results.append(liveness.observe(session, face, at=100.0 + i * 0.1))
    return results


def test_verdicts_come_once_enough_frames_are_in_and_follow_the_evidence(analyzer: FaceAnalyzer, dlib_johns: Path,
                                                                        face_photos: Path) -> None:  # fmt: skip
    liveness = SessionLiveness(LivenessSettings(min_frames=6))
    person = sorted(p for p in dlib_johns.iterdir() if p.is_dir())[0]
    real = [on_canvas(chip, (i % 3) * 7, (i % 2) * 5) for i, chip in enumerate(sorted(person.glob("*.jpg"))[:8])]
    still = [decode_image((face_photos / "obama.jpg").read_bytes())] * 8

    live_results = feed(liveness, analyzer, "real", real)
    still_results = feed(liveness, analyzer, "still", still)

    assert [r.assessed for r in live_results[:5]] == [False] * 5 and "need 6 frames, have 1" in live_results[0].reasons[0]
    assert live_results[-1].assessed and live_results[-1].passed, list(live_results[-1].reasons)
    assert still_results[-1].assessed and not still_results[-1].passed
    assert any("motion" in reason for reason in still_results[-1].reasons)
    assert live_results[-1].frames == 6 and still_results[-1].frames == 6  # sessions do not mix
    # Assessed once, on the first six frames: later frames carry that verdict without the checks running again.
    assert live_results[5] == live_results[6] == live_results[7] and still_results[5] == still_results[7]
