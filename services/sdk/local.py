"""The endpoints of a local stack (``sightline up``) for the SDK: its services' addresses, its token, its broker.

A stack started by ``sightline up`` records its pids and ports in ``<run dir>/stack.json`` and writes the local
administrator's token to ``<run dir>/client-token`` (``tooling/localstack.py``); this reads both, so an integration
script can be tried against a laptop's stack with no configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sightline.common import paths
from sightline.common.config import KafkaSettings
from sightline.sdk.errors import ConfigurationError

API_SERVICES = ("matching", "decision", "capture")  # the services whose APIs the client calls


@dataclass(frozen=True)
class LocalStackEndpoints:
    """Where a running local stack listens, and the token it let in."""

    addresses: dict[str, str]  # service -> host:port
    token: str
    bootstrap_servers: str

    def kafka_settings(self) -> KafkaSettings:
        """Settings for its embedded broker (Tansu), with the fast group joins the local stack uses too."""
        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers,
            session_timeout_ms=2000,  # Tansu holds group joins for session_timeout / 2
            heartbeat_interval_ms=500,
            fetch_max_wait_ms=25,  # Tansu holds each fetch for the whole wait
        )


def local_stack(run_dir: Path | None = None) -> LocalStackEndpoints:
    """The endpoints of the stack running from ``run_dir`` (default ``$SIGHTLINE_RUN_DIR``, else <home>/run);
    ConfigurationError when none runs there."""
    from sightline.tooling.localstack import HOST, client_token, load_state

    folder = Path(run_dir).expanduser() if run_dir is not None else paths.run_dir()
    state = load_state(folder)
    if state is None or not state.any_alive():
        raise ConfigurationError(f"no local stack is running from {folder}: start one with `sightline up`")
    addresses = {}
    for service in API_SERVICES:
        # A sharded matching runs as matching-0, matching-1...: any of them serves the gallery API.
        record = state.services.get(service) or state.services.get(f"{service}-0")
        if record is not None:
            addresses[service] = f"{HOST}:{record.port}"
    return LocalStackEndpoints(addresses, client_token(folder), f"{HOST}:{state.broker.port}")
