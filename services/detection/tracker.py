"""Face tracks per camera: the same person walking past is one track, not one face per frame.

A simple, explainable tracker: each track predicts where its face is now (constant velocity since its last two
sightings); each new face is matched to a live track of the same camera by overlap (IoU) with that prediction,
falling back to landmark proximity (within two face widths) when a fast walker's boxes barely overlap; matches are
made greedily, best first, one face per track. A track that has not been seen for ``max_age_s`` (capture time) ends. Frames of one
camera are keyed by camera id, so they all reach the same detection replica in order; the tracks live in its memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Track:
    track_id: str
    box: np.ndarray  # x1, y1, x2, y2
    landmarks: np.ndarray  # [5, 2]
    last_seen: float
    frames: int = 1
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # pixels per second

    def predicted(self, at: float) -> tuple[np.ndarray, np.ndarray]:
        """Box and landmarks moved by the track's velocity to time ``at``."""
        shift = self.velocity * max(0.0, at - self.last_seen)
        return self.box + np.tile(shift, 2), self.landmarks + shift


@dataclass
class _Camera:
    tracks: list[Track] = field(default_factory=list)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def landmark_similarity(a: np.ndarray, b: np.ndarray, box: np.ndarray) -> float:
    """1 when the landmarks coincide, falling to 0 when they are two face widths apart on average."""
    width = max(float(box[2] - box[0]), 1.0)
    return max(0.0, 1.0 - float(np.linalg.norm(a - b, axis=1).mean()) / (2.0 * width))


class FaceTracker:
    def __init__(self, min_iou: float = 0.3, min_landmark_similarity: float = 0.6, max_age_s: float = 2.0,
                 max_cameras: int = 10_000) -> None:  # fmt: skip
        self.min_iou = min_iou
        self.min_landmark_similarity = min_landmark_similarity
        self.max_age_s = max_age_s
        self.max_cameras = max_cameras
        self._cameras: dict[str, _Camera] = {}

    def assign(self, camera: str, at: float, boxes: Sequence[np.ndarray], landmarks: Sequence[np.ndarray]) -> list[str]:
        """The track id of each face of one frame, in order; new faces start new tracks."""
        state = self._camera(camera)
        state.tracks = [t for t in state.tracks if at - t.last_seen <= self.max_age_s]
        pairs = self._candidate_pairs(state.tracks, boxes, landmarks, at)
        ids: list[str | None] = [None] * len(boxes)
        taken: set[int] = set()
        for _score, face, track_index in pairs:
            if ids[face] is None and track_index not in taken:
                taken.add(track_index)
                ids[face] = self._continue(state.tracks[track_index], boxes[face], landmarks[face], at)
        for face, track_id in enumerate(ids):
            if track_id is None:
                ids[face] = self._start(camera, state, boxes[face], landmarks[face], at)
        return [i for i in ids if i is not None]

    def _candidate_pairs(self, tracks: list[Track], boxes: Sequence[np.ndarray], landmarks: Sequence[np.ndarray],
                         at: float) -> list[tuple[float, int, int]]:  # fmt: skip
        predictions = [track.predicted(at) for track in tracks]
        pairs = []
        for face, (box, points) in enumerate(zip(boxes, landmarks, strict=True)):
            for index, (expected_box, expected_points) in enumerate(predictions):
                overlap = iou(np.asarray(box), expected_box)
                if overlap >= self.min_iou:
                    pairs.append((1.0 + overlap, face, index))  # overlap first: it is the stronger evidence
                    continue
                near = landmark_similarity(np.asarray(points), expected_points, expected_box)
                if near >= self.min_landmark_similarity:
                    pairs.append((near, face, index))
        return sorted(pairs, reverse=True)

    @staticmethod
    def _continue(track: Track, box: np.ndarray, points: np.ndarray, at: float) -> str:
        box = np.asarray(box, float)
        if at > track.last_seen:
            centre_shift = (box[:2] + box[2:]) / 2 - (track.box[:2] + track.box[2:]) / 2
            track.velocity = centre_shift / (at - track.last_seen)
        track.box, track.landmarks, track.last_seen = box, np.asarray(points, float), at
        track.frames += 1
        return track.track_id

    @staticmethod
    def _start(camera: str, state: _Camera, box: np.ndarray, points: np.ndarray, at: float) -> str:
        track = Track(f"{camera}:t{next(state.counter)}", np.asarray(box, float), np.asarray(points, float), at)
        state.tracks.append(track)
        return track.track_id

    def _camera(self, camera: str) -> _Camera:
        state = self._cameras.pop(camera, None) or _Camera()
        self._cameras[camera] = state  # most recently seen last, so the longest-idle camera is forgotten first
        while len(self._cameras) > self.max_cameras:
            self._cameras.pop(next(iter(self._cameras)))
        return state
