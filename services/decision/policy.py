"""The decision policy: thresholds, how many frames must agree, what becomes an alert.

Read from a YAML file (``SIGHTLINE_DECISION_POLICY_FILE``; the Helm chart mounts it from a ConfigMap) and validated
at start-up. Its ``version`` is stamped on every decision, so an outcome can always be traced to the rules that made
it. ``examples/policy.yaml`` documents every field.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sightline.common.scores import DEFAULT_MAX_DISTANCE, distance_for_fmr, format_fmr


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field("default-1", min_length=1, description="Stamped on every decision and alert.")
    match_max_distance: float = Field(
        DEFAULT_MAX_DISTANCE, gt=0, le=2, description="A candidate or claim at or under this distance is a hit."
    )
    match_target_fmr: float | None = Field(
        None, gt=0, lt=1, description="The threshold as a target false match rate (e.g. 0.001), converted to a "
        "distance with the model's calibration table (docs/accuracy.md); overrides match_max_distance when set.",
    )
    min_agreeing_frames: int = Field(
        2, ge=1, description="Frames of one source that must agree on a subject before the outcome is MATCH."
    )
    window_seconds: float = Field(10.0, gt=0, description="The agreeing frames must fall within this span.")
    min_quality: float = Field(
        0.0, ge=0, le=100, description="Faces under this unified quality score get LOW_QUALITY, no identity decision."
    )
    alert_watchlists: tuple[str, ...] = Field(
        ("*",), description='A MATCH on a subject of these watchlists raises an alert; "*" means any watchlist.'
    )
    alert_cooldown_seconds: float = Field(
        60.0, ge=0, description="Further MATCHes of the same subject on the same source within this span raise no alert."
    )

    @model_validator(mode="after")
    def _threshold_from_target_fmr(self) -> Policy:
        if self.match_target_fmr is not None:  # the model is frozen: set the derived threshold once, here
            object.__setattr__(self, "match_max_distance", distance_for_fmr(self.match_target_fmr))
        return self

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
        document = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"policy file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"policy file {path} is not valid YAML: {exc}") from None
    return Policy.model_validate(document or {})
