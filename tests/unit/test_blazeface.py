"""BlazeFace detector on real photos, odd image sizes, and the numeric check of the converted model.

Inputs come from the fixtures in tests/conftest.py: ``models_dir`` (fetched models), ``face_photos`` (the
face_recognition test photos) and ``dlib_example_faces`` (dlib's examples/faces with testing.xml / training.xml).
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sightline.common.models.blazeface import Detection, FaceDetector
from sightline.common.models.convert.blazeface import BlazefaceVerificationError, verify_blazeface

# dlib-bin 20.0.1 on obama.jpg (910x1137): HOG detector (upsample 1) box left, top, right, bottom, and the eye centres
# as the mean of the two eye-corner points of the 5-point shape predictor. Measured once; no dlib needed here.
OBAMA_DLIB_BOX = (349, 142, 617, 409)
OBAMA_DLIB_RIGHT_EYE = (443.5, 216.5)  # the person's right eye, on the image's left
OBAMA_DLIB_LEFT_EYE = (549.0, 215.5)


@pytest.fixture(scope="module")
def detector(models_dir: Path) -> FaceDetector:
    return FaceDetector(models_dir / "blazeface_full_range.onnx")


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def centre(box: tuple[float, float, float, float]) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def test_one_face_on_obama_where_dlib_finds_it(detector: FaceDetector, face_photos: Path) -> None:
    faces = detector.detect(load_rgb(face_photos / "obama.jpg"))
    assert len(faces) == 1
    face = faces[0]
    assert isinstance(face, Detection) and 0.5 <= face.score <= 1.0
    dlib_box = np.array(OBAMA_DLIB_BOX, dtype=float)
    dlib_size = dlib_box[2] - dlib_box[0]
    # BlazeFace boxes are a little larger and sit higher (they include the forehead): allow 10% of the face size.
    assert np.linalg.norm(centre(face.box) - centre(tuple(dlib_box))) < 0.1 * dlib_size
    assert 0.9 < face.width / dlib_size < 1.25
    assert face.keypoints.shape == (6, 2) and face.keypoints.dtype == np.float32
    interocular = np.linalg.norm(np.subtract(OBAMA_DLIB_LEFT_EYE, OBAMA_DLIB_RIGHT_EYE))
    assert np.linalg.norm(face.keypoints[0] - OBAMA_DLIB_RIGHT_EYE) < 0.1 * interocular
    assert np.linalg.norm(face.keypoints[1] - OBAMA_DLIB_LEFT_EYE) < 0.1 * interocular
    # Nose below the eyes, mouth below the nose.
    assert face.keypoints[0, 1] < face.keypoints[2, 1] < face.keypoints[3, 1]


@pytest.mark.parametrize("name", ["obama2.jpg", "obama3.jpg", "biden.jpg", "obama_partial_face2.jpg"])
def test_one_face_on_each_portrait(detector: FaceDetector, face_photos: Path, name: str) -> None:
    assert len(detector.detect(load_rgb(face_photos / name))) == 1


def annotated_faces(folder: Path, xml_name: str) -> list[tuple[str, np.ndarray]]:
    """(image file, [N, 4] boxes x1, y1, x2, y2) from one of dlib's imglab XML files."""
    out = []
    for image in ET.parse(folder / xml_name).getroot().iter("image"):
        boxes = [
            (
                int(b.get("left")),
                int(b.get("top")),
                int(b.get("left")) + int(b.get("width")),
                int(b.get("top")) + int(b.get("height")),
            )
            for b in image.iter("box")
        ]
        out.append((image.get("file"), np.array(boxes, dtype=float)))
    return out


def match(truth: np.ndarray, faces: list[Detection]) -> tuple[int, int]:
    """Greedy one-to-one matching: a detection matches an annotated box when their centres are within a quarter of
    the box's width and the sizes are within a factor 1.5. Returns (matched, unmatched detections)."""
    free = list(range(len(faces)))
    matched = 0
    for box in truth:
        width = box[2] - box[0]
        for k in free:
            close = np.linalg.norm(centre(faces[k].box) - centre(tuple(box))) < 0.25 * width
            if close and 1 / 1.5 < faces[k].width / width < 1.5:
                free.remove(k)
                matched += 1
                break
    return matched, len(free)


def test_several_faces_match_dlib_testing_xml(detector: FaceDetector, dlib_example_faces: Path) -> None:
    images = annotated_faces(dlib_example_faces, "testing.xml")
    assert len(images) == 5
    for file, truth in images:
        faces = detector.detect(load_rgb(dlib_example_faces / file))
        matched, extra = match(truth, faces)
        assert (matched, extra) == (len(truth), 0), f"{file}: {matched}/{len(truth)} matched, {extra} extra"
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


def test_recall_over_all_dlib_annotations(detector: FaceDetector, dlib_example_faces: Path) -> None:
    # 42 of the 43 annotated faces are found (one small, blurred face in 2008_002079.jpg is not); no false alarms.
    total = found = extra = 0
    for xml_name in ("testing.xml", "training.xml"):
        for file, truth in annotated_faces(dlib_example_faces, xml_name):
            m, e = match(truth, detector.detect(load_rgb(dlib_example_faces / file)))
            total, found, extra = total + len(truth), found + m, extra + e
    assert total == 43
    assert found >= 41 and extra == 0


def test_no_face_on_dogs(detector: FaceDetector, dlib_example_faces: Path) -> None:
    assert detector.detect(load_rgb(dlib_example_faces / "dogs.jpg")) == []


def test_keypoints_and_box_follow_resize(detector: FaceDetector, face_photos: Path) -> None:
    # Coordinates are in original pixels: the same photo at half size gives half the coordinates.
    image = load_rgb(face_photos / "obama.jpg")
    half = np.asarray(Image.fromarray(image).resize((image.shape[1] // 2, image.shape[0] // 2), Image.BILINEAR))
    full_face, half_face = detector.detect(image)[0], detector.detect(half)[0]
    size = full_face.width
    assert np.abs(np.array(half_face.box) * 2 - np.array(full_face.box)).max() < 0.05 * size
    assert np.abs(half_face.keypoints * 2 - full_face.keypoints).max() < 0.05 * size


def test_padding_side_does_not_matter(detector: FaceDetector, face_photos: Path) -> None:
    # A landscape canvas (letterboxed top/bottom) and the portrait original (letterboxed left/right) find the face
    # at the same place. The canvas is only a little wider than tall, so the face keeps nearly its input size.
    image = load_rgb(face_photos / "obama.jpg")
    h, w = image.shape[:2]
    wide = np.zeros((h, h + 200, 3), np.uint8)
    wide[:, 100 : 100 + w] = image
    a, b = detector.detect(image)[0], detector.detect(wide)[0]
    assert np.abs(np.array(b.box) - np.array(a.box) - [100, 0, 100, 0]).max() < 0.05 * a.width


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10, 4), np.uint8),  # RGBA
        np.zeros((10, 10), np.uint8),  # grayscale
        np.zeros((10, 10, 1), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 3), np.uint16),
    ],
)
def test_rejects_anything_but_hxwx3_uint8(detector: FaceDetector, bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        detector.detect(bad)


def test_rgba_photo_works_after_caller_converts(detector: FaceDetector, face_photos: Path) -> None:
    rgba = np.asarray(Image.open(face_photos / "32bit.png"))
    assert rgba.shape[2] == 4
    with pytest.raises(ValueError):
        detector.detect(rgba)
    assert len(detector.detect(np.ascontiguousarray(rgba[..., :3]))) == 1


@pytest.mark.parametrize(
    "shape", [(1, 1, 3), (0, 0, 3), (0, 5, 3), (1, 7000, 3), (6000, 1, 3), (3, 2, 3), (6000, 8000, 3)]
)
def test_any_size_does_not_crash(detector: FaceDetector, shape: tuple[int, int, int]) -> None:
    faces = detector.detect(np.full(shape, 127, np.uint8))
    assert faces == []


def test_huge_photo_finds_the_face(detector: FaceDetector, face_photos: Path) -> None:
    image = load_rgb(face_photos / "obama.jpg")
    canvas = np.zeros((6000, 8000, 3), np.uint8)
    canvas[2000 : 2000 + image.shape[0] * 2, 3000 : 3000 + image.shape[1] * 2] = np.repeat(
        np.repeat(image, 2, axis=0), 2, axis=1
    )
    faces = detector.detect(canvas)
    assert len(faces) == 1
    expected = np.array(detector.detect(image)[0].box) * 2 + [3000, 2000, 3000, 2000]
    assert np.abs(np.array(faces[0].box) - expected).max() < 0.1 * (expected[2] - expected[0])


def test_empty_image_has_no_faces(detector: FaceDetector) -> None:
    assert detector.detect(np.zeros((480, 640, 3), np.uint8)) == []
    assert detector.detect(np.full((480, 640, 3), 255, np.uint8)) == []


def test_thresholds(models_dir: Path, face_photos: Path) -> None:
    image = load_rgb(face_photos / "obama.jpg")
    strict = FaceDetector(models_dir / "blazeface_full_range.onnx", score_threshold=0.99)
    assert strict.detect(image) == []
    with pytest.raises(ValueError):
        FaceDetector(models_dir / "blazeface_full_range.onnx", score_threshold=1.5)


def test_detection_is_immutable(detector: FaceDetector, face_photos: Path) -> None:
    face = detector.detect(load_rgb(face_photos / "obama.jpg"))[0]
    with pytest.raises(ValueError):
        face.keypoints[0, 0] = 0.0


def test_missing_model_file_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sightline.common.models.convert.fetch"):
        FaceDetector(tmp_path / "nope.onnx")


def test_verify_passes_on_the_converted_model(models_dir: Path) -> None:
    verify_blazeface(models_dir / "blazeface_full_range.onnx")


def test_verify_fails_on_a_tampered_weight(models_dir: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(models_dir / "blazeface_full_range.onnx"))
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4 and np.prod(t.dims) > 1000)
    values = numpy_helper.to_array(weight).copy()
    values.flat[::97] *= 1.05  # a 5% change to one in 97 weights of one layer
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    with pytest.raises(BlazefaceVerificationError, match="not the expected BlazeFace"):
        verify_blazeface(tampered)


def test_verify_fails_on_a_damaged_or_missing_file(models_dir: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.onnx"
    shutil.copy(models_dir / "blazeface_full_range.onnx", damaged)
    data = bytearray(damaged.read_bytes())
    damaged.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(BlazefaceVerificationError):
        verify_blazeface(damaged)
    with pytest.raises(BlazefaceVerificationError, match="does not exist"):
        verify_blazeface(tmp_path / "absent.onnx")
