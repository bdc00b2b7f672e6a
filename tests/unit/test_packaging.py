"""The installed distribution contains every package: the explicit list in pyproject.toml matches the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"]) - {"sightline.v1"}
    services = ROOT / "services"
    on_disk = {"sightline"} | {
        "sightline." + ".".join(init.parent.relative_to(services).parts)
        for init in services.rglob("__init__.py")
        if init.parent != services
    }
    assert listed == on_disk
