"""Settings of the embedding service (``SIGHTLINE_EMBEDDING_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common.config import ServiceSettings
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS


class EmbeddingSettings(ServiceSettings):
    config_section: ClassVar[str] = "embedding"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_EMBEDDING_", extra="ignore")

    grpc_port: int = Field(GRPC_PORTS["embedding"], description="gRPC port (EmbeddingService and health).")
    metrics_port: int = Field(METRICS_PORTS["embedding"], description="Prometheus metrics port.")
    max_batch_events: int = Field(16, ge=1, description="Most face events embedded in one model batch.")
    batch_wait_ms: float = Field(
        2.0, ge=0, description="How long to wait for more events to fill a batch when some are already waiting."
    )
    max_chips_per_request: int = Field(256, ge=1, description="Most chips accepted by one Embed call.")
