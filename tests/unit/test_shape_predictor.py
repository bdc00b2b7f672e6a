"""The numpy shape predictor against dlib itself (dlib-bin, test-only) on real photos.

dlib's landmarks are integer pixels; ours are rounded the same way and, on dlib's own HOG boxes, equal them exactly
(measured: 0 px difference on every face of the sample photos, RGB and grayscale, and on hundreds of boxes that
stick out of the image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sightline.common.models.shape_predictor import ShapePredictor

dlib = pytest.importorskip("dlib")

SHAPE_DAT = "shape_predictor_5_face_landmarks.dat"
# Landmarks are whole pixels on both sides, so anything but exact equality is a real mismatch.
MAX_LANDMARK_DIFF = 0.01


def _load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _gray(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _dlib_points(shape: object) -> np.ndarray:
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float32)


def _as_rect(box: np.ndarray) -> object:
    return dlib.rectangle(*(int(v) for v in box))


@pytest.fixture(scope="module")
def predictor(dlib_model_sources: Path) -> ShapePredictor:
    return ShapePredictor.from_dat(dlib_model_sources / SHAPE_DAT)


@pytest.fixture(scope="module")
def dlib_predictor(dlib_model_sources: Path) -> object:
    return dlib.shape_predictor(str(dlib_model_sources / SHAPE_DAT))


@pytest.fixture(scope="module")
def photos_with_boxes(face_photos: Path, dlib_example_faces: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB image, dlib HOG boxes [K,4]) for every sample photo with at least one face."""
    detector = dlib.get_frontal_face_detector()
    out = []
    for path in sorted(face_photos.iterdir()) + sorted(dlib_example_faces.glob("*.jpg")):
        if path.suffix.lower() not in (".jpg", ".png"):
            continue
        rgb = _load_rgb(path)
        rects = detector(rgb, 1)
        if rects:
            boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float64)
            out.append((path.name, rgb, boxes))
    assert sum(len(b) for _, _, b in out) >= 60, "expected the sample photos to hold dozens of faces"
    return out


def _assert_matches_dlib(
    predictor: ShapePredictor, dlib_predictor: object, image: np.ndarray, boxes: np.ndarray, what: str
) -> None:
    ours = predictor.predict(image, boxes)
    assert ours.shape == (len(boxes), 5, 2) and ours.dtype == np.float32
    for box, points in zip(boxes, ours, strict=True):
        expected = _dlib_points(dlib_predictor(image, _as_rect(box)))
        diff = float(np.abs(points - expected).max())
        assert diff < MAX_LANDMARK_DIFF, f"{what} box {box}: landmarks differ from dlib by {diff} px"


def test_model_structure(predictor: ShapePredictor) -> None:
    assert predictor.num_parts == 5
    assert predictor.split_features.shape == (15, 500, 15, 2)
    assert predictor.leaf_values.shape == (15, 500, 16, 10)
    assert predictor.deltas.shape == (15, 800, 2)


def test_matches_dlib_on_hog_boxes_rgb_and_gray(predictor, dlib_predictor, photos_with_boxes) -> None:
    for name, rgb, boxes in photos_with_boxes:
        _assert_matches_dlib(predictor, dlib_predictor, rgb, boxes, f"{name} (RGB)")
        _assert_matches_dlib(predictor, dlib_predictor, _gray(rgb), boxes, f"{name} (gray)")


def test_faces_at_the_image_border(predictor, dlib_predictor, photos_with_boxes) -> None:
    """Feature pixels outside the image read as 0 in dlib: crop photos through faces, and push boxes outside."""
    name, rgb, boxes = next(p for p in photos_with_boxes if p[0] == "obama.jpg")
    left, top, right, bottom = boxes[0].astype(int)
    width = right - left
    cut_left = np.ascontiguousarray(rgb[:, left + width // 3 :])
    shifted = boxes - [left + width // 3, 0, left + width // 3, 0]
    _assert_matches_dlib(predictor, dlib_predictor, cut_left, shifted, "face cut by the left edge")
    cut_bottom = np.ascontiguousarray(rgb[: bottom - width // 3])
    _assert_matches_dlib(predictor, dlib_predictor, cut_bottom, boxes, "face cut by the bottom edge")
    rng = np.random.default_rng(7)
    h, w = rgb.shape[:2]
    sides = rng.uniform(40, 500, 60)
    lefts = rng.uniform(-0.7 * sides, w - 0.3 * sides)
    tops = rng.uniform(-0.7 * sides, h - 0.3 * sides)
    random_boxes = np.floor(np.stack([lefts, tops, lefts + sides, tops + sides], axis=1))
    _assert_matches_dlib(predictor, dlib_predictor, rgb, random_boxes, "random box")


def test_many_faces_at_once_equal_one_at_a_time(predictor, photos_with_boxes) -> None:
    name, rgb, boxes = max(photos_with_boxes, key=lambda p: len(p[2]))
    assert len(boxes) >= 10, name
    together = predictor.predict(rgb, boxes)
    one_by_one = np.concatenate([predictor.predict(rgb, box[None]) for box in boxes])
    np.testing.assert_array_equal(together, one_by_one)


def test_npz_round_trip(predictor, photos_with_boxes, tmp_path: Path) -> None:
    path = tmp_path / "sp5.part.npz.tmp"  # odd suffix on purpose: numpy must not append ".npz"
    predictor.save_npz(path)
    assert path.is_file()
    loaded = ShapePredictor.from_npz(path)
    for attr in ("initial_shape", "split_features", "split_thresholds", "leaf_values", "anchor_idx", "deltas"):
        np.testing.assert_array_equal(getattr(loaded, attr), getattr(predictor, attr), err_msg=attr)
    for _, rgb, boxes in photos_with_boxes[:4]:
        np.testing.assert_array_equal(loaded.predict(rgb, boxes), predictor.predict(rgb, boxes))


def test_subpixel_rounds_to_the_default(predictor, photos_with_boxes) -> None:
    _, rgb, boxes = photos_with_boxes[0]
    fine = predictor.predict(rgb, boxes, subpixel=True)
    np.testing.assert_array_equal(np.floor(fine.astype(np.float64) + 0.5), predictor.predict(rgb, boxes))
    assert np.any(fine != np.round(fine))


def test_fractional_boxes_move_landmarks_smoothly(predictor, photos_with_boxes) -> None:
    _, rgb, boxes = photos_with_boxes[0]
    base = predictor.predict(rgb, boxes[:1], subpixel=True)
    nudged = predictor.predict(rgb, boxes[:1] + 0.25, subpixel=True)
    assert float(np.abs(nudged - base).max()) < 3.0


def test_edge_cases(predictor) -> None:
    image = np.zeros((50, 60, 3), np.uint8)
    assert predictor.predict(image, np.zeros((0, 4))).shape == (0, 5, 2)
    far_away = predictor.predict(image, np.array([[1000.0, 1000.0, 1100.0, 1100.0]]))
    assert np.all(np.isfinite(far_away))
    with pytest.raises(ValueError):
        predictor.predict(np.zeros((50, 60), np.float32), np.array([[0.0, 0.0, 40.0, 40.0]]))
    with pytest.raises(ValueError):
        predictor.predict(np.zeros((50, 60, 4), np.uint8), np.array([[0.0, 0.0, 40.0, 40.0]]))
