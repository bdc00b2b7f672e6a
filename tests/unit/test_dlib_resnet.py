"""The dlib ResNet -> ONNX conversion and FaceEmbedder, checked against dlib itself (dlib-bin, test-only).

Chips are made with dlib's own detector, 5-point predictor and get_face_chip, so these
tests only check the network: our ONNX descriptors against
``face_recognition_model_v1.compute_face_descriptor`` on real photos.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sightline.common.models.convert.dlib_resnet import EXPECTED_ONNX_SHA256, convert_dlib_resnet, file_sha256
from sightline.common.models.embedder import FaceEmbedder

RESNET_DAT = "dlib_face_recognition_resnet_model_v1.dat"
PREDICTOR_DAT = "shape_predictor_5_face_landmarks.dat"
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "32bit.png")
# Measured 3.3e-7 with onnxruntime 1.31.1 on x86-64; the margin covers other CPU kernels.
MAX_ABS_DIFF = 1e-5


@functools.lru_cache(maxsize=2)
def _dlib_chips_and_reference(models: Path, photos: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(photo of each face, uint8 chips [N,150,150,3], dlib descriptors [N,128]) made by dlib."""
    dlib = pytest.importorskip("dlib")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / PREDICTOR_DAT))
    recognizer = dlib.face_recognition_model_v1(str(models / RESNET_DAT))
    names, chips = [], []
    for name in PHOTOS:
        image = np.asarray(Image.open(photos / name).convert("RGB"))
        for box in detector(image, 1):
            chips.append(dlib.get_face_chip(image, predictor(image, box), size=150, padding=0.25))
            names.append(name)
    reference = np.array([np.array(recognizer.compute_face_descriptor(chip)) for chip in chips])
    return names, np.stack(chips).astype(np.uint8), reference


@pytest.fixture
def onnx_model(dlib_model_sources: Path, tmp_path: Path) -> Path:
    path = tmp_path / "dlib_resnet_v1.onnx"
    convert_dlib_resnet(dlib_model_sources / RESNET_DAT, path)
    return path


@pytest.fixture
def dlib_faces(dlib_model_sources: Path, face_photos: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    return _dlib_chips_and_reference(Path(dlib_model_sources), Path(face_photos))


def test_descriptors_match_dlib(onnx_model: Path, dlib_faces: tuple[list[str], np.ndarray, np.ndarray]) -> None:
    names, chips, reference = dlib_faces
    assert set(names) == set(PHOTOS), "every photo should yield at least one face"
    descriptors = FaceEmbedder(onnx_model).embed(chips)
    assert descriptors.dtype == np.float32 and descriptors.shape == (len(chips), 128)
    assert np.abs(descriptors - reference).max() < MAX_ABS_DIFF


def test_same_person_is_closer_than_threshold(
    onnx_model: Path, dlib_faces: tuple[list[str], np.ndarray, np.ndarray]
) -> None:
    names, chips, _ = dlib_faces
    descriptors = FaceEmbedder(onnx_model).embed(chips)
    first = {name: descriptors[names.index(name)] for name in ("obama.jpg", "obama2.jpg", "biden.jpg")}
    assert np.linalg.norm(first["obama.jpg"] - first["obama2.jpg"]) < 0.6
    assert np.linalg.norm(first["obama.jpg"] - first["biden.jpg"]) > 0.6


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_equals_one_by_one(
    onnx_model: Path, dlib_faces: tuple[list[str], np.ndarray, np.ndarray], threads: int
) -> None:
    _, chips, _ = dlib_faces
    embedder = FaceEmbedder(onnx_model, threads=threads)
    batch = embedder.embed(chips)
    single = np.concatenate([embedder.embed(chip) for chip in chips])
    np.testing.assert_allclose(batch, single, rtol=0, atol=1e-6)


def test_conversion_is_deterministic(dlib_model_sources: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    convert_dlib_resnet(dlib_model_sources / RESNET_DAT, first)
    convert_dlib_resnet(dlib_model_sources / RESNET_DAT, second)
    assert file_sha256(first) == file_sha256(second) == EXPECTED_ONNX_SHA256


def test_embedder_properties_and_empty_batch(onnx_model: Path) -> None:
    embedder = FaceEmbedder(onnx_model)
    assert (embedder.model_name, embedder.model_version) == ("dlib_resnet_v1", "1")
    empty = embedder.embed(np.zeros((0, 150, 150, 3), dtype=np.uint8))
    assert empty.shape == (0, 128) and empty.dtype == np.float32
    single = embedder.embed(np.full((150, 150, 3), 128, dtype=np.uint8))
    assert single.shape == (1, 128) and np.isfinite(single).all()


@pytest.mark.parametrize(
    "chips",
    [
        np.zeros((150, 150), dtype=np.uint8),
        np.zeros((1, 150, 150, 4), dtype=np.uint8),
        np.zeros((2, 112, 112, 3), dtype=np.uint8),
        np.zeros((1, 3, 150, 150), dtype=np.uint8),
        np.zeros((1, 1, 150, 150, 3), dtype=np.uint8),
        np.zeros((1, 150, 150, 3), dtype=np.float32),
    ],
    ids=["2d", "rgba", "wrong-size", "nchw", "5d", "float"],
)
def test_bad_chips_raise_value_error(onnx_model: Path, chips: np.ndarray) -> None:
    with pytest.raises(ValueError, match="chips must"):
        FaceEmbedder(onnx_model).embed(chips)
