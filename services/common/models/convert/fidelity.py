"""How faithful our pipeline is to dlib's own (the face_recognition package's), measured face by face.

Ours: BlazeFace -> mapped box -> our 5-point landmarks -> our chip -> our ONNX ResNet. dlib's: HOG detector -> dlib's
shape predictor -> ``dlib.get_face_chip`` -> dlib's ResNet. Faces are paired by box centre; the figure is the L2
distance between the two descriptors of each face (dlib's same-person threshold is 0.6, same-person pairs average
~0.34). dlib (the ``dlib-bin`` wheel) is a development and test reference only: it is imported here lazily and is
never needed by a service.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sightline.common.images import decode_image
from sightline.common.models.descriptor_spec import CHIP_PADDING, CHIP_SIZE
from sightline.common.models.pipeline import FacePipeline


def nearest_detection(hog_box: Sequence[float], detections: Sequence[Any]) -> Any | None:
    """The detection whose box centre is nearest the HOG box centre, within half the HOG box's width."""
    left, top, right, bottom = hog_box
    centre = np.array([(left + right) / 2, (top + bottom) / 2])
    best, best_distance = None, 0.5 * (right - left)
    for detection in detections:
        x1, y1, x2, y2 = detection.box
        distance = float(np.hypot((x1 + x2) / 2 - centre[0], (y1 + y2) / 2 - centre[1]))
        if distance < best_distance:
            best, best_distance = detection, distance
    return best


def descriptor_distances(
    images: Iterable[Path], sources_dir: Path, models_dir: Path | None = None
) -> tuple[list[float], int]:
    """Per face found by both pipelines, the L2 distance between the descriptors; and how many HOG faces there were."""
    import dlib

    hog = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(str(sources_dir / "shape_predictor_5_face_landmarks.dat"))
    resnet = dlib.face_recognition_model_v1(str(sources_dir / "dlib_face_recognition_resnet_model_v1.dat"))
    ours = FacePipeline(models_dir)
    distances, hog_faces = [], 0
    for path in images:
        rgb = decode_image(path.read_bytes())
        faces, vectors = ours.run(rgb)
        for rect in hog(rgb, 1):
            hog_faces += 1
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            match = nearest_detection(box, faces)
            if match is None:
                continue
            chip = dlib.get_face_chip(rgb, shapes(rgb, rect), size=CHIP_SIZE, padding=CHIP_PADDING)
            reference = np.array(resnet.compute_face_descriptor(chip))
            distances.append(float(np.linalg.norm(vectors[match.index] - reference)))
    return distances, hog_faces
