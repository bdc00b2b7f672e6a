"""Settings of the matching service (``SIGHTLINE_MATCHING_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from sightline.common import paths
from sightline.common.config import ServiceSettings
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS
from sightline.common.scores import DEFAULT_MAX_DISTANCE


def _default_database_url() -> str:
    return f"sqlite:///{paths.run_dir() / 'gallery.db'}"


class MatchingSettings(ServiceSettings):
    config_section: ClassVar[str] = "matching"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_MATCHING_", extra="ignore")

    grpc_port: int = Field(GRPC_PORTS["matching"], description="gRPC port (GalleryService and health).")
    metrics_port: int = Field(METRICS_PORTS["matching"], description="Prometheus metrics port.")
    database_url: SecretStr = Field(
        default_factory=lambda: SecretStr(_default_database_url()),
        description="Gallery database: sqlite:///PATH (default <run dir>/gallery.db) or postgresql://USER@HOST/DB.",
    )
    template_key: SecretStr = Field(
        ..., description="Template encryption key, base64 of 32 bytes (AES-256-GCM). Required; keep it in a secret."
    )
    template_key_id: str = Field("k1", min_length=1, description="Id stored with each template for key rotation.")
    previous_template_keys: SecretStr | None = Field(
        None, description="Older keys still readable during rotation: 'id:BASE64,id:BASE64'."
    )
    detection_addr: str = Field(f"127.0.0.1:{GRPC_PORTS['detection']}", description="Detection service gRPC address.")
    embedding_addr: str = Field(f"127.0.0.1:{GRPC_PORTS['embedding']}", description="Embedding service gRPC address.")
    match_max_distance: float = Field(
        DEFAULT_MAX_DISTANCE, gt=0, description="Distance at or under which a 1:1 verification succeeds."
    )
    top_k: int = Field(5, ge=1, le=100, description="1:N candidates reported per face.")
    peer_timeout_s: float = Field(10.0, gt=0, description="Deadline of calls to detection and embedding.")
    refresh_interval_s: float = Field(
        2.0, gt=0, description="How often the search index checks the database for changes made by other replicas."
    )
    max_enroll_images: int = Field(20, ge=1, description="Most images accepted by one Enroll call.")
