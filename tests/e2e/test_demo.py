"""`sightline demo`, the README's main job, run as a user runs it: it must end with the expected outcome."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_command_reports_the_expected_outcome(
    models_dir: Path, face_photos: Path, dlib_example_faces: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sightline.cli.main", "demo"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Demo outcome: as expected" in result.stdout
    assert "ALERT PENDING_REVIEW subject=obama" in result.stdout
    assert result.stdout.count("DEAD-LETTER") == 2
