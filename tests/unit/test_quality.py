"""Face quality on real photos and deliberately degraded copies of them, with the real detector and landmarks.

Each degradation grows in four steps (the first is the untouched photo); the component it targets must move the right
way and the unified score must fall (ties at saturation and rises within ``SCORE_TOLERANCE`` are allowed, since
landmarks shift a little between copies). A level where the face is no longer found ends that sequence.

``python tests/unit/test_quality.py`` prints the degradation table of docs/quality.md.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest

from sightline.common import paths
from sightline.common.images import decode_image
from sightline.common.models.pipeline import AnalyzedFace, FaceAnalyzer
from sightline.common.models.quality import Quality
from sightline.common.models.registry import model_files
from sightline.matching.enrolment import quality_failures
from sightline.matching.settings import MatchingSettings
from sightline.v1 import types_pb2

SCORE_TOLERANCE = 3.0  # points of the 0-100 score
# Frontal photos: the "johns" (passport-like portraits) and obama.jpg. Bounds measured on them (see docs/quality.md).
FRONTAL_MAX_ABS = {"yaw": 16.0, "pitch": 12.0, "roll": 5.0}
FRONTAL_MEDIAN_ABS = {"yaw": 6.0, "pitch": 5.0, "roll": 2.5}


# -- photos and degradations -----------------------------------------------------------------------------------------


def sample_photos(samples: Path) -> list[Path]:
    """Single-face photos of several people, sizes and sources: face_recognition, dlib's examples/faces and johns."""
    recognition = samples / "face_recognition"
    johns = samples / "dlib" / "johns"
    return [
        *(recognition / n for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")),
        samples / "dlib" / "faces" / "Tom_Cruise_avp_2014_4.jpg",
        johns / "John_Salley" / "000179_02159509.jpg",
        johns / "John_Salley" / "000190_02159501.jpg",
        johns / "John_Simm" / "000305_00470162.jpg",
        johns / "John_Simm" / "000288_00470387.jpg",
    ]


def _rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise by ``degrees`` about the centre, on a canvas large enough to keep every pixel."""
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    c, s = abs(m[0, 0]), abs(m[0, 1])
    new_w, new_h = int(h * s + w * c), int(h * c + w * s)
    m[0, 2] += new_w / 2 - w / 2
    m[1, 2] += new_h / 2 - h / 2
    return cv2.warpAffine(rgb, m, (new_w, new_h), flags=cv2.INTER_LINEAR)


def _tilt(rgb: np.ndarray, roll: float, degrees: float) -> np.ndarray:
    """Rotate so that a head now tilted by ``roll`` (positive clockwise) ends up tilted by ``degrees`` the same way."""
    turn = max(degrees - abs(roll), 0.0)
    return _rotate(rgb, -turn if roll >= 0 else turn)  # OpenCV's positive angle is counter-clockwise


Degrade = Callable[[np.ndarray, AnalyzedFace, float], np.ndarray]

# name -> (levels, function(image, face found on the original, level), component it targets, its direction)
DEGRADATIONS: dict[str, tuple[tuple[float, ...], Degrade, str, int]] = {
    "downscale": (
        (1, 0.5, 0.25, 0.125),
        lambda rgb, face, f: rgb if f == 1 else cv2.resize(rgb, None, fx=f, fy=f, interpolation=cv2.INTER_AREA),
        "inter_eye_px",
        -1,
    ),
    "blur": ((0, 1, 2, 4), lambda rgb, face, s: rgb if s == 0 else cv2.GaussianBlur(rgb, (0, 0), s), "sharpness", -1),
    "darken": ((1, 0.5, 0.25, 0.125), lambda rgb, face, f: (rgb * f).astype(np.uint8), "brightness", -1),
    "gamma": ((1, 1.5, 2.5, 4), lambda rgb, face, g: (255 * (rgb / 255.0) ** g).astype(np.uint8), "brightness", -1),
    # Rotated the way the head already leans until its tilt from upright is the level (the photos lean < 15 degrees).
    "rotate": ((0, 15, 30, 45), lambda rgb, face, a: rgb if a == 0 else _tilt(rgb, face.quality.roll, a), "|roll|", 1),
    # The image's right side cut off from inside the face: the level is the share of the detector box's width cut.
    "crop": (
        (0, 0.3, 0.4, 0.5),
        lambda rgb, face, c: (
            rgb
            if c == 0
            else np.ascontiguousarray(rgb[:, : max(int(face.box[2] - c * (face.box[2] - face.box[0])), 1)])
        ),
        "in_frame",
        -1,
    ),
}


def largest(faces: list[AnalyzedFace]) -> AnalyzedFace | None:
    return max(faces, key=lambda f: f.quality.inter_eye_px) if faces else None


def component(quality: Quality, name: str) -> float:
    return abs(quality.roll) if name == "|roll|" else float(getattr(quality, name))


def degraded_series(analyzer: FaceAnalyzer, photo: Path, kind: str) -> list[tuple[float, Quality]]:
    """(level, quality) of the photo's face at each level of one degradation, up to the first level it is lost."""
    rgb = decode_image(photo.read_bytes())
    original = largest(analyzer.analyze(rgb))
    assert original is not None, f"no face in {photo.name}"
    levels, degrade, _, _ = DEGRADATIONS[kind]
    series = []
    for level in levels:
        face = largest(analyzer.analyze(degrade(rgb, original, level)))
        if face is None:
            break
        series.append((level, face.quality))
    return series


# -- tests -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analyzer(models_dir: Path) -> FaceAnalyzer:
    return FaceAnalyzer(model_files(models_dir))


@pytest.fixture(scope="module")
def photos(face_photos: Path, dlib_example_faces: Path, dlib_johns: Path) -> list[Path]:
    return sample_photos(face_photos.parent)


@pytest.mark.parametrize("kind", list(DEGRADATIONS))
def test_component_and_score_fall_as_degradation_grows(analyzer: FaceAnalyzer, photos: list[Path], kind: str) -> None:
    _, _, name, direction = DEGRADATIONS[kind]
    measured = 0
    for photo in photos:
        series = degraded_series(analyzer, photo, kind)
        if len(series) < 2:
            continue
        measured += 1
        values = [component(q, name) for _, q in series]
        scores = [q.score for _, q in series]
        where = (
            f"{photo.name} {kind} levels {[lv for lv, _ in series]}: {name} {np.round(values, 2).tolist()}, "
            f"score {np.round(scores, 1).tolist()}"
        )
        for before, after in pairwise(values):
            # The targeted component moves the right way (ties only where it saturates, e.g. in_frame at 1).
            assert direction * (after - before) >= -0.02 * abs(before) - 1e-6, where
        assert direction * (values[-1] - values[0]) > 0, where
        for before, after in pairwise(scores):
            assert after <= before + SCORE_TOLERANCE, where
        assert scores[-1] < scores[0] or scores[0] == 0, where
    assert measured >= 3, f"{kind}: too few photos kept a face through two levels"


def test_scale_sequence_is_proportional(analyzer: FaceAnalyzer, face_photos: Path) -> None:
    series = degraded_series(analyzer, face_photos / "obama.jpg", "downscale")
    assert len(series) == 4
    base = series[0][1].inter_eye_px
    for factor, quality in series[1:]:
        assert quality.inter_eye_px == pytest.approx(base * factor, rel=0.12)


def test_rotation_reads_as_roll(analyzer: FaceAnalyzer, face_photos: Path) -> None:
    series = degraded_series(analyzer, face_photos / "obama.jpg", "rotate")
    for angle, quality in series[1:]:
        assert abs(abs(quality.roll) - angle) < 4.0, (angle, quality.roll)
        # Pose is measured in the face's own frame: tilting the image moves roll, not yaw or pitch.
        assert abs(quality.yaw) < 25 and abs(quality.pitch) < 20, quality


def test_frontal_faces_read_near_zero_pose(analyzer: FaceAnalyzer, face_photos: Path, dlib_johns: Path) -> None:
    qualities = []
    for photo in [face_photos / "obama.jpg", *sorted(dlib_johns.glob("*/*.jpg"))]:
        qualities += [f.quality for f in analyzer.analyze(decode_image(photo.read_bytes()))]
    assert len(qualities) >= 25
    for name, bound in FRONTAL_MAX_ABS.items():
        values = [abs(getattr(q, name)) for q in qualities]
        assert max(values) < bound, (name, max(values))
        assert statistics.median(values) < FRONTAL_MEDIAN_ABS[name], (name, statistics.median(values))


def test_tiny_face_is_flagged_by_inter_eye_distance(analyzer: FaceAnalyzer, face_photos: Path) -> None:
    rgb = decode_image((face_photos / "obama.jpg").read_bytes())
    tiny = largest(analyzer.analyze(cv2.resize(rgb, None, fx=0.15, fy=0.15, interpolation=cv2.INTER_AREA)))
    full = largest(analyzer.analyze(rgb))
    assert tiny is not None and full is not None
    assert tiny.quality.inter_eye_px < 20 < 90 < full.quality.inter_eye_px
    assert tiny.quality.score < 30 < 80 < full.quality.score
    failures = quality_failures(types_pb2.FaceQuality(**vars(tiny.quality)), MatchingSettings(template_key="x" * 44))
    assert any(f.startswith("inter_eye_px ") for f in failures), failures
    assert quality_failures(types_pb2.FaceQuality(**vars(full.quality)), MatchingSettings(template_key="x" * 44)) == []


def test_quality_failures_name_every_failing_component() -> None:
    settings = MatchingSettings(template_key="x" * 44)
    quality = types_pb2.FaceQuality(
        inter_eye_px=22,
        sharpness=3.1,
        brightness=120,
        contrast=30,
        detector_score=0.9,
        in_frame=1.0,
        yaw=50,
        pitch=-5,
        roll=0,
        score=20,
    )
    assert quality_failures(quality, settings) == [
        "quality score 20 < 40",
        "inter_eye_px 22 < 40",
        "|yaw| 50 > 45",
        "sharpness 3.1 < 10",
    ]


def test_cut_face_is_measured_only_inside_the_frame(analyzer: FaceAnalyzer, face_photos: Path) -> None:
    # The black fill where the chip leaves the image must not read as detail or as dark exposure.
    series = dict(degraded_series(analyzer, face_photos / "obama.jpg", "crop"))
    whole, cut = series[0], series[0.3]
    assert cut.in_frame < 0.95
    assert cut.sharpness < 2 * whole.sharpness and abs(cut.brightness - whole.brightness) < 25


# -- the table of docs/quality.md ------------------------------------------------------------------------------------


def degradation_table(analyzer: FaceAnalyzer, photos: list[Path]) -> Iterator[str]:
    """Markdown rows: per degradation and level, the median targeted component and score over the photos."""
    yield "| degradation | level | faces found | median targeted component | median score |"
    yield "|---|---|---|---|---|"
    for kind, (levels, _, name, _) in DEGRADATIONS.items():
        by_level: dict[float, list[Quality]] = {lv: [] for lv in levels}
        for photo in photos:
            for level, quality in degraded_series(analyzer, photo, kind):
                by_level[level].append(quality)
        for level, found in by_level.items():
            if not found:
                yield f"| {kind} | {level} | 0/{len(photos)} | - | - |"
                continue
            value = statistics.median(component(q, name) for q in found)
            score = statistics.median(q.score for q in found)
            label = "abs(roll)" if name == "|roll|" else name  # a bare | would split the Markdown cell
            yield f"| {kind} | {level} | {len(found)}/{len(photos)} | {label} {value:.3g} | {score:.1f} |"


if __name__ == "__main__":
    for row in degradation_table(FaceAnalyzer(model_files()), sample_photos(paths.samples_dir())):
        sys.stdout.write(row + "\n")
