"""Basic face quality figures, measured on every detected face and carried on the face events.

Each component is a plain measurement a person can check (docs/quality.md says how each is computed):
inter-eye distance in pixels, head pose from landmarks, sharpness, exposure and contrast of the aligned chip,
detector confidence and how much of the face lies inside the frame. The unified 0-100 score is a weighted geometric
mean of the components mapped to 0-1, so any one very poor component pulls the score down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Quality:
    inter_eye_px: float
    yaw: float
    pitch: float
    roll: float
    sharpness: float
    brightness: float
    contrast: float
    detector_score: float
    in_frame: float
    score: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in vars(self).items()}


def eye_centres(landmarks5: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The subject's right and left eye centres from dlib's 5 points (two corners per eye, then the nose base)."""
    return landmarks5[0:2].mean(axis=0), landmarks5[2:4].mean(axis=0)


def head_pose(landmarks5: np.ndarray, keypoints6: np.ndarray) -> tuple[float, float, float]:
    """Yaw, pitch and roll in degrees, estimated from the landmarks (a geometric approximation, not a 3D fit).

    Roll is the angle of the eye line. Yaw compares the horizontal distances from the nose tip to the two ear tragions
    (equal when facing the camera). Pitch compares the nose tip's height between the eye line and the mouth with the
    ratio of a frontal face.
    """
    right_eye, left_eye = eye_centres(landmarks5)
    dx, dy = left_eye - right_eye
    roll = math.degrees(math.atan2(dy, dx))
    nose, mouth = keypoints6[2], keypoints6[3]
    right_ear, left_ear = keypoints6[4], keypoints6[5]
    to_right, to_left = abs(nose[0] - right_ear[0]), abs(left_ear[0] - nose[0])
    yaw = math.degrees(math.asin(float(np.clip((to_right - to_left) / max(to_right + to_left, 1e-6), -1.0, 1.0))))
    eye_mid = (right_eye + left_eye) / 2
    span = float(np.linalg.norm(mouth - eye_mid)) or 1e-6
    ratio = float(np.dot(nose - eye_mid, (mouth - eye_mid) / span)) / span
    pitch = (ratio - 0.55) * 120.0  # 0.55 is a frontal face's nose position between eyes and mouth
    return yaw, pitch, roll


def chip_measures(chip_rgb: np.ndarray) -> tuple[float, float, float]:
    """Sharpness (variance of the Laplacian), brightness (mean grey) and contrast (grey std) of the chip's centre.

    Only the centre is measured: the chip's border holds background and hair, which say nothing about the face.
    """
    grey = cv2.cvtColor(chip_rgb, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    centre = grey[h // 5 : h - h // 5, w // 5 : w - w // 5]
    sharpness = float(cv2.Laplacian(centre, cv2.CV_64F).var())
    return sharpness, float(centre.mean()), float(centre.std())


def in_frame_fraction(box: np.ndarray, width: int, height: int) -> float:
    x1, y1, x2, y2 = (float(v) for v in box)
    area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    if area <= 0:
        return 0.0
    inside = max(min(x2, width) - max(x1, 0.0), 0.0) * max(min(y2, height) - max(y1, 0.0), 0.0)
    return inside / area


def unified_score(components: dict[str, float]) -> float:
    """0-100: weighted geometric mean of the components mapped to [0.01, 1]."""
    mapped = {
        "inter_eye_px": _ramp(components["inter_eye_px"], 15.0, 60.0),
        "pose": _ramp(45.0 - max(abs(components["yaw"]), abs(components["pitch"])), 0.0, 30.0),
        "sharpness": _ramp(math.log10(max(components["sharpness"], 1.0)), 1.0, 2.5),
        "exposure": _ramp(110.0 - abs(components["brightness"] - 128.0), 0.0, 70.0),
        "contrast": _ramp(components["contrast"], 10.0, 40.0),
        "detector_score": _ramp(components["detector_score"], 0.5, 0.9),
        "in_frame": _ramp(components["in_frame"], 0.6, 1.0),
    }
    weights = {"inter_eye_px": 2.0, "pose": 1.5, "sharpness": 1.5, "exposure": 1.0, "contrast": 1.0,
               "detector_score": 1.0, "in_frame": 1.0}  # fmt: skip
    total = sum(weights.values())
    log_mean = sum(weights[k] * math.log(max(v, 0.01)) for k, v in mapped.items()) / total
    return 100.0 * math.exp(log_mean)


def _ramp(value: float, low: float, high: float) -> float:
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


def measure(
    box: np.ndarray, score: float, landmarks5: np.ndarray, keypoints6: np.ndarray, chip: np.ndarray, size: tuple[int, int]
) -> Quality:
    """All quality components of one face in an image of ``size`` (width, height)."""
    right_eye, left_eye = eye_centres(landmarks5)
    yaw, pitch, roll = head_pose(landmarks5, keypoints6)
    sharpness, brightness, contrast = chip_measures(chip)
    components = {
        "inter_eye_px": float(np.linalg.norm(left_eye - right_eye)),
        "yaw": yaw, "pitch": pitch, "roll": roll,
        "sharpness": sharpness, "brightness": brightness, "contrast": contrast,
        "detector_score": float(score),
        "in_frame": in_frame_fraction(box, *size),
    }  # fmt: skip
    return Quality(**components, score=unified_score(components))
