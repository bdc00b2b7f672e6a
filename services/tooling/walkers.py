"""Synthetic CCTV video: people walking past a fixed camera, frame by frame, with the truth of every face.

A camera's view is one face-free background of scenes.py (street, texture or photo tiles) that stays put; each
``Walker`` is one real face of the sample photos (with head and shoulders) that enters at one frame, moves in a
straight line and grows or shrinks (coming closer or going away) until it leaves at another; a walker whose start
and end are the same stands still. Every frame gets fresh sensor noise, so the picture changes a little everywhere
as a real camera's does, and the faces keep their look (mirroring, lighting) for the whole walk.

For ``sightline bench detection``'s video block and the CCTV end-to-end test: unlike single scenes, these frames let
the detection service's scan plan (motion, tracks, rolling tiles) work as it does on a real stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from sightline.tooling.scenes import Box, FaceLibrary, Look, SourceFace, blend, face_patch, make_scene

NOISE_SIGMA = 2.5  # grey levels of per-frame sensor noise


@dataclass(frozen=True)
class Walker:
    """One person crossing the view: face centre and face width at frame ``first`` and at frame ``last``."""

    label: str
    face: SourceFace
    first: int
    last: int
    start: tuple[float, float]
    end: tuple[float, float]
    widths: tuple[float, float]
    look: Look = Look()

    def at(self, frame: int) -> tuple[tuple[float, float], float] | None:
        """Face centre and width in ``frame``, or None when the walker is not in view."""
        if not self.first <= frame <= self.last:
            return None
        t = (frame - self.first) / max(1, self.last - self.first)
        centre = (self.start[0] + t * (self.end[0] - self.start[0]), self.start[1] + t * (self.end[1] - self.start[1]))
        return centre, self.widths[0] + t * (self.widths[1] - self.widths[0])


@dataclass(frozen=True)
class VideoFrame:
    """One frame of the video and its faces: (walker label, face box) for every walker in full view."""

    index: int
    image: np.ndarray
    faces: list[tuple[str, Box]]


def faces_of(library: FaceLibrary, photo: str) -> list[SourceFace]:
    """The source faces cut from one sample photo (e.g. ``obama.jpg``)."""
    found = [face for face in library.faces if face.photo == photo]
    if not found:
        raise ValueError(f"no face of {photo!r} in the sample library")
    return found


def video(
    library: FaceLibrary,
    walkers: Sequence[Walker],
    frames: int,
    size: tuple[int, int] = (1920, 1080),
    background: int = 0,
    seed: int = 0,
) -> Iterator[VideoFrame]:
    """``frames`` frames of the walkers on background number ``background`` of scenes.make_scene's series.

    A walker whose face would reach past the frame's edge in some frame is left out of that frame (it is entering or
    leaving); its truth is only the frames it is wholly in.
    """
    still = make_scene(library, size, None, background, seed).image.astype(np.float32)
    rng = np.random.default_rng((seed, background, len(walkers), frames))
    for index in range(frames):
        image = still + rng.normal(0.0, NOISE_SIGMA, still.shape).astype(np.float32)
        faces = []
        for walker in walkers:
            box = _paste(library, image, walker, index)
            if box is not None:
                faces.append((walker.label, box))
        yield VideoFrame(index, np.clip(image, 0, 255).astype(np.uint8), faces)


def _paste(library: FaceLibrary, image: np.ndarray, walker: Walker, index: int) -> Box | None:
    place = walker.at(index)
    if place is None:
        return None
    (cx, cy), width = place
    made = face_patch(library, walker.face, width, walker.look)
    if made is None:
        return None
    patch, face = made
    x, y = round(cx - (face[0] + face[2]) / 2), round(cy - (face[1] + face[3]) / 2)
    if x < 0 or y < 0 or x + patch.shape[1] > image.shape[1] or y + patch.shape[0] > image.shape[0]:
        return None
    return blend(image, patch, face, x, y)
