"""The enrolment quality gate: which of an image's face-quality components fall short of the configured limits.

An enrolment image is the reference every later comparison is made against, so it is held to stricter limits than
a camera frame (the limits are ``SIGHTLINE_MATCHING_ENROLL_*``; docs/quality.md explains each component).
"""

from __future__ import annotations

from sightline.matching.settings import MatchingSettings
from sightline.v1 import types_pb2


def quality_failures(quality: types_pb2.FaceQuality, settings: MatchingSettings) -> list[str]:
    """One "name value < limit" entry per failing component, in a fixed order; empty when the image passes."""
    failures = []
    # (component, measured value, limit, True when the value must be at least the limit, digits to print)
    checks = (
        ("quality score", quality.score, settings.enroll_min_quality, True, 0),
        ("inter_eye_px", quality.inter_eye_px, settings.enroll_min_inter_eye_px, True, 0),
        ("|yaw|", abs(quality.yaw), settings.enroll_max_abs_yaw, False, 0),
        ("|pitch|", abs(quality.pitch), settings.enroll_max_abs_pitch, False, 0),
        ("sharpness", quality.sharpness, settings.enroll_min_sharpness, True, 1),
        ("brightness", quality.brightness, settings.enroll_min_brightness, True, 0),
        ("brightness", quality.brightness, settings.enroll_max_brightness, False, 0),
        ("in_frame", quality.in_frame, settings.enroll_min_in_frame, True, 2),
    )
    for name, value, limit, at_least, digits in checks:
        if at_least and value < limit:
            failures.append(f"{name} {value:.{digits}f} < {limit:g}")
        elif not at_least and value > limit:
            failures.append(f"{name} {value:.{digits}f} > {limit:g}")
    return failures


def rejection_reason(failures: list[str]) -> str:
    return "quality too low: " + "; ".join(failures)
