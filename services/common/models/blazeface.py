"""Face detection with MediaPipe BlazeFace (full-range model) on onnxruntime.

The model sees the whole image letterboxed into 192x192 (aspect kept, black padding), scaled to [-1, 1], NCHW. It
predicts for each of 2304 anchors (a 48x48 grid with stride 4, one anchor per cell) a face logit and 16 regressors:
box centre x, y, width, height and six keypoints (x, y), in pixels of the 192 input, centre and keypoints as offsets
from the anchor centre. Overlapping candidates are merged by MediaPipe's weighted non-maximum suppression (a
score-weighted average of every box that overlaps the best one), which steadies boxes and keypoints.

Produce the ONNX file with ``python -m sightline.common.models.convert.fetch``; this module needs only numpy, OpenCV and
onnxruntime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sightline.common.models.onnx_session import open_session

log = logging.getLogger(__name__)

INPUT_SIZE = 192
GRID = 48
STRIDE = INPUT_SIZE // GRID
NUM_KEYPOINTS = 6
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear_tragion", "left_ear_tragion")
# Logits are clipped before the sigmoid as MediaPipe does, so that float32 exp() cannot overflow.
_LOGIT_CLIP = 80.0


@dataclass(frozen=True)
class Detection:
    """One face, in pixels of the original image.

    ``box`` is (x1, y1, x2, y2) and may reach past the image border for faces cut by it. ``keypoints`` is a float32
    [6, 2] array of (x, y): right eye, left eye, nose tip, mouth centre, right ear tragion, left ear tragion, where
    right and left are the person's own (so the right eye has the smaller x in an unmirrored photo of a person
    facing the camera).
    """

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


def _anchor_centres() -> np.ndarray:
    """[2304, 2] anchor centres (x, y) in input pixels, row-major over the 48x48 grid like the model's outputs."""
    centres = (np.arange(GRID, dtype=np.float32) + 0.5) * STRIDE
    xs, ys = np.meshgrid(centres, centres)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


@dataclass(frozen=True)
class _Letterbox:
    """How the original image sits inside the 192x192 input: scale per axis and top-left offset."""

    scale_x: float
    scale_y: float
    offset_x: int
    offset_y: int

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Map [..., 2] input-pixel coordinates back to original-image pixels."""
        out = np.empty_like(points)
        out[..., 0] = (points[..., 0] - self.offset_x) / self.scale_x
        out[..., 1] = (points[..., 1] - self.offset_y) / self.scale_y
        return out


def _letterbox(image: np.ndarray) -> tuple[np.ndarray, _Letterbox]:
    """Resize into a black 192x192 canvas keeping the aspect ratio; returns the NCHW float input and the mapping."""
    h, w = image.shape[:2]
    factor = INPUT_SIZE / max(h, w)
    new_w, new_h = max(1, round(w * factor)), max(1, round(h * factor))
    scale = 1.0
    # Halve by 2x2 averaging while the image is at least twice the target, then finish with one bilinear step that
    # shrinks by less than 2 (so it barely aliases). OpenCV's 2x2 area path is ~10x faster than a fractional
    # INTER_AREA: 0.15 ms instead of 1.2 ms for a 640 px frame.
    while max(image.shape[:2]) >= 2 * INPUT_SIZE and min(image.shape[:2]) >= 2:
        image = cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        scale *= 0.5  # OpenCV maps x -> x * fx exactly when fx is given, whatever the rounding of the size
    scale_x = scale_y = scale
    mid_h, mid_w = image.shape[:2]
    if (new_w, new_h) != (mid_w, mid_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    scale_x *= new_w / mid_w
    scale_y *= new_h / mid_h
    off_x, off_y = (INPUT_SIZE - new_w) // 2, (INPUT_SIZE - new_h) // 2
    canvas = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    canvas[off_y : off_y + new_h, off_x : off_x + new_w] = image
    tensor = canvas.transpose(2, 0, 1)[None].astype(np.float32)
    tensor *= 1.0 / 127.5
    tensor -= 1.0
    return tensor, _Letterbox(scale_x, scale_y, off_x, off_y)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one (x1, y1, x2, y2) box with each row of ``boxes``."""
    ix1 = np.maximum(box[0], boxes[:, 0])
    iy1 = np.maximum(box[1], boxes[:, 1])
    ix2 = np.minimum(box[2], boxes[:, 2])
    iy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe's weighted non-maximum suppression.

    Take the best remaining candidate; every remaining candidate overlapping it by IoU > ``iou_threshold`` (itself
    included) joins its cluster; the result is the score-weighted mean of the cluster's boxes and keypoints, with the
    best score. Returns boxes [M, 4], keypoints [M, 6, 2] and scores [M], in descending score order.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    remaining = np.arange(len(scores))
    out_boxes, out_kps, out_scores = [], [], []
    while remaining.size:
        top = remaining[0]
        overlap = _iou_one_to_many(boxes[top], boxes[remaining]) > iou_threshold
        overlap[0] = True  # a box always belongs to its own cluster, even a degenerate one
        members = remaining[overlap]
        weights = scores[members] / scores[members].sum()
        out_boxes.append(weights @ boxes[members])
        out_kps.append(np.tensordot(weights, keypoints[members], axes=1))
        out_scores.append(scores[top])
        remaining = remaining[~overlap]
    return np.array(out_boxes).reshape(-1, 4), np.array(out_kps).reshape(-1, NUM_KEYPOINTS, 2), np.array(out_scores)


class FaceDetector:
    """BlazeFace full-range detector: ``FaceDetector(path).detect(rgb)`` returns faces, best first.

    One instance holds one onnxruntime session; ``detect`` may be called from one thread at a time per instance
    (onnxruntime sessions are thread-safe, but keep one detector per worker for predictable latency).
    """

    def __init__(
        self, onnx_path: Path, score_threshold: float = 0.5, iou_threshold: float = 0.3, threads: int = 1
    ) -> None:
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {score_threshold}")
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        self.onnx_path = Path(onnx_path)
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        # Compare logits instead of probabilities: no sigmoid on the 2304 candidates that are discarded anyway.
        self._logit_threshold = float(np.log(score_threshold / (1.0 - score_threshold)))
        self._anchors = _anchor_centres()
        self._session = open_session(self.onnx_path, threads, "BlazeFace model")
        self._input_name = self._session.get_inputs()[0].name
        outputs = self._session.get_outputs()
        # Pick outputs by shape, not by name: names come from the TFLite file and are not part of our contract.
        self._reg_index = next(i for i, o in enumerate(outputs) if o.shape[-1] == 4 + 2 * NUM_KEYPOINTS)
        self._cls_index = next(i for i, o in enumerate(outputs) if o.shape[-1] == 1)

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """Faces in an HxWx3 uint8 RGB image of any size, sorted by score, highest first.

        RGBA and grayscale images must be converted by the caller (a ValueError says so), because a silent guess at
        channel order is a classic source of quietly worse recognition.
        """
        _check_image(image_rgb)
        height, width = image_rgb.shape[:2]
        if height == 0 or width == 0:
            return []
        tensor, letterbox = _letterbox(image_rgb)
        outputs = self._session.run(None, {self._input_name: tensor})
        regressors = outputs[self._reg_index].reshape(-1, 4 + 2 * NUM_KEYPOINTS)
        logits = outputs[self._cls_index].reshape(-1)
        keep = np.flatnonzero(logits >= self._logit_threshold)
        if keep.size == 0:
            return []
        boxes, keypoints = self._decode(regressors[keep], self._anchors[keep])
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[keep], -_LOGIT_CLIP, _LOGIT_CLIP)))
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, keypoints, scores = weighted_nms(boxes[valid], keypoints[valid], scores[valid], self.iou_threshold)
        boxes = letterbox.to_original(boxes.reshape(-1, 2, 2)).reshape(-1, 4)
        keypoints = letterbox.to_original(keypoints).astype(np.float32)
        return [
            _detection(box, kps, score)
            for box, kps, score in zip(boxes.tolist(), keypoints, scores.tolist(), strict=True)
        ]

    @staticmethod
    def _decode(regressors: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Regressors to (x1, y1, x2, y2) boxes [N, 4] and keypoints [N, 6, 2], in input pixels."""
        centre = regressors[:, 0:2] + anchors
        half = regressors[:, 2:4] / 2.0
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        keypoints = regressors[:, 4:].reshape(-1, NUM_KEYPOINTS, 2) + anchors[:, None, :]
        return boxes, keypoints


def _detection(box: list[float], keypoints: np.ndarray, score: float) -> Detection:
    keypoints.setflags(write=False)  # the dataclass is frozen; keep its array from being edited in place too
    return Detection(box=(box[0], box[1], box[2], box[3]), score=score, keypoints=keypoints)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected an HxWx3 RGB image, got shape {image.shape}: convert RGBA or grayscale to RGB "
            "first (e.g. cv2.cvtColor(img, cv2.COLOR_RGBA2RGB))"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
