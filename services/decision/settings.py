"""Settings of the decision service (``SIGHTLINE_DECISION_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from sightline.common import paths
from sightline.common.config import ServiceSettings
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS


class DecisionSettings(ServiceSettings):
    config_section: ClassVar[str] = "decision"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_DECISION_", extra="ignore")

    grpc_port: int = Field(GRPC_PORTS["decision"], description="gRPC port (ReviewService, AuditService and health).")
    metrics_port: int = Field(METRICS_PORTS["decision"], description="Prometheus metrics port.")
    policy_file: Path | None = Field(None, description="YAML decision policy; the built-in defaults when unset.")
    database_url: SecretStr = Field(
        default_factory=lambda: SecretStr(paths.default_sqlite_url("decision.db")),
        description="Alerts under review, their reviews and e-channel sessions: sqlite:///PATH (default "
        "<run dir>/decision.db) or postgresql://USER@HOST/DB (needed for more than one replica).",
    )
    suppression_seconds: float = Field(
        3600.0,
        ge=0,
        description=(
            "How long a 'not this person' rejection suppresses alerts of that subject on that source; 0: for good."
        ),
    )
    session_hold_seconds: float = Field(
        2.0,
        gt=0,
        description="How long an e-channel match result that arrives before its session's OPENED event (the two "
        "travel on different topics) is held for that session before it is dropped.",
    )
    session_hold_max: int = Field(
        1000,
        ge=1,
        description="At most this many such early results are held, over all sessions (oldest dropped first).",
    )
    session_tick_seconds: float = Field(
        0.1,
        gt=0,
        le=5,
        description="How often open e-channel sessions are checked for their time-out and close grace.",
    )
