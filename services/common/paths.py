"""Where Sightline keeps models, sample photos and local run state on disk.

Everything lives under one home folder (``SIGHTLINE_HOME``, default ``~/.cache/sightline``) so that a user can see,
back up or delete it in one place. Each part can be moved on its own with its own variable.
"""

from __future__ import annotations

import os
from pathlib import Path


def sightline_home() -> Path:
    """Root of all local state: ``$SIGHTLINE_HOME``, else ``$XDG_CACHE_HOME/sightline``, else ``~/.cache/sightline``."""
    if env := os.environ.get("SIGHTLINE_HOME"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sightline"


def models_dir() -> Path:
    """Converted, verified face models (``$SIGHTLINE_MODELS_DIR``, default ``<home>/models``)."""
    return Path(os.environ.get("SIGHTLINE_MODELS_DIR") or sightline_home() / "models").expanduser()


def samples_dir() -> Path:
    """Sample photos fetched from package registries (``$SIGHTLINE_SAMPLES_DIR``, default ``<home>/samples``)."""
    return Path(os.environ.get("SIGHTLINE_SAMPLES_DIR") or sightline_home() / "samples").expanduser()


def run_dir() -> Path:
    """State of the local stack: pids, ports, logs, SQLite gallery (``$SIGHTLINE_RUN_DIR``, default ``<home>/run``)."""
    return Path(os.environ.get("SIGHTLINE_RUN_DIR") or sightline_home() / "run").expanduser()


def default_sqlite_url(file_name: str) -> str:
    """``sqlite:///<run dir>/<file_name>``: where a service keeps its database when none is configured."""
    return f"sqlite:///{run_dir() / file_name}"
