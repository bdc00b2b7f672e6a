"""Face quality in the spirit of ISO/IEC 29794-5: a vector of measured components plus one unified 0-100 score.

Every face gets these components, each a plain measurement a person can check (docs/quality.md gives the formula,
unit, range and calibration of each, and how the score behaves on degraded photos):

- ``inter_eye_px``: distance between the two eye centres, pixels of the original image;
- ``yaw``, ``pitch``, ``roll``: head pose in degrees, estimated geometrically from the detector's keypoints and the
  eye centres (roll from the eye line, yaw from the nose-to-ear asymmetry, pitch from the nose tip's height between
  the eye line and the mouth), all measured in the face's own frame so that in-plane rotation moves roll only;
- ``sharpness``: variance of the Laplacian over the face region of the aligned 150x150 chip, so that it does not
  depend on the face's size in the image;
- ``brightness`` and ``contrast``: mean and standard deviation of the grey level over the same face region;
- ``detector_score``: the detector's confidence;
- ``in_frame``: the share of the face region that lies inside the image.

The unified score is 100 times a product of per-component factors in [0, 1] (each raised to a weight): every
component can only lower it, a perfect face scores 100 and any one unusable component drives it to 0. Exposure also
uses the share of under- and over-exposed pixels, which is folded into the score but not (yet) a field of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from sightline.common.models.descriptor_spec import CHIP_PADDING, CHIP_SIZE
from sightline.common.models.face_chip import chip_transform


@dataclass(frozen=True)
class Quality:
    """The components of one face and its unified score; fields map 1:1 onto ``sightline.v1.FaceQuality``."""

    inter_eye_px: float
    yaw: float
    pitch: float
    roll: float
    sharpness: float
    brightness: float
    contrast: float
    detector_score: float
    in_frame: float
    score: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in vars(self).items()}


# -- where the face is on the chip -------------------------------------------------------------------------------------

# The face region: an ellipse on the aligned chip (CHIP_SIZE 150, CHIP_PADDING 0.25, descriptor_spec.py) from the
# eyebrows to the chin and cheek to cheek (dlib's template puts the eye centres at (48, 47) and (100, 47) and the nose
# base at (74, 88) on that chip).
# Measuring only there keeps background, hair and the black fill of chips that leave the image out of the figures.
_FACE_CENTRE = (75.0, 85.0)
_FACE_RADII = (45.0, 55.0)


def _face_region() -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The face ellipse on the chip: its bounding rectangle, a uint8 mask over that rectangle, and the rectangle's
    pixel coordinates as a 3 x N (col, row, 1) array for mapping into the image."""
    rows, cols = np.mgrid[0:CHIP_SIZE, 0:CHIP_SIZE]
    inside = ((cols - _FACE_CENTRE[0]) / _FACE_RADII[0]) ** 2 + ((rows - _FACE_CENTRE[1]) / _FACE_RADII[1]) ** 2 <= 1
    r, c = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    rect = (slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1))
    coords = np.stack([cols[rect].ravel(), rows[rect].ravel(), np.ones(inside[rect].size)]).astype(np.float64)
    return rect, inside[rect].astype(np.uint8), coords


_RECT, _MASK, _RECT_COORDS = _face_region()
_MASK_PIXELS = int(_MASK.sum())
# Farthest point of the face region from the landmarks' centroid, in inter-eye distances, with a safety margin: a
# face whose centroid is farther than this from every image border is wholly in the frame, no geometry needed.
_REGION_REACH = 2.0
_BORDER_MARGIN = 2.0  # chip pixels next to the image border left out of the photometric figures

# -- pose calibration ------------------------------------------------------------------------------------------------

# BlazeFace's ear tragions are not placed symmetrically about the nose even on frontal faces: (a - b) / (a + b) is
# 0.06 (median) over the frontal sample photos (the dlib "johns" set and obama.jpg). It is subtracted so they read 0.
_YAW_ASYMMETRY_FRONTAL = 0.06
# tan(yaw) per unit of ear asymmetry. An average head (nose tip ~95 mm in front of the line between the tragions,
# which are ~145 mm apart) gives 0.77; a fit against poses solved (OpenCV solvePnP, generic 3D face) from the 68-point
# landmarks shipped with dlib's examples/faces (41 small faces, -72 to +73 degrees) gives 2.0 but visibly overstates
# (obama2.jpg, turned about 30 degrees, would read 48). 1.0 sits between them and reads obama2.jpg at 29 degrees.
_YAW_GAIN = 1.0
# The fallback when an ear is out of the frame: the nose tip's offset along the eye line from the midpoint of the
# detector's eyes, in inter-eye distances (0.035 on the frontal photos). Its gain is scaled like the ears' (the
# solvePnP fit gave 4.75 against 2.0 for the ears).
_YAW_NOSE_FRONTAL = 0.035
_YAW_NOSE_GAIN = 2.4
# Where the nose tip sits between the eye line (0) and the mouth (1) on frontal faces: median of the same photos.
_PITCH_NOSE_FRONTAL = 0.50
# tan(pitch) per unit of that ratio: eye-to-mouth height over the nose tip's depth in front of the eyes and mouth
# (about 1.1 and 0.5 inter-eye distances on an average adult face).
_PITCH_GAIN = 2.2

# -- exposure ----------------------------------------------------------------------------------------------------------

UNDER_EXPOSED = 25  # grey levels at or below this carry no usable detail (as after clipping to black)
OVER_EXPOSED = 245  # grey levels at or above this are (nearly) saturated


def eye_centres(landmarks5: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The subject's right and left eye centres from dlib's 5 points.

    dlib's order is the outer and inner corner of the eye on the image's right (the subject's left eye), the same for
    the eye on the image's left (the subject's right eye), then the base of the nose.
    """
    return landmarks5[2:4].mean(axis=0), landmarks5[0:2].mean(axis=0)


def head_pose(
    landmarks5: np.ndarray, keypoints6: np.ndarray, size: tuple[int, int] | None = None
) -> tuple[float, float, float]:
    """Yaw, pitch and roll in degrees from the landmarks (a geometric approximation, not a 3D model fit).

    All three are measured in the face's own frame (x along the eye line, y perpendicular towards the mouth), so an
    in-plane rotation changes roll only. Signs: roll is positive when the face is turned clockwise in the image, yaw
    is positive when the subject looks towards their own left (the image's right in an unmirrored photo), pitch is
    positive when the chin goes up. When ``size`` (width, height) is given and an ear tragion lies outside the image,
    that keypoint is the detector's guess, so yaw comes from the nose tip's offset from the eye midpoint instead.
    """
    # Plain floats: this runs per face per frame, and numpy's per-call overhead dwarfs the arithmetic on 2-vectors.
    right_eye, left_eye = (tuple(p) for p in np.asarray(eye_centres(landmarks5), np.float64).tolist())
    eye_right, eye_left, nose, mouth, right_ear, left_ear = np.asarray(keypoints6, np.float64).tolist()
    ax, ay = left_eye[0] - right_eye[0], left_eye[1] - right_eye[1]
    eye_distance = math.hypot(ax, ay)
    if eye_distance < 1e-6:
        return 0.0, 0.0, 0.0
    roll = math.degrees(math.atan2(ay, ax))
    ax, ay = ax / eye_distance, ay / eye_distance

    def along(p: list[float], origin: tuple[float, float]) -> float:  # coordinate along the eye line
        return float((p[0] - origin[0]) * ax + (p[1] - origin[1]) * ay)

    def down(p: list[float], origin: tuple[float, float]) -> float:  # coordinate towards the mouth
        return float((p[1] - origin[1]) * ax - (p[0] - origin[0]) * ay)

    # Yaw: turning the head moves the nose tip towards one ear and away from the other.
    if size is None or (_inside(right_ear, size) and _inside(left_ear, size)):
        to_right, to_left = along(nose, tuple(right_ear)), along(left_ear, tuple(nose))
        asymmetry = (to_right - to_left) / max(to_right + to_left, 1e-6)
        yaw = math.degrees(math.atan(_YAW_GAIN * (asymmetry - _YAW_ASYMMETRY_FRONTAL)))
    else:
        detector_mid = ((eye_right[0] + eye_left[0]) / 2, (eye_right[1] + eye_left[1]) / 2)
        offset = along(nose, detector_mid) / eye_distance
        yaw = math.degrees(math.atan(_YAW_NOSE_GAIN * (offset - _YAW_NOSE_FRONTAL)))
    # Pitch: the nose tip stands in front of the eyes and mouth, so nodding moves it up or down between them.
    eye_mid = ((right_eye[0] + left_eye[0]) / 2, (right_eye[1] + left_eye[1]) / 2)
    span = down(mouth, eye_mid)
    nose_height = down(nose, eye_mid) / span if span > 1e-6 else _PITCH_NOSE_FRONTAL
    pitch = -math.degrees(math.atan(_PITCH_GAIN * (nose_height - _PITCH_NOSE_FRONTAL)))
    return yaw, pitch, roll


def _inside(point: list[float], size: tuple[int, int]) -> bool:
    return 0.0 <= point[0] < size[0] and 0.0 <= point[1] < size[1]


def visible_region(landmarks5: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray | None, float]:
    """The face-region mask restricted to chip pixels sampled well inside the image, and the in-frame share.

    The mask is None when the whole region is inside (the common case, decided without any geometry when the
    landmarks sit far from every border). Chip pixels that map outside the image are black fill; the mask also drops
    those within ``_BORDER_MARGIN`` chip pixels of the border, so that the Laplacian never sees the fill's edge. The
    share counts every region pixel that maps inside the image.
    """
    width, height = size
    centre = landmarks5.mean(axis=0)
    reach = _REGION_REACH * float(np.hypot(*(landmarks5[0:2].mean(axis=0) - landmarks5[2:4].mean(axis=0))))
    if reach <= centre[0] <= width - 1 - reach and reach <= centre[1] <= height - 1 - reach:
        return None, 1.0
    affine = chip_transform(landmarks5, CHIP_SIZE, CHIP_PADDING)
    x, y = (affine @ _RECT_COORDS).reshape(2, *_MASK.shape)
    # Distance (image pixels) of each chip pixel from the nearest image border; negative outside the image.
    depth = np.minimum(np.minimum(x, width - 1 - x), np.minimum(y, height - 1 - y))
    in_frame = int(np.count_nonzero(_MASK & (depth >= 0))) / _MASK_PIXELS
    pad = _BORDER_MARGIN * math.hypot(affine[0, 0], affine[1, 0])  # image pixels per chip pixel
    return _MASK & (depth >= pad).astype(np.uint8), in_frame


def chip_measures(chip_rgb: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float, float, float]:
    """Sharpness, brightness, contrast and the clipped share (under- plus over-exposed) of the chip's face region.

    ``mask`` (over the region's rectangle, see :func:`visible_region`) leaves out chip pixels that are not from the
    image. The Laplacian is OpenCV's 3x3 aperture-1 one (4 neighbours minus 4 times the centre) on grey levels 0-255.
    Mean, spread and clipped share all come from one masked 256-bin histogram.
    """
    mask = _MASK if mask is None else mask
    count = int(cv2.countNonZero(mask))
    if count < _MASK_PIXELS // 10:  # too little of the face is in the image to measure anything
        return 0.0, 0.0, 0.0, 1.0
    grey = cv2.cvtColor(chip_rgb, cv2.COLOR_RGB2GRAY)
    # The Laplacian is computed with one pixel of context around the rectangle, so the region's edge is exact.
    rows, cols = _RECT
    window = grey[rows.start - 1 : rows.stop + 1, cols.start - 1 : cols.stop + 1]
    laplacian = cv2.Laplacian(window, cv2.CV_16S)[1:-1, 1:-1]
    _, lap_std = cv2.meanStdDev(laplacian, mask=mask)
    hist = cv2.calcHist([np.ascontiguousarray(grey[_RECT])], [0], mask, [256], [0, 256]).ravel()
    levels = np.arange(256.0)
    mean = float(hist @ levels) / count
    std = math.sqrt(max(float(hist @ (levels - mean) ** 2) / count, 0.0))
    clipped = float(hist[: UNDER_EXPOSED + 1].sum() + hist[OVER_EXPOSED:].sum()) / count
    return float(lap_std[0, 0]) ** 2, mean, std, clipped


# -- unified score -----------------------------------------------------------------------------------------------------

# Exponent of each factor in the unified score: 1 lets a factor pull the score down in full, 0.5 halves its effect
# (in log terms). Contrast gets 0.5 because it largely repeats exposure.
WEIGHTS = {
    "inter_eye_px": 1.0,
    "sharpness": 1.0,
    "exposure": 1.0,
    "contrast": 0.5,
    "yaw": 1.0,
    "pitch": 1.0,
    "roll": 1.0,
    "detector_score": 1.0,
    "in_frame": 1.0,
}


def factors(c: dict[str, float], clipped: float = 0.0) -> dict[str, float]:
    """Each component mapped to [0, 1]: 1 where it no longer limits recognition, 0 where the face is unusable."""
    return {
        # Below ~10 px the landmarks are guesses; passport-photo practice asks for about 90 px. Logarithmic because
        # each halving of the resolution costs about the same. (The chip itself holds ~52 px between the eyes.)
        "inter_eye_px": _ramp(math.log(max(c["inter_eye_px"], 1e-6)), math.log(10.0), math.log(90.0)),
        # 5 is a featureless smear, 60 the detail of a sharp photo resampled to the chip (median of the samples: 54).
        "sharpness": _ramp(math.log(max(c["sharpness"], 1e-6)), math.log(5.0), math.log(60.0)),
        "exposure": min(_ramp(c["brightness"], 20.0, 80.0), _ramp(255.0 - c["brightness"], 15.0, 70.0))
        * _ramp(1.0 - clipped, 0.6, 1.0),
        "contrast": _ramp(c["contrast"], 3.0, 18.0),
        # A turned or nodded face shows the camera its features foreshortened by the cosine of the angle.
        "yaw": max(math.cos(math.radians(c["yaw"])), 0.0),
        "pitch": max(math.cos(math.radians(c["pitch"])), 0.0),
        # Tilt is undone by the alignment, but detector and landmark errors grow with it (they are trained on
        # mostly upright faces) and capture standards ask for an upright head: a linear penalty, 0 at 120 degrees.
        "roll": max(1.0 - abs(c["roll"]) / 120.0, 0.0),
        # Faces are only kept above the detector's threshold (0.5 by default); this penalises the ones a lowered
        # threshold lets through, not the normal spread of scores among real faces.
        "detector_score": _ramp(c["detector_score"], 0.2, 0.5),
        "in_frame": _ramp(c["in_frame"], 0.5, 1.0),
    }


def unified_score(components: dict[str, float], clipped: float = 0.0) -> float:
    """0-100: 100 times the product of the factors, each raised to its weight."""
    log_score = 0.0
    for name, value in factors(components, clipped).items():
        if value <= 0.0:
            return 0.0
        log_score += WEIGHTS[name] * math.log(value)
    return 100.0 * math.exp(log_score)


def _ramp(value: float, low: float, high: float) -> float:
    return min(max((value - low) / (high - low), 0.0), 1.0)


def measure(
    box: np.ndarray,
    score: float,
    landmarks5: np.ndarray,
    keypoints6: np.ndarray,
    chip: np.ndarray,
    size: tuple[int, int],
) -> Quality:
    """All quality components of one face in an image of ``size`` (width, height).

    ``box`` (the detector's) is not used: the face region on the aligned chip is a better-defined "face" than a box
    whose proportions depend on the detector. It stays in the signature for callers.
    """
    del box
    right_eye, left_eye = eye_centres(landmarks5)
    yaw, pitch, roll = head_pose(landmarks5, keypoints6, size)
    mask, in_frame = visible_region(landmarks5, size)
    sharpness, brightness, contrast, clipped = chip_measures(chip, mask)
    components = {
        "inter_eye_px": float(np.hypot(*(left_eye - right_eye))),
        "yaw": yaw,
        "pitch": pitch,
        "roll": roll,
        "sharpness": sharpness,
        "brightness": brightness,
        "contrast": contrast,
        "detector_score": float(score),
        "in_frame": in_frame,
    }
    return Quality(**components, score=unified_score(components, clipped))
