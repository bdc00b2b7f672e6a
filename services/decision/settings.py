"""Settings of the decision service (``SIGHTLINE_DECISION_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common.config import ServiceSettings
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS


class DecisionSettings(ServiceSettings):
    config_section: ClassVar[str] = "decision"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_DECISION_", extra="ignore")

    grpc_port: int = Field(GRPC_PORTS["decision"], description="gRPC port (health).")
    metrics_port: int = Field(METRICS_PORTS["decision"], description="Prometheus metrics port.")
    policy_file: Path | None = Field(None, description="YAML decision policy; the built-in defaults when unset.")
