"""What a comparison score means: descriptor distance, the similarity users see, and the false match rate.

The descriptor network is dlib's ResNet, whose published same-person rule is Euclidean distance < 0.6. Similarity is
a linear rescaling of distance to [0, 1] that puts that rule at 0.5; it is monotonic, so thresholds may be given in
either unit.

The false match rate (FMR) at a distance is the share of impostor pairs (two different people) at or under it. It
comes from a calibration table shipped with the model (``models/calibration_dlib_resnet_v1.json``; how it was made is
in its ``provenance`` and in docs/accuracy.md). ``SIGHTLINE_CALIBRATION_FILE`` points to another table, e.g. one
made from your own data with ``sightline calibrate``. Between rows the FMR is interpolated linearly in log(FMR);
outside the table it is clamped to the first or last row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common.config import SightlineSettings

DEFAULT_MAX_DISTANCE = 0.6
_DISTANCE_AT_ZERO_SIMILARITY = 2 * DEFAULT_MAX_DISTANCE
CALIBRATION_FILE = Path(__file__).parent / "models" / "calibration_dlib_resnet_v1.json"


def similarity(distance: float) -> float:
    """1.0 for identical descriptors, 0.5 at dlib's threshold, 0.0 at twice that distance or more."""
    return max(0.0, min(1.0, 1.0 - distance / _DISTANCE_AT_ZERO_SIMILARITY))


def distance_for_similarity(value: float) -> float:
    return (1.0 - value) * _DISTANCE_AT_ZERO_SIMILARITY


class CalibrationError(ValueError):
    """A calibration table that cannot be read, or a target it cannot answer."""


@dataclass(frozen=True)
class CalibrationTable:
    """Distance thresholds (ascending) with the FMR at each; ``modelled`` marks rows from the fitted tail model."""

    distances: tuple[float, ...]
    fmrs: tuple[float, ...]
    modelled: tuple[bool, ...]
    provenance: dict[str, Any]
    path: Path

    @classmethod
    def load(cls, path: Path) -> CalibrationTable:
        try:
            document = json.loads(Path(path).read_text())
            rows = sorted(document["rows"], key=lambda r: float(r["distance"]))
            table = cls(
                tuple(float(r["distance"]) for r in rows),
                tuple(float(r["fmr"]) for r in rows),
                tuple(r.get("source") == "model" for r in rows),
                dict(document.get("provenance", {})),
                Path(path),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CalibrationError(f"calibration table {path} cannot be read: {exc}") from None
        if len(rows) < 2 or any(not 0 < f <= 1 for f in table.fmrs) or list(table.fmrs) != sorted(table.fmrs):
            raise CalibrationError(f"calibration table {path}: needs >= 2 rows with FMR in (0, 1], non-decreasing")
        return table

    def fmr(self, distance: float) -> float:
        """FMR at a distance threshold: log-linear between rows, clamped to the table's range."""
        d, f = self.distances, self.fmrs
        if distance <= d[0]:
            return f[0]
        if distance >= d[-1]:
            return f[-1]
        i = next(k for k in range(1, len(d)) if d[k] >= distance)
        t = (distance - d[i - 1]) / (d[i] - d[i - 1])
        return math.exp(math.log(f[i - 1]) + t * (math.log(f[i]) - math.log(f[i - 1])))

    def is_modelled(self, distance: float) -> bool:
        """True when the FMR at this distance is an extrapolation of the tail model, not a measurement."""
        d = self.distances
        if distance <= d[0] or distance >= d[-1]:
            return self.modelled[0 if distance <= d[0] else -1]
        i = next(k for k in range(1, len(d)) if d[k] >= distance)
        return self.modelled[i] if d[i] == distance else self.modelled[i - 1]

    def distance_for_fmr(self, target: float) -> float:
        """The largest distance threshold whose FMR does not exceed ``target`` (interpolated like ``fmr``)."""
        d, f = self.distances, self.fmrs
        if not 0 < target < 1:
            raise CalibrationError(f"target FMR must be in (0, 1), got {target:g}")
        if target < f[0]:
            raise CalibrationError(
                f"target FMR {target:g} is below the calibration table's range (lowest "
                f"{f[0]:.3g} at distance {d[0]:.2f}; table {self.path.name})"
            )
        if target >= f[-1]:
            return d[-1]
        i = next(k for k in range(1, len(f)) if f[k] > target)
        if f[i - 1] == f[i]:
            return d[i - 1]
        t = (math.log(target) - math.log(f[i - 1])) / (math.log(f[i]) - math.log(f[i - 1]))
        return d[i - 1] + t * (d[i] - d[i - 1])


@lru_cache(maxsize=8)
def _load(path: str) -> CalibrationTable:
    return CalibrationTable.load(Path(path))


class ScoreSettings(SightlineSettings):
    """Which calibration table turns distances into false match rates (``SIGHTLINE_CALIBRATION_FILE``)."""

    config_section: ClassVar[str] = "scores"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_", extra="ignore")

    calibration_file: Path | None = Field(
        None, description="Calibration table (from `sightline calibrate`); unset: the table shipped with the model."
    )


@lru_cache(maxsize=1)
def _configured_file() -> Path:
    # Read once per process: this sits on the per-face path (every candidate's FMR).
    return ScoreSettings().calibration_file or CALIBRATION_FILE


def calibration(path: Path | None = None) -> CalibrationTable:
    """The table at ``path``, else the configured one, else the shipped one (cached)."""
    return _load(str(path or _configured_file()))


def fmr(distance: float) -> float:
    """False match rate at a distance threshold, from the calibration table."""
    return calibration().fmr(distance)


def fmr_is_extrapolated(distance: float) -> bool:
    return calibration().is_modelled(distance)


def distance_for_fmr(target: float) -> float:
    """The distance threshold that gives the target false match rate, e.g. ``distance_for_fmr(1e-3)``."""
    return calibration().distance_for_fmr(target)


def format_fmr(value: float) -> str:
    """A rate as people read it: "1e-03" style for small values, "2.0%" for large ones."""
    return f"{value:.1%}" if value >= 0.01 else f"{value:.1e}"
