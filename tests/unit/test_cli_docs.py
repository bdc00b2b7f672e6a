"""The CLI's command tree loads, and the generated configuration reference matches the settings classes."""

from __future__ import annotations

from pathlib import Path

from sightline.cli.config import render_docs
from sightline.cli.main import build_parser, main


def test_configuration_reference_is_up_to_date() -> None:
    committed = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert committed == render_docs(), (
        "docs/configuration.md is stale: run `sightline config docs > docs/configuration.md`"
    )


def test_every_setting_is_documented() -> None:
    for line in render_docs().splitlines():
        if line.startswith("| `SIGHTLINE_"):
            assert not line.rstrip().endswith("|  |"), f"setting without a description: {line}"


def test_command_tree_and_help() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("up", "status", "down", "enroll", "run", "watch", "faces", "demo", "bench", "topics"):
        assert name in commands
    assert main([]) == 2
