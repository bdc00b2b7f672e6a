"""Face detection with MediaPipe BlazeFace (full-range model) on onnxruntime.

The model sees the whole image letterboxed into 192x192 (aspect kept, black padding), scaled to [-1, 1], NCHW. It
predicts for each of 2304 anchors (a 48x48 grid with stride 4, one anchor per cell) a face logit and 16 regressors:
box centre x, y, width, height and six keypoints (x, y), in pixels of the 192 input, centre and keypoints as offsets
from the anchor centre. Overlapping candidates are merged by MediaPipe's weighted non-maximum suppression (a
score-weighted average of every box that overlaps the best one), which steadies boxes and keypoints.

Small faces: the whole frame letterboxed into 192x192 only finds faces at least about a tenth of the frame wide (128
px in a 1080p frame). ``detect(image, min_face_px=...)`` adds a fine pass: the graph takes any input size (our
conversion, convert/blazeface.py), so the frame, scaled so that a face of ``min_face_px`` is ``FINE_FACE_PX`` wide,
is scanned in one call at that scale; its faces and the whole-frame pass's are merged by the same weighted NMS. The
cost grows with the pixels scanned (about 3 ms per 192x192 on one core, 61 ms for a 1080p frame's finest pass at
``min_face_px`` 40), so two kinds of region limit it: ``roi``, the only parts of the frame where faces count (every
pass is cropped to it, faces centred outside are dropped), and ``focus``, where the costly passes (inputs larger than
FOCUSED_PASS_PIXELS) run this frame: the detection service's scan plan puts there what moves, the tracks and one tile
of the frame in turn (detection/scan_plan.py). Each region is scanned with a margin of half the largest face its pass
finds, so a face centred in a region is whole in its crop.

Produce the ONNX file with ``python -m sightline.common.models.convert.fetch``; this module needs only numpy, OpenCV and
onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sightline.common.models import regions
from sightline.common.models.onnx_session import open_session
from sightline.common.models.regions import Rect

log = logging.getLogger(__name__)

INPUT_SIZE = 192
GRID = 48
STRIDE = INPUT_SIZE // GRID
NUM_KEYPOINTS = 6
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear_tragion", "left_ear_tragion")
# Logits are clipped before the sigmoid as MediaPipe does, so that float32 exp() cannot overflow.
_LOGIT_CLIP = 80.0
# In the fine pass, a face of ``min_face_px`` is scaled to this many input pixels: the full-range model finds faces of
# about 20-60 input pixels best when it scans a larger input (docs/cctv.md, `sightline bench detection`).
FINE_FACE_PX = 20.0
# Each finer pass sees faces of about 1x-2.5x its smallest well: passes are this factor apart down to the whole frame.
PASS_RATIO = 2.5
# With finer passes, a face is kept when the detector finds it again in a crop this many face widths wide around it:
# clutter a large scan takes for a face (a clock, a hand, a patterned wall) rarely survives, real faces do
# (`sightline bench detection`: false detections per face-free 1080p frame 1.0 -> 0.0 at the same recall).
CONFIRM_CONTEXT = 3.0
# The crop is letterboxed to this size for the re-check: the face is then about 43 input pixels wide, where the model
# finds faces well, at less than half a 192x192 pass's cost (96 lets clutter through, 160 costs more for nothing).
CONFIRM_SIZE = 128
_FINE_MULTIPLE = 32  # the graph's input height and width must be multiples of its total stride
# The widest face, in input pixels, that a fine pass finds well (FINE_FACE_PX x PASS_RATIO, rounded up): a region is
# scanned with half of it (in frame pixels) as margin.
_PASS_MAX_FACE_PX = 60.0
_CROP_MULTIPLE = 32  # input pixels: the side of a region's crop is grown to a multiple of this
# Passes whose input for the whole frame is larger than this (one 192x192 input) run only in ``focus`` regions when the
# caller gives them: at 1080p and min_face_px 40 the 960x544 pass (61 ms) and the 384x224 one (8 ms), while the
# whole-frame pass (3 ms) scans the whole region of interest every frame (`sightline bench detection`, video block).
FOCUSED_PASS_PIXELS = INPUT_SIZE * INPUT_SIZE


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


_Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes [N, 4], keypoints [N, 6, 2], scores [N]


def _anchor_centres() -> np.ndarray:
    """[2304, 2] anchor centres (x, y) in input pixels, row-major over the 48x48 grid like the model's outputs."""
    return _grid_anchors(INPUT_SIZE, INPUT_SIZE)


def _grid_anchors(height: int, width: int) -> np.ndarray:
    """Anchor centres (x, y) of an input of any size: one per STRIDE x STRIDE cell, row-major like the outputs."""
    xs, ys = np.meshgrid(
        (np.arange(width // STRIDE, dtype=np.float32) + 0.5) * STRIDE,
        (np.arange(height // STRIDE, dtype=np.float32) + 0.5) * STRIDE,
    )
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _pass_scales(height: int, width: int, min_face_px: float | None) -> list[float]:
    """The scales of the passes beside the whole-frame one that find faces down to ``min_face_px``: the finest maps
    that width to FINE_FACE_PX, each next one is PASS_RATIO coarser, until the whole-frame pass takes over."""
    if not min_face_px or min_face_px <= 0:
        return []
    coarse = INPUT_SIZE / max(height, width)
    scales = []
    scale = min(1.0, FINE_FACE_PX / min_face_px)
    while scale > coarse * PASS_RATIO / 2:
        scales.append(scale)
        scale /= PASS_RATIO
    return scales


class _Pyramid:
    """An image and its halvings by 2x2 averaging, made when first asked for: every pass of one frame starts from
    the level just above its own scale and finishes with one bilinear step that shrinks by less than 2 (so it barely
    aliases). OpenCV's 2x2 area path is ~10x faster than a fractional INTER_AREA (0.15 ms instead of 1.2 ms for a
    640 px frame), and the passes share the halvings."""

    def __init__(self, image: np.ndarray) -> None:
        self.levels = [image]

    def level(self, scale: float) -> tuple[np.ndarray, float]:
        """The smallest level at least ``scale`` of the original's size, and its scale (a power of 1/2)."""
        index = 0
        while 0.5 ** (index + 1) >= scale and min(self.levels[index].shape[:2]) >= 2:
            index += 1
            if index == len(self.levels):
                # OpenCV maps x -> x * fx exactly when fx is given, whatever the rounding of the size.
                self.levels.append(cv2.resize(self.levels[-1], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
        return self.levels[index], 0.5**index


def _scaled(pyramid: _Pyramid, rect: Rect, scale: float) -> tuple[np.ndarray, None, _Letterbox]:
    """The ``rect`` of the image resized by about ``scale`` to multiples of 32 pixels (the graph's stride), as the
    model's NCHW input, no anchors (those of its own grid) and the mapping back to the original image."""
    image, level_scale = pyramid.level(scale)
    x1, y1 = int(rect[0] * level_scale), int(rect[1] * level_scale)
    x2 = max(x1 + 1, min(image.shape[1], int(np.ceil(rect[2] * level_scale))))
    y2 = max(y1 + 1, min(image.shape[0], int(np.ceil(rect[3] * level_scale))))
    new_h = max(_FINE_MULTIPLE, round((y2 - y1) / level_scale * scale / _FINE_MULTIPLE) * _FINE_MULTIPLE)
    new_w = max(_FINE_MULTIPLE, round((x2 - x1) / level_scale * scale / _FINE_MULTIPLE) * _FINE_MULTIPLE)
    resized = cv2.resize(image[y1:y2, x1:x2], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    tensor = resized.transpose(2, 0, 1)[None].astype(np.float32)
    tensor *= 1.0 / 127.5
    tensor -= 1.0
    step_x, step_y = new_w / (x2 - x1), new_h / (y2 - y1)
    return tensor, None, _Letterbox(step_x * level_scale, step_y * level_scale, -x1 * step_x, -y1 * step_y)


@dataclass(frozen=True)
class _Letterbox:
    """How the original image sits inside the model's input: scale per axis and top-left offset (input pixels)."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Map [..., 2] input-pixel coordinates back to original-image pixels."""
        out = np.empty_like(points)
        out[..., 0] = (points[..., 0] - self.offset_x) / self.scale_x
        out[..., 1] = (points[..., 1] - self.offset_y) / self.scale_y
        return out


def _letterbox(image: np.ndarray | _Pyramid, size: int = INPUT_SIZE) -> tuple[np.ndarray, _Letterbox]:
    """Resize into a black ``size`` x ``size`` canvas (192 by default) keeping the aspect ratio; returns the NCHW
    float input and the mapping."""
    pyramid = image if isinstance(image, _Pyramid) else _Pyramid(image)
    h, w = pyramid.levels[0].shape[:2]
    factor = size / max(h, w)
    new_w, new_h = max(1, round(w * factor)), max(1, round(h * factor))
    image, scale = pyramid.levels[0], 1.0
    while max(image.shape[:2]) >= 2 * size and min(image.shape[:2]) >= 2:
        image, scale = pyramid.level(scale / 2)
    mid_h, mid_w = image.shape[:2]
    if (new_w, new_h) != (mid_w, mid_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    scale_x, scale_y = scale * new_w / mid_w, scale * new_h / mid_h
    off_x, off_y = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[off_y : off_y + new_h, off_x : off_x + new_w] = image
    tensor = canvas.transpose(2, 0, 1)[None].astype(np.float32)
    tensor *= 1.0 / 127.5
    tensor -= 1.0
    return tensor, _Letterbox(scale_x, scale_y, off_x, off_y)


_EMPTY: _Candidates = (
    np.zeros((0, 4), np.float32),
    np.zeros((0, NUM_KEYPOINTS, 2), np.float32),
    np.zeros(0, np.float32),
)


def _pass_regions(
    scale: float, height: int, width: int, roi: Sequence[Rect] | None, focus: Sequence[Rect] | None
) -> list[Rect]:
    """The crops one pass at ``scale`` scans: the region of interest (whole frame by default), for a costly pass only
    where it meets ``focus``, each grown by half the largest face the pass finds, clipped and merged."""
    areas: list[Rect] = list(roi) if roi is not None else [(0, 0, width, height)]
    if focus is not None and scale * scale * height * width > FOCUSED_PASS_PIXELS:
        areas = regions.intersections(areas, focus)
    margin = _PASS_MAX_FACE_PX / scale / 2
    grown = (regions.clip(regions.grown(area, margin), width, height) for area in areas)
    crops = regions.merged(rect for rect in grown if rect is not None)
    if roi is None and focus is None:
        return crops  # the whole frame, as it is
    # onnxruntime prepares each new input shape once (3-10 ms): crops sized to multiples of _CROP_MULTIPLE input
    # pixels keep the shapes few, so that after a while every one of them has been seen.
    return [regions.fitted(rect, width, height, _CROP_MULTIPLE / scale) for rect in crops]


def _centred_within(candidates: _Candidates, roi: Sequence[Rect]) -> _Candidates:
    boxes, keypoints, scores = candidates
    keep = regions.centres_within(boxes, roi)
    return boxes[keep], keypoints[keep], scores[keep]


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
        self._confirm_anchors = _grid_anchors(CONFIRM_SIZE, CONFIRM_SIZE)
        self._session = open_session(self.onnx_path, threads, "BlazeFace model")
        self._input_name = self._session.get_inputs()[0].name
        outputs = self._session.get_outputs()
        # Pick outputs by shape, not by name: names come from the TFLite file and are not part of our contract.
        self._reg_index = next(i for i, o in enumerate(outputs) if o.shape[-1] == 4 + 2 * NUM_KEYPOINTS)
        self._cls_index = next(i for i, o in enumerate(outputs) if o.shape[-1] == 1)

    def detect(
        self,
        image_rgb: np.ndarray,
        min_face_px: float | None = None,
        roi: Sequence[Rect] | None = None,
        focus: Sequence[Rect] | None = None,
    ) -> list[Detection]:
        """Faces in an HxWx3 uint8 RGB image of any size, sorted by score, highest first.

        ``min_face_px``: the smallest face width (image pixels) to look for. None: the whole-frame pass only (faces
        about a tenth of the image wide or more, as in portraits and at gates); otherwise a fine pass is added when
        the whole-frame pass cannot see faces that small. ``roi``: regions (pixels) outside which no face counts;
        ``focus``: regions to which the costly fine passes are limited this time (None: everywhere).

        RGBA and grayscale images must be converted by the caller (a ValueError says so), because a silent guess at
        channel order is a classic source of quietly worse recognition.
        """
        _check_image(image_rgb)
        height, width = image_rgb.shape[:2]
        if height == 0 or width == 0:
            return []
        pyramid = _Pyramid(image_rgb)
        tensor, letterbox = _letterbox(pyramid)
        whole = self._candidates(tensor, self._anchors, letterbox)
        finer = [
            self._region_pass(pyramid, scale, _pass_regions(scale, height, width, roi, focus))
            for scale in _pass_scales(height, width, min_face_px)
        ]
        if roi is not None:
            whole, *finer = (_centred_within(part, roi) for part in (whole, *finer))
        # A scan for small faces also re-checks the whole-frame pass's faces: in a wide CCTV frame its false ones are
        # as much clutter as the finer passes'. Portraits and gates (no finer pass) are detected as they always were.
        candidates = [self._confirmed(image_rgb, [whole, *finer])] if finer else [whole]
        boxes, keypoints, scores = (np.concatenate(parts) for parts in zip(*candidates, strict=True))
        if scores.size == 0:
            return []
        boxes, keypoints, scores = weighted_nms(boxes, keypoints, scores, self.iou_threshold)
        return [
            _detection(box, kps, score)
            for box, kps, score in zip(boxes.tolist(), keypoints.astype(np.float32), scores.tolist(), strict=True)
        ]

    def _region_pass(self, pyramid: _Pyramid, scale: float, rects: Sequence[Rect]) -> _Candidates:
        """One pass at ``scale`` over each region, candidates in pixels of the whole image."""
        parts = [_EMPTY, *(self._candidates(*_scaled(pyramid, rect, scale)) for rect in rects)]
        boxes, keypoints, scores = (np.concatenate(part) for part in zip(*parts, strict=True))
        return boxes, keypoints, scores

    def _confirmed(self, image: np.ndarray, passes: list[_Candidates]) -> _Candidates:
        """The faces of the passes, merged, that the detector finds again around themselves (CONFIRM_CONTEXT)."""
        boxes, keypoints, scores = (np.concatenate(parts) for parts in zip(*passes, strict=True))
        if scores.size == 0:
            return boxes, keypoints, scores
        boxes, keypoints, scores = weighted_nms(boxes, keypoints, scores, self.iou_threshold)
        keep = np.array([self._found_again(image, box) for box in boxes], dtype=bool)
        return boxes[keep], keypoints[keep], scores[keep]

    def _found_again(self, image: np.ndarray, box: np.ndarray) -> bool:
        """Whether a face is detected, centred within half its width of ``box``'s centre, in a crop around it."""
        side = max(box[2] - box[0], box[3] - box[1])
        centre = (box[:2] + box[2:]) / 2
        x1, y1 = np.maximum(centre - CONFIRM_CONTEXT * side / 2, 0).astype(int)
        x2, y2 = np.minimum(centre + CONFIRM_CONTEXT * side / 2, (image.shape[1], image.shape[0])).astype(int)
        if x2 <= x1 or y2 <= y1:
            return False
        crop = np.ascontiguousarray(image[y1:y2, x1:x2])
        tensor, letterbox = _letterbox(crop, CONFIRM_SIZE)
        found, _, _ = self._candidates(tensor, self._confirm_anchors, letterbox)
        centres = (found[:, :2] + found[:, 2:]) / 2 + (x1, y1)
        return bool(np.any(np.all(np.abs(centres - centre) < side / 2, axis=1)))

    def _candidates(self, tensor: np.ndarray, anchors: np.ndarray | None, mapping: _Letterbox) -> _Candidates:
        """The candidate boxes [N, 4], keypoints [N, 6, 2] and scores [N] of one pass, in original-image pixels
        (``anchors`` None: the grid of the tensor's own size)."""
        if anchors is None:
            anchors = _grid_anchors(*tensor.shape[2:])
        outputs = self._session.run(None, {self._input_name: tensor})
        regressors = outputs[self._reg_index].reshape(-1, 4 + 2 * NUM_KEYPOINTS)
        logits = outputs[self._cls_index].reshape(-1)
        keep = np.flatnonzero(logits >= self._logit_threshold)
        boxes, keypoints = self._decode(regressors[keep], anchors[keep])
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[keep], -_LOGIT_CLIP, _LOGIT_CLIP)))
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = mapping.to_original(boxes[valid].reshape(-1, 2, 2)).reshape(-1, 4)
        return boxes, mapping.to_original(keypoints[valid]), scores[valid]

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
