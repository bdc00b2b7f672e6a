"""buf on the protos: lint passes, the protos are compatible with the last release's (protos/BASELINE), and buf
breaking catches an incompatible change made in a copy (a field renumbered, a field removed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sightline.tooling.contract import BASELINE_IMAGE, BUF, PROTOS, ContractToolsMissing, tool

EVENTS = Path("sightline") / "v1" / "events.proto"


@pytest.fixture(scope="module")
def buf() -> Path:
    try:
        return tool(BUF)
    except ContractToolsMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def baseline() -> Path:
    assert BASELINE_IMAGE.is_file(), f"{BASELINE_IMAGE} is missing: make proto-baseline"
    return BASELINE_IMAGE


def run_buf(buf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(buf), *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_protos_pass_buf_lint(buf: Path) -> None:
    done = run_buf(buf, "lint", str(PROTOS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_protos_are_compatible_with_the_last_release(buf: Path, baseline: Path) -> None:
    done = run_buf(buf, "breaking", str(PROTOS), "--against", str(baseline))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture()
def edited_copy(tmp_path: Path) -> Path:
    """A copy of protos/ to break on purpose."""
    return Path(shutil.copytree(PROTOS, tmp_path / "protos"))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    path.write_text(text.replace(old, new))


def test_buf_breaking_reports_a_renumbered_field(buf: Path, baseline: Path, edited_copy: Path) -> None:
    edit(edited_copy / EVENTS, "  string decision_id = 1;", "  string decision_id = 99;")
    done = run_buf(buf, "breaking", str(edited_copy), "--against", str(baseline))
    assert done.returncode != 0
    # To buf (and to every reader of the old number), the renumbered field is field 1 deleted.
    assert re.search(
        r'events\.proto:\d+:\d+:Previously present field "1" with name "decision_id" on message "Decision"', done.stdout
    ), done.stdout


def test_buf_breaking_reports_a_removed_field(buf: Path, baseline: Path, edited_copy: Path) -> None:
    edit(edited_copy / EVENTS, "  // CCTV: the face's track on its camera.\n  string track_id = 14;\n", "")
    done = run_buf(buf, "breaking", str(edited_copy), "--against", str(baseline))
    assert done.returncode != 0
    assert re.search(r'field "14" with name "track_id" on message "Decision" was deleted', done.stdout), done.stdout
