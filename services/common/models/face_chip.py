"""dlib-style aligned face chips, and the mapping from a BlazeFace detection to a dlib-HOG-like box.

The dlib ResNet embedder expects the 150x150 chips ``dlib.get_face_chip(img, shape, size=150, padding=0.25)`` makes
from the 5 landmarks of dlib's shape predictor. This module reproduces that in numpy:

- :func:`chip_transform` is ``get_face_chip_details``: the least-squares similarity from dlib's 5-point template
  (scaled by ``size`` and ``padding``) to the landmarks, returned as the 2x3 matrix taking chip pixels to image
  pixels;
- :func:`extract_face_chips` is ``extract_image_chip`` with bilinear interpolation: when the face region is much
  larger than the chip, dlib first shrinks a crop around it with its ``pyramid_down<2>`` (5-tap Gaussian, integer
  arithmetic, its own half-pixel offsets) as many times as needed and samples the chip from that level; samples
  whose 2x2 neighbourhood leaves the image are black; interpolated values are truncated, not rounded. All of it is
  replicated, so chips equal dlib's except for rare off-by-one pixels where float rounding differs;
- :func:`landmark_box_from_detection` turns a BlazeFace detection into the rectangle dlib's HOG face detector would
  draw around the same face. The shape predictor was trained on HOG boxes and is sensitive to where the box sits, so
  running it on the raw BlazeFace box gives visibly worse landmarks and descriptors.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from sightline.common.models.descriptor_spec import CHIP_PADDING, CHIP_SIZE

__all__ = ["chip_transform", "extract_face_chips", "landmark_box_from_detection", "FACE_TEMPLATE_5"]

# dlib's get_face_chip_details template for the 5-point model, in the unpadded unit square and in the shape
# predictor's point order: outer and inner corner of the eye on the image's right, the same for the eye on the
# image's left, then the base of the nose.
FACE_TEMPLATE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)


# -- chip geometry ---------------------------------------------------------------------------------------------------


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama, no reflection) taking ``src`` [N,2] to ``dst`` [N,2]: (2x2 matrix, shift)."""
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - src_mean, dst - dst_mean
    var = (s**2).sum()
    a = ((s[:, 0] * d[:, 0]).sum() + (s[:, 1] * d[:, 1]).sum()) / var
    b = ((s[:, 0] * d[:, 1]).sum() - (s[:, 1] * d[:, 0]).sum()) / var
    m = np.array([[a, -b], [b, a]])
    return m, dst_mean - m @ src_mean


def chip_transform(landmarks5: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """2x3 affine taking chip pixel (col, row) to image (x, y), as ``get_face_chip_details`` + ``extract_image_chip``.

    This is the full-resolution geometry; :func:`extract_face_chips` may sample a pyramid level instead, which maps
    the same chip pixel to the same place up to dlib's pyramid offsets.
    """
    rect, angle = _chip_rect(np.asarray(landmarks5, np.float64), size, float(padding))
    tl, tr, bl = _rotated_corners(rect, angle)
    return _corner_affine(tl, tr, bl, size)


def _chip_rect(landmarks5: np.ndarray, size: int, padding: float) -> tuple[np.ndarray, float]:
    """dlib's ``chip_details`` for a face: the (unrotated) drectangle [l, t, r, b] and its rotation angle."""
    if landmarks5.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks [5,2], got {landmarks5.shape}")
    template = (padding + FACE_TEMPLATE_5) / (2 * padding + 1) * size
    m, shift = _similarity(template, landmarks5)
    angle = math.atan2(m[1, 0], m[0, 0])
    scale = math.hypot(m[0, 0], m[1, 0])
    cx, cy = m @ np.array([size / 2.0, size / 2.0]) + shift
    half = (size * scale - 1) / 2  # dlib's centered_drect: width - 1 between the outer pixel centres
    return np.array([cx - half, cy - half, cx + half, cy + half]), angle


def _rotate(center: np.ndarray, p: np.ndarray, angle: float) -> np.ndarray:
    """dlib's rotate_point: rotate ``p`` about ``center`` by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = p[0] - center[0], p[1] - center[1]
    return np.array([c * dx - s * dy + center[0], s * dx + c * dy + center[1]])


def _rotated_corners(rect: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-left, top-right and bottom-left corners of ``rect`` rotated by ``angle`` about its centre."""
    left, top, right, bottom = rect
    center = np.array([(left + right) / 2.0, (top + bottom) / 2.0])
    return (
        _rotate(center, np.array([left, top]), angle),
        _rotate(center, np.array([right, top]), angle),
        _rotate(center, np.array([left, bottom]), angle),
    )


def _corner_affine(tl: np.ndarray, tr: np.ndarray, bl: np.ndarray, size: int) -> np.ndarray:
    """The affine taking the chip's corners (0,0), (size-1,0), (0,size-1) to ``tl``, ``tr``, ``bl``."""
    span = max(size - 1, 1)
    return np.column_stack([(tr - tl) / span, (bl - tl) / span, tl])


# -- dlib's pyramid_down<2> --------------------------------------------------------------------------------------------


def _rect_down(rect: np.ndarray) -> np.ndarray:
    """pyramid_down<2>::rect_down: where a drectangle lands one level down (dlib's own offsets)."""
    down: np.ndarray = rect / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])
    return down


def _area(rect: np.ndarray) -> float:
    """drectangle::area with dlib's inclusive width/height (0 when empty)."""
    w, h = rect[2] - rect[0] + 1, rect[3] - rect[1] + 1
    return 0.0 if rect[0] > rect[2] or rect[1] > rect[3] else w * h


def _pyramid_down(image: np.ndarray) -> np.ndarray:
    """One level of dlib's pyramid_down<2> on an RGB uint8 image: 5-tap [1 4 6 4 1] filter, keep every other pixel.

    Output pixel (i, j) is the filter centred on input (2i+2, 2j+2), floor-divided by 256, with no border handling:
    the output is ((H-3)//2, (W-3)//2), and empty for images of 8 pixels or fewer on a side. OpenCV filters in
    float32, which is exact here (integer sums below 2**16), and the border mode never reaches the kept pixels.
    """
    h, w = image.shape[:2]
    if h <= 8 or w <= 8:
        return np.zeros((0, 0, 3), np.uint8)
    oh, ow = (h - 3) // 2, (w - 3) // 2
    filtered = cv2.sepFilter2D(image, cv2.CV_32F, _PYRAMID_TAPS, _PYRAMID_TAPS, borderType=cv2.BORDER_REPLICATE)
    kept = filtered[2 : 2 + 2 * oh : 2, 2 : 2 + 2 * ow : 2]
    return (kept.astype(np.int32) >> 8).astype(np.uint8)


_PYRAMID_TAPS = np.array([1, 4, 6, 4, 1], np.float32)


# -- sampling ----------------------------------------------------------------------------------------------------------


def _sample_bilinear(image: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """dlib's transform_image with interpolate_bilinear: chip pixel (c, r) reads ``image`` at ``affine @ (c, r, 1)``.

    The blend is dlib's expression, in float64 and in its order, so that truncating it gives dlib's byte.
    """
    h, w = image.shape[:2]
    if h < 2 or w < 2:
        return np.zeros((size, size, 3), np.uint8)
    grid = np.arange(size, dtype=np.float64)
    px = (affine[0, 0] * grid[None, :] + affine[0, 1] * grid[:, None] + affine[0, 2]).reshape(-1)
    py = (affine[1, 0] * grid[None, :] + affine[1, 1] * grid[:, None] + affine[1, 2]).reshape(-1)
    left, top = np.floor(px), np.floor(py)
    # Weights repeated per channel so that every operation below runs over one contiguous array.
    lr = np.repeat(px - left, 3)
    tb = np.repeat(py - top, 3)
    left, top = left.astype(np.intp), top.astype(np.intp)
    # dlib leaves a pixel black unless its whole 2x2 neighbourhood is inside the image; negative coordinates wrap
    # to huge unsigned values, so one comparison per axis tests both ends.
    inside = (left.view(np.uintp) < w - 1) & (top.view(np.uintp) < h - 1)
    all_inside = bool(inside.all())
    idx = top * w + left
    if not all_inside:
        idx[~inside] = 0
    pixels = image.reshape(h * w, 3)

    def neighbour(offset: int) -> np.ndarray:
        values: np.ndarray = np.take(pixels, idx + offset, axis=0).reshape(-1).astype(np.float64)
        return values

    rl = 1 - lr
    upper = rl * neighbour(0)
    upper += lr * neighbour(1)
    lower = rl * neighbour(w)
    lower += lr * neighbour(w + 1)
    upper *= 1 - tb
    lower *= tb
    upper += lower
    # dlib's vector_to_pixel truncates towards zero
    chip: np.ndarray = upper.astype(np.uint8).reshape(size, size, 3)
    if not all_inside:
        chip[~inside.reshape(size, size)] = 0
    return chip


def _copy_rect(image: np.ndarray, rect: np.ndarray, size: int) -> np.ndarray:
    """dlib's basic_extract_image_chip: a plain copy of an integer rectangle, zero where it leaves the image."""
    h, w = image.shape[:2]
    left, top = (int(math.floor(v + 0.5)) for v in rect[:2])
    chip = np.zeros((size, size, 3), np.uint8)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, h), min(left + size, w)
    if y1 > y0 and x1 > x0:
        chip[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return chip


def _extract_chip(image: np.ndarray, landmarks5: np.ndarray, size: int, padding: float) -> np.ndarray:
    """One chip, following dlib's extract_image_chips for a single chip_details."""
    rect, angle = _chip_rect(landmarks5, size, padding)
    n_pixels = size * size
    if angle == 0 and rect[2] - rect[0] + 1 == size:
        return _copy_rect(image, rect, size)
    h, w = image.shape[:2]
    # How many pyramid levels dlib builds, and the crop (with a safety border growing per level) it builds them on.
    depth, grow, down = 0, 2.0, _rect_down(rect)
    while _area(down) > n_pixels:
        down, depth, grow = _rect_down(down), depth + 1, grow * 2 + 2
    corners = np.array([*_rotated_corners(rect, angle), _rotate(_center(rect), rect[2:], angle)])
    box = np.array([*(corners.min(axis=0) - grow), *(corners.max(axis=0) + grow)])
    box = np.array([max(box[0], 0), max(box[1], 0), min(box[2], w - 1), min(box[3], h - 1)])
    bl, bt, br, bb = (int(math.floor(v + 0.5)) for v in box)  # drectangle -> rectangle rounds
    if bl > br or bt > bb:
        return np.zeros((size, size, 3), np.uint8)
    source = image[bt : bb + 1, bl : br + 1]
    # Pick the level whose rectangle is still at least the chip's size, as dlib does.
    level_rect = rect - np.array([bl, bt, bl, bt], np.float64)
    level = -1
    while _area(_rect_down(level_rect)) > n_pixels:
        level, level_rect = level + 1, _rect_down(level_rect)
    for _ in range(level + 1):
        source = _pyramid_down(source)
    if source.size == 0:
        return np.zeros((size, size, 3), np.uint8)
    affine = _corner_affine(*_rotated_corners(level_rect, angle), size)
    return _sample_bilinear(np.ascontiguousarray(source), affine, size)


def _center(rect: np.ndarray) -> np.ndarray:
    return np.array([(rect[0] + rect[2]) / 2.0, (rect[1] + rect[3]) / 2.0])


def extract_face_chips(
    image_rgb: np.ndarray, landmarks: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING
) -> np.ndarray:
    """Aligned face chips [K, size, size, 3] uint8 from an HxWx3 RGB uint8 image and [K, 5, 2] landmarks.

    Each chip equals ``dlib.get_face_chip(image_rgb, shape, size, padding)`` for that face alone (dlib's
    ``get_face_chips`` on several faces shares one pyramid crop, which shifts pixels slightly; we do not copy that).
    """
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image_rgb.dtype} {image_rgb.shape}")
    landmarks = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
    chips = np.zeros((len(landmarks), size, size, 3), np.uint8)
    for i, points in enumerate(landmarks):
        chips[i] = _extract_chip(image_rgb, points, size, float(padding))
    return chips


# -- BlazeFace detection -> dlib HOG box -------------------------------------------------------------------------------


# Fitted on 98 faces that both dlib's HOG detector (upsample 1) and our BlazeFace full-range ONNX detector found
# (face_recognition's 7 test photos, dlib's examples/faces and examples/johns): the face scale s is the mean of the
# eye distance and the eye-centre-to-mouth distance (so yaw and pitch each shrink only half of it), the box centre
# sits at an offset from the midpoint of eye centre and mouth measured in the face's own frame (x along the eyes,
# y towards the mouth), and the box side is proportional to s. Each constant is the median of its per-face value
# (HOG box side = right - left + 1, dlib's width). Residual spread, mostly from the HOG detector's own pyramid
# quantisation: 0.14 in log side, 0.1 s in centre. Through landmarks, chip and dlib's ResNet the mapped boxes give
# descriptors within L2 median 0.058 / p90 0.118 of dlib's full pipeline over the 69 faces of the face_recognition
# and examples/faces photos that both detectors find. BlazeFace's raw box is already close to HOG's (side x0.93,
# centre within 2%) and scores about the same on those photos (0.059 / 0.116); the keypoint frame is kept because
# it ties the box to the face's features rather than to the detector's box regression.
_BOX_SIDE_PER_SCALE = 2.3005
_BOX_CENTRE_OFFSET = (-0.0208, -0.0407)  # in units of s, along the face's x (eyes) and y (down) axes
# Fallback when the keypoints are degenerate: the same fit against BlazeFace's own box.
_BOX_SIDE_PER_DETECTOR_SIDE = 0.929


def landmark_box_from_detection(box_xyxy: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """The rectangle (left, top, right, bottom) dlib's HOG detector would draw for a BlazeFace detection.

    ``box_xyxy`` is the detector box (x1, y1, x2, y2) and ``keypoints`` its 6 points (right eye, left eye, nose tip,
    mouth centre, right ear, left ear) in image pixels. The result is in dlib's rectangle convention (right/bottom
    inclusive, so its width is right - left + 1), fractional, and ready for :meth:`ShapePredictor.predict`.
    """
    box = np.asarray(box_xyxy, np.float64).reshape(4)
    kp = np.asarray(keypoints, np.float64).reshape(-1, 2)
    eyes = (kp[0] + kp[1]) / 2
    mouth = kp[3]
    across = kp[1] - kp[0]  # subject's right eye (image left) to left eye
    eye_distance = float(np.hypot(*across))
    scale = (eye_distance + float(np.hypot(*(mouth - eyes)))) / 2
    if not np.isfinite(scale) or eye_distance <= 1e-6:
        centre = (box[:2] + box[2:]) / 2
        side = _BOX_SIDE_PER_DETECTOR_SIDE * (box[2] - box[0])
    else:
        x_axis = across / eye_distance
        y_axis = np.array([-x_axis[1], x_axis[0]])
        centre = (eyes + mouth) / 2 + scale * (_BOX_CENTRE_OFFSET[0] * x_axis + _BOX_CENTRE_OFFSET[1] * y_axis)
        side = _BOX_SIDE_PER_SCALE * scale
    half = (side - 1) / 2
    return np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])
