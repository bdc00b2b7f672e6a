"""Faces at surveillance distances: real faces shrunk to 40-64 px in a 1080p frame are found with ``min_face_px``
and not by the whole-frame pass alone; the pipeline aligns them and sizes their quality.

Faces come from the face_recognition photos (tests/conftest.py ``face_photos``), with head and shoulders around them,
shrunk with area averaging (what a camera's optics and sensor do to a distant face) into a face-free 1920x1080 street-
like frame made of gradients, noise and blocks.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sightline.common.models.blazeface import FaceDetector, _pass_scales
from sightline.common.models.pipeline import FaceAnalyzer
from sightline.common.models.registry import model_files

# The face box dlib's HOG detector gives on obama.jpg (left, top, right, bottom; test_blazeface.py): 268 px wide.
OBAMA_BOX = (349, 142, 617, 409)
FRAME = (1080, 1920)


@pytest.fixture(scope="module")
def detector(models_dir: Path) -> FaceDetector:
    return FaceDetector(models_dir / "blazeface_full_range.onnx")


def street(seed: int) -> np.ndarray:
    """A face-free 1080p frame: a lit gradient, sensor noise and blocks like walls, windows and cars."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : FRAME[0], 0 : FRAME[1]]
    base = np.stack([cols * 0.05 + 60, rows * 0.08 + 50, (rows + cols) * 0.03 + 40], axis=-1)
    frame = (base + rng.normal(0, 8, (*FRAME, 3))).clip(0, 255).astype(np.uint8)
    for _ in range(30):
        x, y = int(rng.integers(0, FRAME[1] - 100)), int(rng.integers(0, FRAME[0] - 80))
        size = (int(rng.integers(20, 300)), int(rng.integers(20, 200)))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(frame, (x, y), (x + size[0], y + size[1]), colour, -1)
    return frame


def with_faces(photo: np.ndarray, width: int, seed: int) -> tuple[np.ndarray, list[tuple[float, ...]]]:
    """The street frame with the photo's face pasted at four places, its face box ``width`` px wide; the boxes."""
    left, top, right, bottom = OBAMA_BOX
    scale = width / (right - left)
    small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    frame, boxes = street(seed), []
    for x, y in ((200, 150), (700, 500), (1200, 250), (1500, 700)):
        h, w = min(small.shape[0], FRAME[0] - y), min(small.shape[1], FRAME[1] - x)
        frame[y : y + h, x : x + w] = small[:h, :w]
        boxes.append((x + left * scale, y + top * scale, x + right * scale, y + bottom * scale))
    return frame, boxes


def found(boxes: list, box: tuple[float, ...]) -> bool:
    """A detected box (x1, y1, x2, y2) whose centre lies in the face box."""
    return any(box[0] <= (b[0] + b[2]) / 2 <= box[2] and box[1] <= (b[1] + b[3]) / 2 <= box[3] for b in boxes)


@pytest.fixture(scope="module")
def obama(face_photos: Path) -> np.ndarray:
    return np.asarray(Image.open(face_photos / "obama.jpg").convert("RGB"))


@pytest.mark.parametrize("width", [40, 48, 64])
def test_small_faces_are_found_with_min_face_px_only(detector: FaceDetector, obama: np.ndarray, width: int) -> None:
    frame, boxes = with_faces(obama, width, seed=width)
    whole_frame = detector.detect(frame)  # the frame letterboxed to 192 px: faces of 4-6 px, mostly unseen
    assert sum(found([d.box for d in whole_frame], box) for box in boxes) <= (0 if width < 64 else 2)
    detections = detector.detect(frame, min_face_px=32)
    assert all(found([d.box for d in detections], box) for box in boxes)
    assert len(detections) <= len(boxes) + 1  # at most one spurious box in a frame of blocks and noise
    for box in boxes:
        best = min(detections, key=lambda d: abs((d.box[0] + d.box[2]) / 2 - (box[0] + box[2]) / 2))
        assert 0.6 * width < best.width < 1.6 * width  # boxes at the face's scale, not merged across faces


def test_a_face_free_frame_stays_empty(detector: FaceDetector) -> None:
    spurious = [len(detector.detect(street(seed), min_face_px=32)) for seed in range(4)]
    assert sum(spurious) <= 1


def test_small_faces_go_through_landmarks_chips_and_quality(obama: np.ndarray) -> None:
    frame, boxes = with_faces(obama, 48, seed=7)
    faces = FaceAnalyzer(model_files()).analyze(frame, min_face_px=32)
    on_faces = [face for face in faces if any(found([face.box], box) for box in boxes)]
    assert len(on_faces) == len(boxes)
    for face in on_faces:
        assert face.chip.shape == (150, 150, 3)
        assert 10 < face.quality.inter_eye_px < 30  # about 0.4 of the face width: what searching small faces needs
        x1, y1, x2, y2 = face.box
        assert np.all((face.landmarks[:, 0] >= x1 - 5) & (face.landmarks[:, 0] <= x2 + 5))


def test_passes_follow_the_smallest_face() -> None:
    assert _pass_scales(*FRAME, None) == []
    assert _pass_scales(*FRAME, 200) == []  # the whole-frame pass sees faces that large
    assert _pass_scales(*FRAME, 40) == [0.5, 0.2]
    assert _pass_scales(2160, 3840, 32) == [0.625, 0.25, 0.1]  # 4K: one more pass between
