"""Where the contract tools are and what they compare against: buf and the AsyncAPI validator installed by
``make tools`` (npm, into build/tools/contract, from tools/contract/package.json), and the protos of the last
release, for ``buf breaking``: the buf image protos/baseline.binpb, built from the commit protos/BASELINE names by
``make proto-baseline`` at each release. The image is checked in, so the check needs no git history (a shallow clone
passes it too).

The Makefile's ``lint-protos`` target runs the same checks; tests/unit/test_buf.py and test_asyncapi.py use these
paths so that a missing install fails with the command that makes it.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
TOOLS = REPO / "build" / "tools" / "contract"
BUF = TOOLS / "node_modules" / ".bin" / "buf"
ASYNCAPI_VALIDATOR = TOOLS / "validate-asyncapi.mjs"
BASELINE_FILE = PROTOS / "BASELINE"
BASELINE_IMAGE = PROTOS / "baseline.binpb"


class ContractToolsMissing(RuntimeError):
    """The npm tools are not installed: the message says how to install them."""


def tool(path: Path) -> Path:
    """The installed tool at ``path``; ContractToolsMissing when ``make tools`` has not installed it."""
    if not path.exists():
        raise ContractToolsMissing(f"{path} not found: run `make tools` (or `make setup`)")
    return path


def baseline_ref() -> str:
    """The commit whose protos are the last release's (the first line of protos/BASELINE that is not a comment)."""
    lines = [line.strip() for line in BASELINE_FILE.read_text().splitlines()]
    return next(line for line in lines if line and not line.startswith("#"))


def export_baseline(dest: Path, ref: str | None = None) -> Path:
    """Write the baseline commit's protos/ folder under ``dest`` (for ``make proto-baseline``); returns it.

    ``git archive`` reads the commit from the repository's history: a shallow clone without it fails here, saying so.
    """
    ref = ref or baseline_ref()
    done = subprocess.run(["git", "archive", ref, "protos"], cwd=REPO, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git archive {ref} protos failed (is the history there?): {done.stderr.decode()[:500]}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(dest, filter="data")
    return dest / "protos"
