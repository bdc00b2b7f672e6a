"""Real H.264 clips for the video sampling tests, written once per test session, and what a full decode gives.

The clips are made by ``sightline.cli.bench_video.write_clip`` (PyAV's libx264: the ``av`` wheel of the test extra)
from the synthetic CCTV scenes, each frame's index stamped in its corner, so a test can tell which frame it got.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from sightline.cli.bench_video import ClipSpec, frame_index, write_clip

FULL_HD = ClipSpec()  # a camera's file: 10 s of 1080p at 25 fps, a keyframe every 2 s, no B frames
B_FRAMES = ClipSpec(size=(640, 360), gop=25, b_frames=2)  # a keyframe every second, frames decoded out of order
IRREGULAR = ClipSpec(seconds=12, size=(640, 360), keyframes=(0, 25, 50, 75, 200, 225))  # 1 s GOPs, then a 5 s one
LIVE = ClipSpec(seconds=4, size=(640, 360), gop=25, container="mpegts")  # as a camera streams it


class Clips:
    """The clips of one test session, each written the first time it is asked for."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._written: dict[ClipSpec, Path] = {}

    def path(self, spec: ClipSpec) -> Path:
        if spec not in self._written:
            suffix = "ts" if spec.container == "mpegts" else spec.container
            name = f"clip-{len(self._written)}-{spec.size[0]}x{spec.size[1]}.{suffix}"
            self._written[spec] = write_clip(self.folder / name, spec)
        return self._written[spec]


def full_decode(path: Path, indices: Iterable[int]) -> dict[int, np.ndarray]:
    """The RGB frames at ``indices`` (stamped frame index) as a plain read of every frame gives them."""
    wanted, out = set(indices), {}
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        while wanted - out.keys():
            ok, bgr = capture.read()
            if not ok:
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if (index := frame_index(rgb)) in wanted:
                out[index] = rgb
    finally:
        capture.release()
    return out
