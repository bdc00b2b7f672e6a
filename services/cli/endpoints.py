"""Where the CLI finds the services: an explicit flag, else the local stack recorded in the run dir, else defaults."""

from __future__ import annotations

from sightline.common import paths
from sightline.common.config import KafkaSettings
from sightline.common.localstack import HOST, StackState, load_state
from sightline.common.ports import GRPC_PORTS


def _running_stack() -> StackState | None:
    state = load_state(paths.run_dir())
    return state if state is not None and state.any_alive() else None


def grpc_address(service: str, explicit: str | None = None) -> str:
    if explicit:
        return explicit
    stack = _running_stack()
    record = stack.services.get(service) if stack else None
    return f"{HOST}:{record.port if record else GRPC_PORTS[service]}"


def kafka_settings(explicit: str | None = None) -> KafkaSettings:
    if explicit:
        return KafkaSettings(bootstrap_servers=explicit)
    stack = _running_stack()
    return KafkaSettings(bootstrap_servers=f"{HOST}:{stack.broker.port}") if stack else KafkaSettings()
