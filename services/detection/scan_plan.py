"""Which parts of a CCTV frame the detector scans closely: a camera's scan plan, frame by frame.

Finding 40 px faces in a 1080p frame means scanning it at half size (a 960x544 input, 61 ms of one core), far more
than a camera's frame budget when a detection replica serves several cameras. Most of a street camera's picture is
the same from one frame to the next, so each frame gets the finest passes only where a new face can be:

- where the picture changed since the camera's previous frame (motion.py): people walking in, turning, coming closer;
- around the faces the camera's tracks expect (tracker.py), so a person who stops is still seen;
- one tile of the frame in turn (``tile_px`` square, a 4x3 grid at 1080p by default), so that a face that was there
  from the start, or that moves too little to register, is found within one round of the tiles (12 frames).

The cheaper coarse passes and the whole-frame pass still scan the whole region of interest every frame, and a frame
with no usable previous one (the camera's first, another frame size, a change over most of the picture) is scanned
in full. The region of interest (``roi``, fractions of the frame) bounds everything: faces centred outside it are
dropped, so a camera can leave out a poster, a screen or a neighbour's window. docs/cctv.md has the figures.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sightline.common.models import regions
from sightline.common.models.regions import Rect
from sightline.detection import motion
from sightline.detection.settings import CameraScan

# A tracked face is looked for within this many face widths of where its track expects it.
TRACK_MARGIN_WIDTHS = 1.0


@dataclass(frozen=True)
class ScanAreas:
    """What the detector is asked to scan in one frame (``FaceDetector.detect``'s arguments)."""

    min_face_px: float | None
    roi: list[Rect] | None  # None: the whole frame
    focus: list[Rect] | None  # None: the fine passes scan all of the region of interest

    def scanned_share(self, width: int, height: int) -> float:
        """The share of a ``width`` x ``height`` frame the finest pass scans (before its margins; where two regions
        overlap without being merged the overlap counts twice, so this may read a little high)."""
        everywhere = self.roi if self.roi is not None else [(0, 0, width, height)]
        scanned = everywhere if self.focus is None else regions.intersections(everywhere, self.focus)
        return min(1.0, regions.area(regions.merged(scanned)) / max(1, width * height))


PORTRAIT = ScanAreas(None, None, None)  # portraits and gates: the whole-frame pass only


@dataclass
class _CameraState:
    thumbnail: np.ndarray | None = None
    frames: int = 0


class ScanPlanner:
    """Per camera, the previous frame's thumbnail and the turn of the tiles; ``areas`` plans one frame."""

    def __init__(self, motion_level: int = motion.DEFAULT_LEVEL, max_cameras: int = 10_000) -> None:
        self.motion_level = motion_level
        self.max_cameras = max_cameras
        self._cameras: OrderedDict[str, _CameraState] = OrderedDict()

    def areas(self, camera: str, scan: CameraScan, rgb: np.ndarray, expected: Sequence[np.ndarray]) -> ScanAreas:
        """The plan for this frame of ``camera`` (``expected``: where its tracks expect faces, [4] boxes)."""
        height, width = rgb.shape[:2]
        roi = _roi_pixels(scan.roi, width, height)
        if not scan.min_face_px or not scan.tile_px:
            return ScanAreas(scan.min_face_px or None, roi, None)
        state = self._state(camera)
        thumbnail = motion.thumbnail(rgb)
        changed = motion.changed_regions(state.thumbnail, thumbnail, width, height, self.motion_level)
        state.thumbnail = thumbnail
        state.frames += 1
        if changed is None:
            return ScanAreas(scan.min_face_px, roi, None)
        tiles = _tiles(width, height, scan.tile_px)
        tile = tiles[state.frames % len(tiles)]
        tracked = [regions.grown(box, TRACK_MARGIN_WIDTHS * float(box[2] - box[0])) for box in expected]
        focus = [*changed, tile, *(rect for box in tracked if (rect := regions.clip(box, width, height)))]
        return ScanAreas(scan.min_face_px, roi, focus)

    def _state(self, camera: str) -> _CameraState:
        state = self._cameras.pop(camera, None) or _CameraState()
        self._cameras[camera] = state  # most recently seen last, so the longest-idle camera is forgotten first
        while len(self._cameras) > self.max_cameras:
            self._cameras.popitem(last=False)
        return state


def _roi_pixels(roi: Sequence[Sequence[float]] | None, width: int, height: int) -> list[Rect] | None:
    if not roi:
        return None
    scaled = (regions.clip((x1 * width, y1 * height, x2 * width, y2 * height), width, height) for x1, y1, x2, y2 in roi)
    return [rect for rect in scaled if rect is not None]


def _tiles(width: int, height: int, tile_px: int) -> list[Rect]:
    """The frame cut into a grid of tiles about ``tile_px`` square, row by row."""
    cols, rows = max(1, math.ceil(width / tile_px)), max(1, math.ceil(height / tile_px))
    xs = [round(width * i / cols) for i in range(cols + 1)]
    ys = [round(height * j / rows) for j in range(rows + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(rows) for i in range(cols)]
