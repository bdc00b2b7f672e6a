"""Settings of the detection service (``SIGHTLINE_DETECTION_*``); docs/cctv.md explains the tracking ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from sightline.common.config import ServiceSettings
from sightline.common.images import DEFAULT_MAX_PIXELS
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS
from sightline.detection.liveness import LivenessSettings

Fraction = Annotated[float, Field(ge=0, le=1)]


class CameraScanOverrides(BaseModel):
    """One camera's own scan settings (DetectionSettings.cameras); None: the service's cctv_ setting."""

    model_config = ConfigDict(extra="forbid")

    min_face_px: float | None = Field(None, ge=0, description="Smallest face width looked for; 0: portraits only.")
    roi: list[tuple[Fraction, Fraction, Fraction, Fraction]] | None = Field(
        None, min_length=1, description="Regions of interest [x1, y1, x2, y2], fractions of the frame."
    )
    tile_px: int | None = Field(None, ge=0, description="Focused-scanning tile size; 0: the whole frame each time.")

    @field_validator("roi")
    @classmethod
    def _not_empty(
        cls, roi: list[tuple[float, float, float, float]] | None
    ) -> list[tuple[float, float, float, float]] | None:
        for x1, y1, x2, y2 in roi or ():
            if x2 <= x1 or y2 <= y1:
                raise ValueError(f"a region of interest needs x2 > x1 and y2 > y1, got {[x1, y1, x2, y2]}")
        return roi


@dataclass(frozen=True)
class CameraScan:
    """How one camera's CCTV frames are scanned, resolved (DetectionSettings.camera_scan)."""

    min_face_px: float
    roi: list[tuple[float, float, float, float]] | None
    tile_px: int


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
    track_max_speed: float = Field(
        12.0,
        gt=0,
        description="The fastest a face moves across the picture, in face widths per second (12: about 2 m/s, a "
        "brisk walk): a face of about a track's size within that reach since the track was last seen continues it "
        "when boxes and landmarks no longer overlap (small faces at 5 frames per second).",
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
        "(one whole-frame pass). Smaller costs more: on one core a full scan of a 1080p frame takes about 105 ms at "
        "40, 160 ms at 32; a camera's stream with focused scanning (cctv_tile_px) about 40-55 ms per frame at 40 "
        "(docs/cctv.md). E-channel frames and the Detect API always look for portrait-sized faces only.",
    )
    cctv_tile_px: int = Field(
        480,
        ge=0,
        description="Focused scanning (detection/scan_plan.py): after a camera's first frame, the fine passes "
        "scan only where the picture changed, around the tracks, and one tile about this many pixels square in "
        "turn (a 4x3 grid at 1080p: all of the frame every 12 frames). 0: the whole frame every frame, two to three "
        "times the cost (docs/cctv.md, `sightline bench detection`).",
    )
    cctv_motion_level: int = Field(
        12,
        ge=1,
        le=255,
        description="Grey levels a pixel of a frame's eighth-size thumbnail must change by to count as motion for "
        "focused scanning: above JPEG and sensor noise.",
    )
    cameras: dict[str, CameraScanOverrides] = Field(
        default_factory=dict,
        description="Per camera (source id): its own scan settings, each falling back to the cctv_ one, e.g. "
        '{"street-3": {"min_face_px": 32}, "lobby": {"min_face_px": 64, "roi": [[0, 0.3, 1, 1]], "tile_px": 0}} '
        "(JSON in the environment variable). roi: rectangles [x1, y1, x2, y2] as fractions of the frame; faces "
        "centred outside all of them are ignored (a poster, a screen, a neighbour's window).",
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

    def camera_scan(self, source_id: str) -> CameraScan:
        """How CCTV frames of this camera are scanned: its overrides over the cctv_ defaults."""
        own = self.cameras.get(source_id) or CameraScanOverrides()
        return CameraScan(
            min_face_px=self.cctv_min_face_px if own.min_face_px is None else own.min_face_px,
            roi=own.roi,
            tile_px=self.cctv_tile_px if own.tile_px is None else own.tile_px,
        )

    @model_validator(mode="after")
    def _first_faces_within_the_limit(self) -> DetectionSettings:
        if self.search_first_faces > self.search_max_faces:
            raise ValueError(
                f"search_first_faces ({self.search_first_faces}) must not exceed search_max_faces "
                f"({self.search_max_faces})"
            )
        return self
