"""Settings of the matching service (``SIGHTLINE_MATCHING_*``)."""

from __future__ import annotations

from pathlib import Path
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
        0.5,
        gt=0,
        description="How often the search index reads the gallery's change log for changes made by other replicas "
        "(enrolments, deletions, erasures, memberships): they reach this replica's searches within about this long.",
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
    exact_below: int = Field(
        20_000,
        ge=0,
        description="Below this many searchable templates every search is exact; from it on an IVF index shortlists "
        "and the shortlist is re-ranked exactly (docs/benchmarks.md, 'Search').",
    )
    snapshots: bool = Field(
        True,
        description="Keep encrypted index snapshots: a replica starts from the newest one plus the change log since, "
        "instead of decrypting the whole gallery.",
    )
    snapshot_dir: Path | None = Field(
        None,
        description="Where snapshots are kept, in a folder per gallery database. Unset: beside a SQLite gallery "
        "(<its folder>/gallery-snapshots), else <run dir>/gallery-snapshots. In Kubernetes, a volume of the pod.",
    )
    snapshot_interval_s: float = Field(
        300.0,
        gt=0,
        description="A new snapshot is written this long after the gallery last changed since the previous one; "
        "after a deletion or erasure within snapshot_after_removal_s, and older snapshots are then deleted.",
    )
    snapshot_after_removal_s: float = Field(
        30.0,
        gt=0,
        description="How soon after a deletion or erasure a fresh snapshot replaces the ones that still hold the "
        "removed templates (encrypted): the longest an erased template outlives its erasure on disk.",
    )
    change_log_days: float = Field(
        7.0,
        gt=0,
        description="The gallery's change log keeps this many days (pruned after each snapshot); a replica whose "
        "snapshot is older than that loads the whole gallery instead.",
    )
    shards: int = Field(
        1,
        ge=1,
        le=64,
        description="How many shards the gallery is split into by subject (a stable hash of the subject id); every "
        "search is sent to every shard and the results merged before any threshold applies.",
    )
    shard: int = Field(0, ge=0, description="The shard this replica holds, 0 to shards - 1.")
    shard_addresses: list[str] = Field(
        default_factory=list,
        description='gRPC addresses of the shards in shard order (a JSON list, e.g. \'["matching-0:50054", '
        "\"matching-1:50054\"]'), this replica's own entry included; required when shards > 1.",
    )
    max_enroll_images: int = Field(20, ge=1, description="Most images accepted by one Enroll call.")
    stream_audit_interval_s: float = Field(
        60.0,
        gt=0,
        description="Stream searches are audited in aggregate: one STREAM_SEARCH record per source per "
        "this many seconds (and one at shutdown).",
    )
    # The audit outbox (audit_outbox.py): a write's audit records commit with it in the gallery database.
    audit_outbox_wait_s: float = Field(
        5.0,
        ge=0,
        description="How long a gallery write call (enrol, delete, erase, watchlist change) waits for its audit "
        "records to reach the audit log; none while the audit log cannot be written: the call succeeds, its records "
        "wait in the gallery's audit outbox.",
    )
    audit_outbox_poll_s: float = Field(
        1.0,
        gt=0,
        description="How often the audit outbox relay looks for records left by another replica or a crash (it also "
        "runs after every write, and at start).",
    )
    audit_outbox_retry_max_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait between the relay's attempts while the audit log cannot be written (from 0.1 s, "
        "doubling).",
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

    def snapshot_root(self) -> Path:
        """``snapshot_dir``, or its default for the configured database."""
        if self.snapshot_dir is not None:
            return self.snapshot_dir
        url = self.database_url.get_secret_value()
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            return Path(url.removeprefix("sqlite:///")).expanduser().resolve().parent / "gallery-snapshots"
        return paths.run_dir() / "gallery-snapshots"

    @model_validator(mode="after")
    def _shards_addressed(self) -> MatchingSettings:
        if self.shard >= self.shards:
            raise ValueError(f"shard {self.shard} is not one of the {self.shards} shards (0 to {self.shards - 1})")
        if self.shards > 1 and len(self.shard_addresses) != self.shards:
            raise ValueError(
                f"shards is {self.shards}: shard_addresses must list {self.shards} addresses, "
                f"got {len(self.shard_addresses)}"
            )
        return self

    @model_validator(mode="after")
    def _threshold_from_target_fmr(self) -> MatchingSettings:
        if self.match_target_fmr is not None:  # bypasses validate_assignment: the value was just derived and checked
            object.__setattr__(self, "match_max_distance", distance_for_fmr(self.match_target_fmr))
        return self
