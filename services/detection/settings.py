"""Settings of the detection service (``SIGHTLINE_DETECTION_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common.config import ServiceSettings
from sightline.common.liveness import LivenessSettings
from sightline.common.images import DEFAULT_MAX_PIXELS
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS


class DetectionSettings(ServiceSettings):
    config_section: ClassVar[str] = "detection"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_DETECTION_", extra="ignore")

    grpc_port: int = Field(GRPC_PORTS["detection"], description="gRPC port (DetectionService and health).")
    metrics_port: int = Field(METRICS_PORTS["detection"], description="Prometheus metrics port.")
    score_threshold: float = Field(0.5, gt=0, lt=1, description="Minimum detector confidence for a face.")
    max_faces: int = Field(16, ge=1, description="Most faces kept per frame, best first.")
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Larger frames are dead-lettered (image_too_large) before decoding."
    )
    liveness: LivenessSettings = Field(
        default_factory=LivenessSettings,
        description="Multi-frame liveness checks of e-channel sessions (JSON, or the YAML file's detection section; "
        "see docs/liveness.md).",
    )
