"""Settings of the capture service (``SIGHTLINE_CAPTURE_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from sightline.capture.source_policy import DEFAULT_MAX_VIDEO_BYTES, parse_host_entry
from sightline.common import paths
from sightline.common.config import ServiceSettings
from sightline.common.ports import GRPC_PORTS, METRICS_PORTS


class CaptureSettings(ServiceSettings):
    config_section: ClassVar[str] = "capture"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_CAPTURE_", extra="ignore")

    grpc_port: int = Field(GRPC_PORTS["capture"], description="gRPC port (CaptureService and health).")
    metrics_port: int = Field(METRICS_PORTS["capture"], description="Prometheus metrics port.")
    default_fps: float = Field(5.0, gt=0, le=60, description="Sampling rate when a request does not give one.")
    max_frame_side: int = Field(1920, ge=64, description="Decoded (video) frames are shrunk to this longer side.")
    # JPEG of decoded (video) frames; image files are passed on as they are. `sightline bench video`, docs/cctv.md.
    jpeg_quality: int = Field(
        85,
        ge=50,
        le=100,
        description="JPEG quality of decoded video frames (CCTV, and any purpose but e-channel). 85: a third fewer "
        "bytes than 92 for the broker and detection (about 320 KB for a busy 1080p frame), with the same detection "
        "recall of 32-64 px faces; it moves a 48-64 px face's descriptor a median 0.14 from the lossless frame's "
        "(0.11 at 92, 0.18 at 75, 0.07 at 100), far inside the 0.6 same-person threshold.",
    )
    echannel_jpeg_quality: int = Field(
        92,
        ge=50,
        le=100,
        description="JPEG quality of decoded video frames ingested for an e-channel claim (`sightline run --claim`): "
        "few frames decide one traveller's 1:1 check, so bytes matter less than the descriptor (a median 0.11 from the "
        "lossless frame's at 92).",
    )
    sources: list[str] = Field(
        default_factory=list,
        description="Sources ingested continuously from start-up (JSON list of URIs), e.g. RTSP cameras; each must "
        "pass the source policy below (one it refuses is logged and never opened).",
    )
    reconnect_delay_s: float = Field(
        5.0,
        gt=0,
        description="Wait before reopening a configured source that ended or could not be opened; doubled "
        "after each attempt that read no frame, up to reconnect_max_delay_s.",
    )
    reconnect_max_delay_s: float = Field(
        60.0, gt=0, description="Longest wait between two attempts to open a configured source that is down."
    )
    stream_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a stream (or video file) to open, and for its next frame."
    )

    # Source policy (capture/source_policy.py, docs/security.md): what an Ingest call or `sources` may open.
    # Everything is refused by default; the local stack allows the user's own folders and networks.
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Folders whose image and video files capture may read (JSON list of absolute paths); paths are "
        "resolved, symlinks followed, before the check. Empty: no file source is read.",
    )
    allowed_schemes: list[Literal["rtsp", "rtsps", "http", "https"]] = Field(
        default_factory=list,
        description='URL schemes a network source may use (JSON list, e.g. ["rtsp", "rtsps"]). Empty: no '
        "network source is opened.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a network source may name (JSON list): IP networks in CIDR form or single addresses "
        '(every address a name resolves to must be inside one), or host names, exact or "*.suffix" (trusted as '
        "named; an rtsps/https host must be listed by name). Empty: no network source is opened.",
    )
    max_image_file_bytes: int = Field(
        20 * 1024 * 1024,
        ge=1024,
        description="An image file larger than this is refused before it is read (also bounded by the largest "
        "event the broker takes).",
    )
    max_video_file_bytes: int = Field(
        DEFAULT_MAX_VIDEO_BYTES,
        ge=0,
        description="A video file larger than this is refused before it is opened (default 4 GiB); 0: no limit.",
    )

    # E-channel gate sessions (KioskService, capture/kiosk/kiosk.py).
    grpc_workers: int = Field(
        64,
        ge=1,
        description="Threads serving gRPC requests: each open WatchSession holds one for its session, so "
        "allow about two per gate plus the Ingest calls.",
    )
    matching_addr: str = Field(
        f"127.0.0.1:{GRPC_PORTS['matching']}",
        description="GalleryService (matching) address: subject claims are checked there, portraits enrolled.",
    )
    gallery_timeout_s: float = Field(
        30.0, gt=0, description="Longest a gallery call may take (enrolling a portrait runs detection and embedding)."
    )
    session_budget_s: float = Field(
        10.0,
        gt=0,
        description="From a session's opening to its deadline, sent to decision with the opening (it refers the "
        "traveller to an officer when no outcome is reached by then; this overrides the policy's budget_seconds).",
    )
    session_grace_s: float = Field(
        3.0,
        ge=0,
        description="After a session's deadline, how long to wait for decision's outcome before telling the kiosk "
        "that it did not arrive in time (and referring the traveller).",
    )
    default_stop_lists: list[str] = Field(
        default_factory=list,
        description="Watchlists every traveller's face is searched against (JSON list). An OpenSession's stop_lists "
        "are added to them, never replace them; empty: every watchlist (a session's own lists then change nothing).",
    )
    database_url: SecretStr = Field(
        default_factory=lambda: SecretStr(paths.default_sqlite_url("capture-sessions.db")),
        description="The gate sessions store (open sessions and recently ended ones: claim ids, times, frame "
        "counters, outcomes; never an image): sqlite:///PATH (default <run dir>/capture-sessions.db) or "
        "postgresql://USER@HOST/DB. Replicas sharing it serve each other's sessions, and a restart resumes them; "
        "share it (PostgreSQL) for more than one replica.",
    )
    max_sessions: int = Field(
        10000,
        ge=1,
        description="Open sessions in the store, all replicas together; OpenSession is refused (RESOURCE_EXHAUSTED) "
        "beyond it.",
    )
    ended_session_retention_s: float = Field(
        60.0,
        ge=0,
        description="How long an ended session's outcome is kept in the store for a kiosk that starts watching late.",
    )
    shutdown_timeout_s: float = Field(
        10.0,
        gt=0,
        description="On a graceful stop, longest spent finishing the deletions of session-scoped templates already "
        "queued (those left are deleted by the next start-up's sweep). Open sessions are not cancelled: they stay in "
        "the store for another replica, or this one restarted.",
    )
    orphan_sweep_interval_s: float = Field(
        600.0,
        gt=0,
        description="How often session-scoped templates left behind (a replica stopped before it deleted one) are "
        "deleted; also done at start-up. Only those older than the budget plus the grace, and of no open session, "
        "are touched.",
    )

    # Backpressure (capture/backpressure.py, docs/cctv.md): CCTV frames are dropped, counted, rather than queued.
    backpressure_max_lag_frames: int = Field(
        500,
        ge=0,
        description="CCTV frames are dropped while the detection consumers lag more than this many frames "
        "on the frames topic (about the delay you accept times the frames per second of all cameras; committed "
        "offsets trail by up to a few seconds of frames); 0: never drop for lag. E-channel frames are never dropped.",
    )
    backpressure_refresh_s: float = Field(
        0.5,
        gt=0,
        description="How often the consumers' lag is measured while frames are captured (each frame reads "
        "the latest figure).",
    )
    publish_buffer_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes of frames handed to the Kafka producer and not yet "
        "acknowledged; a CCTV frame that finds no room is dropped, so a dead broker cannot grow memory.",
    )
    publish_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest a frame waits for the broker's metadata or for room in the producer's buffer: "
        "then a CCTV frame is dropped and an e-channel frame fails.",
    )

    @field_validator("allowed_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        relative = [str(root) for root in roots if not root.expanduser().is_absolute()]
        if relative:
            raise ValueError(f"allowed roots must be absolute paths: {relative}")
        return roots

    @field_validator("allowed_hosts")
    @classmethod
    def _valid_hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            parse_host_entry(host)  # raises ValueError naming the entry
        return hosts
