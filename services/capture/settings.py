"""Settings of the capture service (``SIGHTLINE_CAPTURE_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common.config import ServiceSettings
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS


class CaptureSettings(ServiceSettings):
    config_section: ClassVar[str] = "capture"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_CAPTURE_", extra="ignore")

    grpc_port: int = Field(GRPC_PORTS["capture"], description="gRPC port (CaptureService and health).")
    metrics_port: int = Field(METRICS_PORTS["capture"], description="Prometheus metrics port.")
    default_fps: float = Field(5.0, gt=0, le=60, description="Sampling rate when a request does not give one.")
    max_frame_side: int = Field(1920, ge=64, description="Decoded (video) frames are shrunk to this longer side.")
    jpeg_quality: int = Field(92, ge=50, le=100, description="JPEG quality of decoded frames.")
    sources: list[str] = Field(
        default_factory=list,
        description="Sources ingested continuously from start-up (JSON list of URIs), e.g. RTSP cameras.",
    )
    reconnect_delay_s: float = Field(5.0, gt=0, description="Wait before reopening a configured source that ended.")
