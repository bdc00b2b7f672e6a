"""Liveness (presentation attack detection) over a short sequence of frames of one tracked face.

No cleanly licensed PAD model exists in the package registries, so the built-in checks are measurable logic, each a
plain number with a threshold in :class:`LivenessSettings` (docs/liveness.md gives the measured distributions):

- ``motion``: the largest RMS displacement of the face's 9 points from the first frame, in inter-eye distances. A
  photo on a stand (or a perfectly still face) gives the landmark noise floor only (0.013 with sensor noise).
- ``texture_non_planarity`` (the check that stops prints and screens): each of a few chips, spread over the
  sequence, is aligned onto the first by one homography (OpenCV's ECC, on the face region of the aligned chips) and
  1 - the correlation reached is the misfit; the check takes the largest. A flat picture moves as a plane, so its
  texture is mapped by a homography up to noise (measured <= 0.0025); a head turning a few degrees moves its nose,
  cheeks and jaw against each other (8 degree turns: >= 0.005).
- ``non_planarity``: the same idea on the landmarks: the RMS residual of one least-squares homography (cv2,
  method 0, not RANSAC) from the first frame's 9 points to each later frame's, over the inter-eye distance, median
  over frames. It is computed and reported but does not gate by default: with our detector and shape predictor the
  points of a tilted print scatter as much (0.017-0.065) as those of a head turning 8 degrees (0.018-0.025), so no
  threshold separates them. It does flag sequences of different photos (0.034-0.128).

A fourth check comes from a model the operator supplies (``pad_model``): any ONNX model with the contract below; the
checker averages its per-frame live probability and requires ``pad_threshold``.

What these checks do not resist (curved prints, masks, replayed videos of a moving face, injected streams) is listed in
docs/liveness.md; they are one layer of an e-channel's defences, not the whole of PAD. They also need the traveller to
turn the head a little (a prompt at the gate): a live face held perfectly still is indistinguishable from a print.

PAD model contract (``pad_model``): one input named ``chips``, uint8, shape ``[N, 150, 150, 3]`` (N may be dynamic):
the pipeline's aligned RGB face chips (``AnalyzedFace.chip``, dlib alignment, padding 0.25), unnormalised, so the model
does its own normalisation in its graph; one output named ``live_probability``, float32, shape ``[N]``: the probability
in [0, 1] that each chip shows a live face.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, Field

from sightline.common.models.descriptor_spec import CHIP_SIZE
from sightline.common.models.onnx_session import open_session

log = logging.getLogger(__name__)

PAD_INPUT = "chips"
PAD_OUTPUT = "live_probability"


class LivenessSettings(BaseModel):
    """Thresholds of the liveness checks; the defaults come from the measurements in docs/liveness.md."""

    min_frames: int = Field(10, ge=3, description="Frames of the tracked face needed before liveness is decided.")
    min_quality: float = Field(
        40.0,
        ge=0,
        le=100,
        description="E-channel sessions: unified quality (0-100) a traveller's face needs to "
        "count towards the verdict. Keep it at most the decision policy's echannel.min_quality (the default equals "
        "it): then every verified frame inside the verdict's window is one the checks assessed.",
    )
    min_motion: float = Field(
        0.05,
        gt=0,
        description="Largest RMS displacement of the face's points from the first frame, in inter-eye "
        "distances, below which the face counts as still (a photo on a stand).",
    )
    min_non_planarity: float = Field(
        0.0,
        ge=0,
        description="Median over frames of the RMS residual of one homography fitted from the first "
        "frame's points, in inter-eye distances, below which the face moves as a flat picture. 0: reported only "
        "(measured: it overlaps between replays and real faces, see docs/liveness.md).",
    )
    min_texture_non_planarity: float = Field(
        0.004,
        ge=0,
        description="1 - the lowest correlation (ECC) reached when each sampled chip is aligned onto "
        "the first by one homography, on the face region; below it the face's texture moves as a flat picture. "
        "0 disables the check.",
    )
    texture_frames: int = Field(
        4,
        ge=1,
        description="Frames (evenly spaced after the first) on which the texture check runs: ~25 ms each. "
        "More frames also raise the attack tail, since the check takes the largest misfit (measured with 8: 0.0034).",
    )
    pad_model: Path | None = Field(
        None,
        description="Optional operator-supplied ONNX PAD model: input 'chips' uint8 [N,150,150,3] RGB aligned "
        "chips, output 'live_probability' float32 [N]. None: geometric checks only.",
    )
    pad_threshold: float = Field(
        0.5, ge=0, le=1, description="Mean live probability over the frames that the PAD model must reach."
    )
    pad_threads: int = Field(1, ge=1, description="onnxruntime threads of the PAD model's session.")


@dataclass
class LivenessObservation:
    """One frame of the tracked face, in pixels of that frame (fields as in ``AnalyzedFace``)."""

    landmarks: np.ndarray  # dlib's 5 points: image-right eye outer/inner corner, image-left eye outer/inner, nose base
    keypoints: np.ndarray  # BlazeFace's 6: right eye, left eye, nose tip, mouth, right ear tragion, left ear tragion
    box: np.ndarray  # x1, y1, x2, y2
    chip: np.ndarray | None = None  # 150x150x3 RGB uint8, needed only by the PAD model

    @classmethod
    def from_face(cls, face: Any, keep_chip: bool = True) -> LivenessObservation:
        """From an ``AnalyzedFace`` (or anything with the same fields)."""
        return cls(
            landmarks=np.asarray(face.landmarks, np.float64),
            keypoints=np.asarray(face.keypoints, np.float64),
            box=np.asarray(face.box, np.float64),
            chip=face.chip if keep_chip else None,
        )


@dataclass
class LivenessVerdict:
    """The decision, a 0-1 score (>= 0.5 exactly when every check passes), why it failed, and each check's value."""

    passed: bool
    score: float
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)


# -- geometry --------------------------------------------------------------------------------------------------------


def face_points(observation: LivenessObservation) -> np.ndarray:
    """The 9 distinct points used by the geometric checks, [9, 2] float64.

    dlib's 4 eye corners and nose base, then BlazeFace's nose tip, mouth and both ear tragions. BlazeFace's two eye
    points are left out: they sit at the middle of dlib's eye corners, so they would only duplicate (and overweight)
    the eyes in the fit. The nose tip stands in front of the eye plane and the tragions well behind it, which is what
    makes a turning head non-planar.
    """
    return np.concatenate([observation.landmarks[:5], observation.keypoints[2:6]]).astype(np.float64)


def inter_eye(points: np.ndarray) -> float:
    """Distance between the eye centres (each the middle of dlib's two corners), pixels."""
    return float(np.hypot(*(points[0:2].mean(axis=0) - points[2:4].mean(axis=0))))


def motion(points: Sequence[np.ndarray]) -> float:
    """Largest RMS displacement of the points from the first frame's, in the first frame's inter-eye distances."""
    first = points[0]
    scale = max(inter_eye(first), 1e-6)
    return max(float(np.sqrt(((p - first) ** 2).sum(axis=1).mean())) for p in points[1:]) / scale


def planar_residual(first: np.ndarray, later: np.ndarray) -> float:
    """RMS residual of the least-squares homography from ``first`` to ``later``, in ``later``'s inter-eye distances.

    Returns inf when no homography can be fitted (degenerate points), which reads as "not a plane".
    """
    homography, _ = cv2.findHomography(first, later, 0)  # method 0: plain least squares over every point
    if homography is None:
        return float("inf")
    projected = cv2.perspectiveTransform(first.reshape(-1, 1, 2), homography).reshape(-1, 2)
    rms = float(np.sqrt(((projected - later) ** 2).sum(axis=1).mean()))
    return rms / max(inter_eye(later), 1e-6)


def non_planarity(points: Sequence[np.ndarray]) -> float:
    """Median over the later frames of :func:`planar_residual` from the first frame."""
    return float(np.median([planar_residual(points[0], p) for p in points[1:]]))


# -- texture planarity ------------------------------------------------------------------------------------------------

# The face ellipse of the chip (as in quality.py: eyebrows to chin, cheek to cheek), cut to its bounding box so ECC
# works on 91x111 pixels instead of 150x150. Full resolution matters: on 75x75 chips the resampling differences of a
# tilted print alone reach 0.02 misfit, as much as a turning head (measured, docs/liveness.md).
_Y0, _Y1, _X0, _X1 = 30, 141, 30, 121
_rows, _cols = np.mgrid[_Y0:_Y1, _X0:_X1]
_FACE_MASK = ((((_cols - 75.0) / 45.0) ** 2 + ((_rows - 85.0) / 55.0) ** 2) <= 1).astype(np.uint8)
_ECC_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-5)
_BOX_CORNERS = np.array([[0, 0], [_X1 - _X0, 0], [_X1 - _X0, _Y1 - _Y0], [0, _Y1 - _Y0]], np.float32).reshape(-1, 1, 2)
# The chips are aligned on the landmarks, so the true residual warp is small: measured up to 18 px of corner motion
# for steeply tilted prints and 4 px for turning heads. ECC once converged on a wrong warp moving them 69 px.
_MAX_CORNER_SHIFT = 30.0


def _grey(chip: np.ndarray) -> np.ndarray:
    """The face box of the chip in grey levels, smoothed (sigma 1 px) so sensor noise and JPEG blocks do not count."""
    grey = cv2.cvtColor(np.ascontiguousarray(chip, dtype=np.uint8), cv2.COLOR_RGB2GRAY)[_Y0:_Y1, _X0:_X1]
    return cv2.GaussianBlur(grey.astype(np.float32), (0, 0), 1.0)


def texture_misfit(first_chip: np.ndarray, later_chip: np.ndarray) -> float | None:
    """1 - the correlation reached when ``later_chip`` is aligned onto ``first_chip`` by one homography (ECC).

    The chips are already aligned by a similarity of the landmarks, so the search starts at the identity. ECC's
    correlation is zero-mean and normalised, so a print getting brighter or darker as it tilts costs nothing. A flat
    picture's texture is mapped by a homography up to resampling and noise; a turning head moves its nose, cheeks
    and jaw line against each other. None when ECC does not converge: a failed alignment is no evidence of depth
    (motion blur alone could cause it), so it is left out rather than counted as non-planar; so is a warp that
    moves the face box's corners more than ``_MAX_CORNER_SHIFT`` pixels (ECC settled on a wrong alignment).
    """
    try:
        correlation, warp = cv2.findTransformECC(
            _grey(first_chip),
            _grey(later_chip),
            np.eye(3, dtype=np.float32),
            cv2.MOTION_HOMOGRAPHY,
            _ECC_CRITERIA,
            _FACE_MASK,
            1,
        )
    except cv2.error:
        return None
    if np.abs(cv2.perspectiveTransform(_BOX_CORNERS, warp) - _BOX_CORNERS).max() > _MAX_CORNER_SHIFT:
        return None  # converged on a wrong warp
    return float(1.0 - correlation)


def texture_non_planarity(chips: Sequence[np.ndarray], frames: int = 4) -> float:
    """Largest :func:`texture_misfit` from the first chip to ``frames`` later chips spread evenly over the sequence.

    The largest, not the median: a replayed picture stays planar in every frame, while a real head may be turned
    away from its first pose in only part of the frames. 0 when no alignment converged (no evidence of depth).
    """
    later = np.unique(np.linspace(1, len(chips) - 1, num=min(frames, len(chips) - 1)).round().astype(int))
    misfits = [m for m in (texture_misfit(chips[0], chips[i]) for i in later) if m is not None]
    return max(misfits, default=0.0)


# -- the operator's PAD model ----------------------------------------------------------------------------------------


class PadModelError(ValueError):
    """The operator's PAD model does not follow the documented contract."""


def _check_dims(dims: Sequence[object], expected: Sequence[int], what: str, path: Path) -> None:
    """Fixed dimensions must equal ``expected`` (the batch dimension, and any symbolic one, is free)."""
    if len(dims) != len(expected) or any(
        isinstance(d, int) and d != e for d, e in zip(dims[1:], expected[1:], strict=True)
    ):
        shape = "[N" + "".join(f",{e}" for e in expected[1:]) + "]"
        raise PadModelError(f"PAD model {path}: {what} has shape {list(dims)}, expected {shape}")


class PadModel:
    """An operator-supplied ONNX PAD model, checked against the contract when it is loaded."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.session = open_session(self.path, threads=threads, what="PAD model")
        self._validate()

    def _validate(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [PAD_INPUT]:
            raise PadModelError(f"PAD model {self.path}: inputs {[i.name for i in inputs]}, expected ['{PAD_INPUT}']")
        if PAD_OUTPUT not in [o.name for o in outputs]:
            raise PadModelError(f"PAD model {self.path}: outputs {[o.name for o in outputs]} lack '{PAD_OUTPUT}'")
        if inputs[0].type != "tensor(uint8)":
            raise PadModelError(f"PAD model {self.path}: input '{PAD_INPUT}' is {inputs[0].type}, expected uint8")
        _check_dims(inputs[0].shape, (0, CHIP_SIZE, CHIP_SIZE, 3), f"input '{PAD_INPUT}'", self.path)
        output = next(o for o in outputs if o.name == PAD_OUTPUT)
        if output.type != "tensor(float)":
            raise PadModelError(f"PAD model {self.path}: output '{PAD_OUTPUT}' is {output.type}, expected float32")
        _check_dims(output.shape, (0,), f"output '{PAD_OUTPUT}'", self.path)

    def live_probability(self, chips: np.ndarray) -> np.ndarray:
        """Per-chip live probability, [N] float32, from chips [N,150,150,3] uint8 RGB."""
        (result,) = self.session.run([PAD_OUTPUT], {PAD_INPUT: np.ascontiguousarray(chips, dtype=np.uint8)})
        return np.asarray(result, np.float32).reshape(-1)


# -- the checker -----------------------------------------------------------------------------------------------------


def _check_score(value: float, threshold: float) -> float:
    """0-1, 0.5 at the threshold, rising towards 1 as the value exceeds it: value / (value + threshold)."""
    if not np.isfinite(value):
        return 1.0
    return max(value, 0.0) / (max(value, 0.0) + threshold)


def _probability_score(p: float, threshold: float) -> float:
    """Piecewise linear 0-1 map of a probability, 0.5 at the threshold (so it combines with the geometric scores)."""
    if p >= threshold:
        return 0.5 + 0.5 * (p - threshold) / max(1.0 - threshold, 1e-9)
    return 0.5 * p / max(threshold, 1e-9)


_MEANING = {
    "motion": "the face does not move (still photo?)",
    "non_planarity": "the face's points move as a flat picture (print or screen?)",
    "texture_non_planarity": "the face's texture moves as a flat picture (print or screen?)",
}


class LivenessChecker:
    """Decides liveness from the observations of one tracked face; loads the PAD model once if one is configured."""

    def __init__(self, settings: LivenessSettings | None = None) -> None:
        self.settings = settings or LivenessSettings()
        self.pad = PadModel(self.settings.pad_model, self.settings.pad_threads) if self.settings.pad_model else None

    def assess(self, observations: Sequence[LivenessObservation]) -> LivenessVerdict:
        """The verdict on a sequence of frames of one face (in time order, the same face in every frame)."""
        s = self.settings
        if len(observations) < s.min_frames:
            return LivenessVerdict(False, 0.0, [f"need {s.min_frames} frames, have {len(observations)}"], {})
        points = [face_points(o) for o in observations]
        checks = {"motion": motion(points), "non_planarity": non_planarity(points)}
        thresholds = {"motion": s.min_motion, "non_planarity": s.min_non_planarity}
        chips = [o.chip for o in observations if o.chip is not None]
        if s.min_texture_non_planarity > 0:
            # Without chips the texture check cannot run; failing it (rather than skipping) keeps a caller that
            # forgot the chips from silently weakening liveness.
            checks["texture_non_planarity"] = texture_non_planarity(chips, s.texture_frames) if len(chips) >= 2 else 0.0
            thresholds["texture_non_planarity"] = s.min_texture_non_planarity
        scores, reasons = {}, []
        for name, threshold in thresholds.items():
            if threshold <= 0:
                continue  # reported only
            scores[name] = _check_score(checks[name], threshold)
            if checks[name] < threshold:
                reasons.append(f"{name} {checks[name]:.4f} < {threshold:.4f}: {_MEANING[name]}")
        if self.pad is not None:
            self._run_pad(observations, checks, scores, reasons)
        score = min(scores.values()) if scores else 1.0
        return LivenessVerdict(passed=not reasons, score=round(float(score), 4), reasons=reasons, checks=checks)

    def _run_pad(
        self,
        observations: Sequence[LivenessObservation],
        checks: dict[str, float],
        scores: dict[str, float],
        reasons: list[str],
    ) -> None:
        """Adds the PAD model's mean live probability (frames without a chip are skipped; none at all fails)."""
        assert self.pad is not None
        chips = [o.chip for o in observations if o.chip is not None]
        if not chips:
            checks["pad"], scores["pad"] = 0.0, 0.0
            reasons.append(f"PAD model {self.pad.name}: no face chips in the observations")
            return
        probability = float(self.pad.live_probability(np.stack(chips)).mean())
        checks["pad"], scores["pad"] = probability, _probability_score(probability, self.settings.pad_threshold)
        if probability < self.settings.pad_threshold:
            reasons.append(
                f"PAD model {self.pad.name}: live probability {probability:.4f} < {self.settings.pad_threshold:.4f}"
            )
