"""The face pipeline in one process: detect, find 5 landmarks, align dlib-style chips, measure quality, embed.

The detection service runs ``FaceAnalyzer`` (everything up to the chip), the embedding service runs the
``FaceEmbedder``, and ``FacePipeline`` chains both for in-process tools (``sightline faces``, the raw benchmark loop).
Keeping the chain here means the services and the tools cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sightline.common.models import quality
from sightline.common.models.blazeface import FaceDetector
from sightline.common.models.descriptor_spec import CHIP_PADDING, CHIP_SIZE, DESCRIPTOR_SIZE
from sightline.common.models.embedder import FaceEmbedder
from sightline.common.models.face_chip import extract_face_chips, landmark_box_from_detection
from sightline.common.models.regions import Rect
from sightline.common.models.registry import ModelFiles, model_files
from sightline.common.models.shape_predictor import ShapePredictor


@dataclass(frozen=True)
class AnalyzedFace:
    """One face found in an image, aligned and measured; coordinates in pixels of the original image."""

    index: int
    box: np.ndarray  # x1, y1, x2, y2
    score: float
    keypoints: np.ndarray  # detector's 6 points
    landmarks: np.ndarray  # dlib's 5 points
    chip: np.ndarray  # CHIP_SIZE x CHIP_SIZE x 3 RGB uint8
    quality: quality.Quality


class FaceAnalyzer:
    """Detector, shape predictor and chip extraction: everything the detection service does to an image."""

    def __init__(self, files: ModelFiles | None = None, threads: int = 1, score_threshold: float = 0.5) -> None:
        files = files or model_files()
        self.detector = FaceDetector(files.detector, score_threshold=score_threshold, threads=threads)
        self.landmarks = ShapePredictor.from_npz(files.landmarks)
        self.model_name = "blazeface_full_range+dlib_5pt"

    def analyze(
        self,
        rgb: np.ndarray,
        max_faces: int = 0,
        min_face_px: float | None = None,
        roi: Sequence[Rect] | None = None,
        focus: Sequence[Rect] | None = None,
    ) -> list[AnalyzedFace]:
        """All faces in an RGB image, best detector score first (at most ``max_faces`` when it is not 0).

        ``min_face_px``: the smallest face width to look for, None for portraits and gates; ``roi`` and ``focus``:
        where to look (``FaceDetector.detect``).
        """
        detections = self.detector.detect(rgb, min_face_px, roi, focus)
        if max_faces:
            detections = detections[:max_faces]
        if not detections:
            return []
        boxes = np.array([landmark_box_from_detection(np.array(d.box), d.keypoints) for d in detections])
        points = self.landmarks.predict(rgb, boxes)  # converts to intensity exactly as dlib does
        chips = extract_face_chips(rgb, points, size=CHIP_SIZE, padding=CHIP_PADDING)
        size = (rgb.shape[1], rgb.shape[0])
        return [
            AnalyzedFace(
                index=i,
                box=np.array(d.box, dtype=np.float32),
                score=float(d.score),
                keypoints=d.keypoints,
                landmarks=points[i],
                chip=chips[i],
                quality=quality.measure(np.array(d.box), d.score, points[i], d.keypoints, chips[i], size),
            )
            for i, d in enumerate(detections)
        ]


class FacePipeline:
    """Analyzer plus embedder: descriptors for every face of an image, in one process."""

    def __init__(self, models_dir: Path | None = None, threads: int = 1) -> None:
        files = model_files(models_dir)
        self.analyzer = FaceAnalyzer(files, threads=threads)
        self.embedder = FaceEmbedder(files.embedder, threads=threads)

    def run(self, rgb: np.ndarray, max_faces: int = 0) -> tuple[list[AnalyzedFace], np.ndarray]:
        faces = self.analyzer.analyze(rgb, max_faces)
        if not faces:
            return faces, np.zeros((0, DESCRIPTOR_SIZE), "f4")
        descriptors = self.embedder.embed(np.stack([f.chip for f in faces]))
        return faces, descriptors
