"""Reading a passport data page: the machine readable zone (OCR + TD3 parse) and the printed portrait.

A document page opens an e-channel session: the MRZ's document number is the claim and the page's portrait is the
reference face. :func:`read_document` returns both, or a clear reason why not (no MRZ, MRZ unreadable, check digits
failing with each reason, no portrait). The caller runs the usual face pipeline (landmarks, chip, descriptor) on
``DocumentReading.image`` with ``portrait_box``.

OCR is PP-OCRv4 (text detection + recognition, ONNX) from the ``rapidocr-onnxruntime`` wheel, using only the models
inside the wheel (nothing is downloaded). The engine takes seconds to load, so it is created once, lazily, and shared
(calls are serialised by a lock). Only the bottom of the page is read first, where ICAO 9303 puts the MRZ; the whole
page is read only when no MRZ is found there.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sightline.capture.kiosk.mrz import MrzResult, find_td3_lines, looks_like_mrz, parse_td3

log = logging.getLogger(__name__)

# The MRZ occupies the bottom ~23 mm of an 88 mm TD3 page; 35% leaves room for a skewed or badly framed scan.
BOTTOM_FRACTION = 0.35
# Text detection runs on the image scaled so that its longer side is at most this (rapidocr's default scales the
# *shorter* side up to 736, i.e. a 3000 px wide strip for the MRZ band: 3-4x slower for no gain). Recognition still
# reads the crops at full resolution, so MRZ characters (~30 px high at 300 dpi) keep their detail.
DET_MAX_SIDE = 960

# Error codes of DocumentReading.error.
NO_MRZ = "no_mrz"
MRZ_UNREADABLE = "mrz_unreadable"
MRZ_INVALID = "mrz_check_failed"
NO_PORTRAIT = "no_portrait"


@dataclass
class DocumentReading:
    """What a document page gave. ``ok`` when the MRZ is valid and a portrait was found.

    ``portrait_box`` is (x1, y1, x2, y2) in pixels of ``image`` (the page as given), for the face pipeline.
    ``error`` is one of ``no_mrz``, ``mrz_unreadable``, ``mrz_check_failed``, ``no_portrait`` (the first that
    applies) and ``errors`` the human-readable reasons.
    """

    image: np.ndarray
    mrz: MrzResult | None = None
    portrait_box: tuple[float, float, float, float] | None = None
    portrait_score: float = 0.0
    ocr_lines: list[str] = field(default_factory=list)
    ocr_seconds: float = 0.0
    error: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def claim(self) -> str | None:
        """The document number to use as the session's claim, only when the MRZ is valid."""
        return self.mrz.document_number if self.mrz is not None and self.mrz.valid else None


# --------------------------------------------------------------------------------------------------------------------
# Lazily created engines
# --------------------------------------------------------------------------------------------------------------------

_ocr_lock = threading.Lock()
_ocr_engine: Any = None
_detector_lock = threading.Lock()
_detector: Any = None


def ocr_engine() -> Any:
    """The shared rapidocr engine, created on first use with one onnxruntime thread per session."""
    global _ocr_engine
    with _ocr_lock:
        if _ocr_engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise RuntimeError(
                    "rapidocr-onnxruntime is not installed: pip install --no-deps "
                    "rapidocr-onnxruntime==1.4.4 (see docs/mrz.md)"
                ) from exc
            started = time.perf_counter()
            # One thread: services share two cores, and parallel intra-op threads fight the other sessions.
            _ocr_engine = RapidOCR(
                intra_op_num_threads=1, inter_op_num_threads=1, det_limit_type="max", det_limit_side_len=DET_MAX_SIDE
            )
            log.info("OCR engine loaded in %.2f s", time.perf_counter() - started)
        return _ocr_engine


def face_detector() -> Any:
    """The shared BlazeFace detector for portraits, from the installed models."""
    global _detector
    with _detector_lock:
        if _detector is None:
            from sightline.common.models.blazeface import FaceDetector
            from sightline.common.models.registry import model_files

            _detector = FaceDetector(model_files().detector)
        return _detector


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def read_document(image_rgb: np.ndarray) -> DocumentReading:
    """Read the MRZ and find the portrait of a passport data page (HxWx3 uint8 RGB, upright)."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    reading = DocumentReading(image=image_rgb)
    _read_mrz(reading)
    _find_portrait(reading)
    if reading.error is not None:
        log.info("document rejected: %s", reading.error)
    return reading


def _read_mrz(reading: DocumentReading) -> None:
    page = reading.image
    top = int(page.shape[0] * (1.0 - BOTTOM_FRACTION))
    started = time.perf_counter()
    lines = ocr_lines(page[top:])
    pair = find_td3_lines(lines)
    if pair is None:
        # The MRZ may sit higher (a scan with margins, a page photographed with the facing page).
        lines = ocr_lines(page)
        pair = find_td3_lines(lines)
    reading.ocr_seconds = time.perf_counter() - started
    reading.ocr_lines = lines
    if pair is None:
        if any(looks_like_mrz(line) for line in lines):
            _fail(
                reading,
                MRZ_UNREADABLE,
                "a machine readable zone was seen but its two 44-character lines "
                "could not be read: " + " | ".join(line for line in lines if looks_like_mrz(line)),
            )
        else:
            _fail(reading, NO_MRZ, "no machine readable zone found on the page")
        return
    reading.mrz = parse_td3(*pair)
    if not reading.mrz.valid:
        _fail(reading, MRZ_INVALID, *reading.mrz.errors)


def ocr_lines(image_rgb: np.ndarray) -> list[str]:
    """Text lines of an image, top to bottom, each the left-to-right join of the text boxes on that row."""
    engine = ocr_engine()
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])  # rapidocr follows OpenCV's BGR convention for arrays
    with _ocr_lock:
        # No angle classifier: pages are upright, and it can flip a filler-heavy MRZ line by mistake.
        result, _ = engine(bgr, use_cls=False)
    return _rows(result or [])


def _rows(result: list[Any]) -> list[str]:
    """Group OCR boxes into rows (the detector may split one MRZ line into several boxes) and join each row."""
    boxes = []
    for points, text, _score in result:
        ys = [p[1] for p in points]
        xs = [p[0] for p in points]
        boxes.append((min(ys), max(ys), min(xs), str(text)))
    boxes.sort(key=lambda b: (b[0] + b[1]) / 2)
    rows: list[list[tuple[float, float, float, str]]] = []
    for box in boxes:
        centre = (box[0] + box[1]) / 2
        if rows:
            last = rows[-1]
            top, bottom = min(b[0] for b in last), max(b[1] for b in last)
            if top <= centre <= bottom:  # same text line: its centre falls inside the row's band
                last.append(box)
                continue
        rows.append([box])
    return ["".join(b[3] for b in sorted(row, key=lambda b: b[2])) for row in rows]


def _find_portrait(reading: DocumentReading) -> None:
    """The largest face on the page is the holder's portrait (ghost images and secondary portraits are smaller)."""
    faces = face_detector().detect(reading.image)
    if not faces:
        _fail(reading, NO_PORTRAIT, "no portrait (face) found on the page")
        return
    largest = max(faces, key=lambda f: f.width * f.height)
    reading.portrait_box = tuple(float(v) for v in largest.box)  # type: ignore[assignment]
    reading.portrait_score = float(largest.score)


def _fail(reading: DocumentReading, code: str, *reasons: str) -> None:
    if reading.error is None:
        reading.error = code
    reading.errors.extend(reasons)
