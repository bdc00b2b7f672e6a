"""Settings of the detection service (``SIGHTLINE_DETECTION_*``); docs/cctv.md explains the tracking ones."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from sightline.common.config import ServiceSettings
from sightline.common.images import DEFAULT_MAX_PIXELS
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS
from sightline.detection.liveness import LivenessSettings


class DetectionSettings(ServiceSettings):
    config_section: ClassVar[str] = "detection"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_DETECTION_", extra="ignore")

    grpc_port: int = Field(GRPC_PORTS["detection"], description="gRPC port (DetectionService and health).")
    metrics_port: int = Field(METRICS_PORTS["detection"], description="Prometheus metrics port.")
    score_threshold: float = Field(0.5, gt=0, lt=1, description="Minimum detector confidence for a face.")
    max_faces: int = Field(
        64,
        ge=1,
        description="Most faces kept per frame, best first: room for a crowd in a CCTV frame (a 40-face 1080p frame "
        "costs about 0.5 s of one core to detect and embed in full, `sightline bench detection`).",
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Larger frames are dead-lettered (image_too_large) before decoding."
    )
    liveness: LivenessSettings = Field(
        default_factory=LivenessSettings,
        description="Multi-frame liveness checks of e-channel sessions (JSON, or the YAML file's detection section; "
        "see docs/liveness.md).",
    )

    # CCTV face tracking and best-quality selection (docs/cctv.md); e-channel frames are neither tracked nor selected.
    track_min_iou: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Least overlap (IoU) of a face with where a track is expected for it to continue that track.",
    )
    track_min_landmark_similarity: float = Field(
        0.6,
        gt=0,
        le=1,
        description="When the boxes overlap less: least landmark similarity (1: same place, 0: two "
        "face widths apart) for a face to continue a track.",
    )
    track_max_age_s: float = Field(
        2.0,
        gt=0,
        description="A track not seen for this long (capture time) ends; the person's next face starts a new track.",
    )
    search_min_quality: float = Field(
        10.0,
        ge=0,
        le=100,
        description="CCTV faces under this unified quality score (0-100) are not searched; their "
        "track waits for a better face.",
    )
    search_first_faces: int = Field(
        2,
        ge=1,
        description="The first faces of a track (of at least search_min_quality) searched whatever their "
        "quality, so that one track can meet the decision policy's min_agreeing_frames: keep it at least as high.",
    )
    search_margin: float = Field(
        10.0,
        ge=0,
        description="After the first faces, a face of a track is searched only when its quality beats the "
        "best one searched for the track by this many points.",
    )
    search_max_faces: int = Field(3, ge=1, description="Most faces of one track that are searched.")
    cctv_min_face_px: float = Field(
        40.0,
        ge=0,
        description="Smallest face width (pixels of the frame) looked for in CCTV frames; 0: portrait-sized faces only "
        "(one whole-frame pass). Smaller costs more: on one core about 105 ms per 1080p frame at 40, 160 ms at 32 "
        "(docs/cctv.md). E-channel frames and the Detect API always look for portrait-sized faces only.",
    )
    camera_min_face_px: dict[str, float] = Field(
        default_factory=dict,
        description="Per camera (source id): its own smallest face width, overriding cctv_min_face_px, e.g. "
        '{"lobby": 64, "street-3": 32} (as JSON in the environment variable).',
    )
    search_min_inter_eye_px: float = Field(
        15.0,
        ge=0,
        description="A CCTV face whose eyes are fewer pixels apart is tracked but not searched: too small to "
        "recognise reliably. 15 px is a face about 40 px wide, one step above the smallest width at which "
        "`sightline bench sizes` still finds no loss of recognition (docs/cctv.md); 0: no floor.",
    )
    search_every_face: bool = Field(
        False,
        description="Search every CCTV face large enough to search (search_min_inter_eye_px; tracks are still set), "
        "for benchmarks and evaluations that need a decision per face; costs a search per face and frame.",
    )

    def min_face_px(self, source_id: str) -> float | None:
        """The smallest face width looked for in a CCTV frame of this camera; None: portrait-sized faces only."""
        width = self.camera_min_face_px.get(source_id, self.cctv_min_face_px)
        return width or None

    @model_validator(mode="after")
    def _first_faces_within_the_limit(self) -> DetectionSettings:
        if self.search_first_faces > self.search_max_faces:
            raise ValueError(
                f"search_first_faces ({self.search_first_faces}) must not exceed search_max_faces "
                f"({self.search_max_faces})"
            )
        return self
