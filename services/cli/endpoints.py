"""Where the CLI finds the services: an explicit flag, else the running local stack's state file, else the defaults."""

from __future__ import annotations

import json
from pathlib import Path

from sightline.common import paths
from sightline.common.config import KafkaSettings
from sightline.common.ports import GRPC_PORTS


def _stack_state(run_dir: Path | None = None) -> dict:
    state_file = (run_dir or paths.run_dir()) / "stack.json"
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError):
        return {}


def grpc_address(service: str, explicit: str | None = None) -> str:
    if explicit:
        return explicit
    port = _stack_state().get("services", {}).get(service, {}).get("grpc_port")
    return f"127.0.0.1:{port or GRPC_PORTS[service]}"


def kafka_settings(explicit: str | None = None) -> KafkaSettings:
    if explicit:
        return KafkaSettings(bootstrap_servers=explicit)
    bootstrap = _stack_state().get("bootstrap_servers")
    return KafkaSettings(bootstrap_servers=bootstrap) if bootstrap else KafkaSettings()
