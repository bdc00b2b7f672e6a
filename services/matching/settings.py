"""Settings of the matching service (``SIGHTLINE_MATCHING_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from sightline.common import paths
from sightline.common.config import ServiceSettings
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS
from sightline.common.scores import DEFAULT_MAX_DISTANCE, distance_for_fmr


class MatchingSettings(ServiceSettings):
    config_section: ClassVar[str] = "matching"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_MATCHING_", extra="ignore")

    grpc_port: int = Field(GRPC_PORTS["matching"], description="gRPC port (GalleryService and health).")
    metrics_port: int = Field(METRICS_PORTS["matching"], description="Prometheus metrics port.")
    database_url: SecretStr = Field(
        default_factory=lambda: SecretStr(paths.default_sqlite_url("gallery.db")),
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
    match_target_fmr: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="1:1 threshold as a target false match rate (e.g. 0.001), converted to a "
        "distance with the calibration table (docs/accuracy.md); overrides match_max_distance when set.",
    )
    top_k: int = Field(5, ge=1, le=100, description="1:N candidates reported per face.")
    peer_timeout_s: float = Field(10.0, gt=0, description="Deadline of calls to detection and embedding.")
    refresh_interval_s: float = Field(
        2.0, gt=0, description="How often the search index checks the database for changes made by other replicas."
    )
    max_staleness_s: float = Field(
        10.0,
        gt=0,
        description="A replica that has not confirmed it is in step with the gallery database for "
        "refresh_interval_s plus this long (database unreachable) stops matching: searches and verifications are "
        "UNAVAILABLE, stream frames are retried, health is NOT_SERVING, until a check succeeds (it may have missed "
        "erasures). An erasure notice stops it at once until the database confirms the erasure.",
    )
    mask_cache_size: int = Field(
        64,
        ge=1,
        description="Watchlist masks the search index keeps (least recently used dropped first); each "
        "takes one byte per template.",
    )
    max_enroll_images: int = Field(20, ge=1, description="Most images accepted by one Enroll call.")
    stream_audit_interval_s: float = Field(
        60.0,
        gt=0,
        description="Stream searches are audited in aggregate: one STREAM_SEARCH record per source per "
        "this many seconds (and one at shutdown).",
    )
    # Enrolment quality gate (docs/quality.md): an image failing any of these is rejected, naming every failure.
    enroll_min_quality: float = Field(
        40.0, ge=0, le=100, description="Least unified quality score (0-100) of an enrolment image; 0 disables."
    )
    enroll_min_inter_eye_px: float = Field(
        40.0, ge=0, description="Least distance between the eye centres, in pixels of the image; 0 disables."
    )
    enroll_max_abs_yaw: float = Field(
        45.0, gt=0, le=180, description="Largest head turn left or right, degrees (180 disables)."
    )
    enroll_max_abs_pitch: float = Field(
        30.0, gt=0, le=180, description="Largest head nod up or down, degrees (180 disables)."
    )
    enroll_min_sharpness: float = Field(
        10.0, ge=0, description="Least sharpness (variance of the Laplacian on the aligned face chip); 0 disables."
    )
    enroll_min_brightness: float = Field(
        40.0, ge=0, le=255, description="Least mean grey level of the face (0-255); 0 disables."
    )
    enroll_max_brightness: float = Field(
        225.0, ge=0, le=255, description="Largest mean grey level of the face (0-255); 255 disables."
    )
    enroll_min_in_frame: float = Field(
        0.9, ge=0, le=1, description="Least share of the face inside the image (0-1); 0 disables."
    )

    @model_validator(mode="after")
    def _threshold_from_target_fmr(self) -> MatchingSettings:
        if self.match_target_fmr is not None:  # bypasses validate_assignment: the value was just derived and checked
            object.__setattr__(self, "match_max_distance", distance_for_fmr(self.match_target_fmr))
        return self
