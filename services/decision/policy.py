"""The decision policy: thresholds, how many frames must agree, what becomes an alert.

Read from a YAML file (``SIGHTLINE_DECISION_POLICY_FILE``; the Helm chart mounts it from a ConfigMap) and validated
at start-up. Its ``version`` is stamped on every decision, so an outcome can always be traced to the rules that made
it. ``examples/policy.yaml`` documents every field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from sightline.common.config import parse_yaml
from sightline.common.scores import DEFAULT_MAX_DISTANCE, distance_for_fmr, format_fmr
from sightline.v1 import types_pb2


class EChannelPolicy(BaseModel):
    """The rules of a gate session (the ``echannel`` block of the decision policy; echannel/engine.py applies them).

    A stop-list candidate on the traveller's face is a hit within the same threshold as on a CCTV frame
    (``Policy.threshold_for``: the list's own in the gallery, else ``watchlist_target_fmr``, else the global one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget_seconds: float = Field(5.0, gt=0, description="From the session's opening to REFER_TO_OFFICER by time-out.")
    min_verified_frames: int = Field(
        2,
        ge=1,
        description="Good frames verified against the claim needed to accept, among the frames the liveness "
        "verdict was assessed on (keep it at most detection's liveness min_frames).",
    )
    min_quality: float = Field(
        40.0,
        ge=0,
        le=100,
        description="Unified quality a frame's face needs to count (keep detection's liveness "
        "min_quality at most this, so every frame counted here was one the liveness verdict assessed).",
    )
    max_low_quality_frames: int = Field(
        12, ge=1, description="Frames whose face is under the minimum quality before referring (repeated low quality)."
    )
    max_mismatch_frames: int = Field(
        2, ge=1, description="Good frames that fail verification against the claim before referring (mismatch)."
    )
    require_liveness: bool = Field(
        True,
        description="ACCEPT only with a passing liveness verdict (from detection's multi-frame checks), on "
        "verified frames inside the window of frames that verdict was assessed on.",
    )
    close_grace_seconds: float = Field(
        1.0,
        ge=0,
        description="After the kiosk closes a session without saying how many frames it sent, how long "
        "to wait for the results of frames still in the pipeline before deciding with what has arrived. A close "
        "that gives the count is decided when all have arrived, or at the session's deadline.",
    )
    max_deadline_seconds: float = Field(
        600.0,
        gt=0,
        description="An OPENED event whose deadline is further than this after its opening is refused as "
        "malformed (dead-lettered): a session that could stay open for days would hold the session timer's memory. "
        "At least budget_seconds; keep it above capture's SIGHTLINE_CAPTURE_SESSION_BUDGET_S, whose deadline wins.",
    )

    @model_validator(mode="after")
    def _deadline_bound_covers_the_budget(self) -> EChannelPolicy:
        if self.max_deadline_seconds < self.budget_seconds:
            raise ValueError(
                f"echannel.max_deadline_seconds ({self.max_deadline_seconds:g}) must be at least "
                f"budget_seconds ({self.budget_seconds:g})"
            )
        return self


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field("default-1", min_length=1, description="Stamped on every decision and alert.")
    match_max_distance: float = Field(
        DEFAULT_MAX_DISTANCE, gt=0, le=2, description="A candidate or claim at or under this distance is a hit."
    )
    match_target_fmr: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="The threshold as a target false match rate (e.g. 0.001), converted to a "
        "distance with the model's calibration table (docs/accuracy.md); overrides match_max_distance when set.",
    )
    watchlist_target_fmr: dict[str, float] = Field(
        default_factory=dict,
        description="Per-watchlist thresholds as target false match rates, e.g. "
        "{stop-list: 0.0001, vip: 0.01}; a candidate on such a list is a hit within that list's threshold.",
    )
    min_agreeing_frames: int = Field(
        2,
        ge=1,
        description="Frames of one source that must agree on a subject before the outcome is MATCH; for "
        "tracked CCTV faces, the searched faces of one track (keep detection's always-searched count at least this).",
    )
    window_seconds: float = Field(10.0, gt=0, description="The agreeing frames must fall within this span.")
    min_quality: float = Field(
        0.0, ge=0, le=100, description="Faces under this unified quality score get LOW_QUALITY, no identity decision."
    )
    alert_watchlists: tuple[str, ...] = Field(
        ("*",), description='A MATCH on a subject of these watchlists raises an alert; "*" means any watchlist.'
    )
    alert_cooldown_seconds: float = Field(
        60.0,
        ge=0,
        description="Further MATCHes of the same subject on the same source within this span raise no alert.",
    )
    echannel: EChannelPolicy = Field(
        default_factory=EChannelPolicy, description="The rules of e-channel (gate) sessions: see EChannelPolicy."
    )

    _watchlist_distances: dict[str, float] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _threshold_from_target_fmr(self) -> Policy:
        if self.match_target_fmr is not None:  # the model is frozen: set the derived threshold once, here
            object.__setattr__(self, "match_max_distance", distance_for_fmr(self.match_target_fmr))
        for name, target in self.watchlist_target_fmr.items():
            if not 0 < target < 1:
                raise ValueError(f"watchlist_target_fmr[{name!r}] must be in (0, 1), got {target}")
            self._watchlist_distances[name] = distance_for_fmr(target)
        return self

    def threshold_for(
        self, watchlists: list[str], gallery_thresholds: Mapping[str, float] | None = None
    ) -> tuple[float, str]:
        """The distance threshold for a candidate on these watchlists, and how reasons quote it.

        Per list, in order of precedence: the list's own threshold set in the gallery (``gallery_thresholds``, from
        ``MatchCandidate.watchlist_thresholds``: the list's target FMR, converted by matching); else this policy's
        ``watchlist_target_fmr`` for the list (the operator's fallback for lists the gallery sets none for). A subject
        on several lists with a threshold is a hit when it is within any of them (each list's promise holds for that
        list). A subject on no list with a threshold uses the global threshold.
        """
        gallery = gallery_thresholds or {}
        own = []
        for name in watchlists:
            if name in gallery:
                own.append((gallery[name], name, f"watchlist {name}: the gallery's threshold"))
            elif name in self._watchlist_distances:
                target = format_fmr(self.watchlist_target_fmr[name])
                own.append((self._watchlist_distances[name], name, f"watchlist {name}: target FMR {target}"))
        if not own:
            return self.match_max_distance, self.describe_threshold()
        distance, _, source = max(own)
        return distance, f"{distance:.3f} ({source})"

    def verifies(self, verification: types_pb2.Verification) -> bool:
        """Whether a 1:1 verification against a claim passes this policy's threshold (``match_max_distance``, or
        ``match_target_fmr`` converted). Matching's own ``verified`` flag follows matching's threshold, not this
        policy's, so it is never read: tightening the policy must tighten every claim, gates' included."""
        return verification.subject_found and verification.distance <= self.match_max_distance

    def describe_threshold(self) -> str:
        """The threshold as reasons quote it: the distance, and the target FMR it came from when there is one."""
        text = f"{self.match_max_distance:.3f}"
        if self.match_target_fmr is not None:
            text += f" (target FMR {format_fmr(self.match_target_fmr)})"
        return text

    def alerts_on(self, watchlists: list[str]) -> list[str]:
        """The subject's watchlists that call for an alert."""
        if "*" in self.alert_watchlists:
            return list(watchlists)
        return [w for w in watchlists if w in self.alert_watchlists]


def load_policy(path: Path | None) -> Policy:
    """The policy in the YAML file, or the defaults when no file is configured."""
    if path is None:
        return Policy()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"policy file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"policy file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"policy file {path} is not UTF-8 text") from None
    return Policy.model_validate(parse_yaml(text, f"policy file {path}") or {})
