"""Face tracks per camera: the same person walking past is one track, not one face per frame.

A simple, explainable tracker: each track predicts where its face is now (constant velocity since its last two
sightings); each new face is matched to a live track of the same camera by overlap (IoU) with that prediction (or
with where the face was last seen: walkers stop), falling back to landmark proximity (within two face widths) when a
fast walker's boxes barely overlap, and last to distance: a face of about the track's size within the reach of a
walking person since the track was last seen (``max_speed``; a small face crossing a street camera's view at 5
frames per second moves one or two face widths between frames); matches are made greedily, best first, one face per
track. A track that has not been seen for ``max_age_s`` (capture time) ends, and so do all tracks of a camera whose
frame size changes (boxes are in pixels of the frame: another stream profile, or a folder of unrelated photos, is
another view). Frames of one camera are keyed by camera id, so they all reach the same detection replica in order;
the tracks live in its memory.

A track's id is the camera id and the capture time of its first face, in milliseconds (``cam-3/t1718000000123``): it
is unique without any counter to persist, and a replay of the same frames gives the same ids.

``BestFaces`` says which faces of a track are worth a 1:N search (docs/cctv.md): the track's first faces of at least
a minimum quality, then only a face that beats the best one searched so far by a margin, at most ``max_faces`` in
all; the others are skipped.
"""

from __future__ import annotations

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
    searched: int = 0  # faces of this track sent for a search
    best_searched: float = 0.0  # the highest quality score among them

    def predicted(self, at: float) -> tuple[np.ndarray, np.ndarray]:
        """Box and landmarks moved by the track's velocity to time ``at``."""
        shift = self.velocity * max(0.0, at - self.last_seen)
        return self.box + np.tile(shift, 2), self.landmarks + shift


@dataclass
class _Camera:
    tracks: list[Track] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (height, width) of its frames
    last_started_ms: int = -1
    started_in_that_ms: int = 0


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
    def __init__(
        self,
        min_iou: float = 0.3,
        min_landmark_similarity: float = 0.6,
        max_age_s: float = 2.0,
        max_cameras: int = 10_000,
        max_speed: float = 12.0,
    ) -> None:
        """``max_speed``: the fastest a face moves across the picture, in face widths per second (12: about 2 m/s for
        a 16 cm face, a brisk walk), which bounds how far a track's next face can be when boxes and landmarks no
        longer overlap: a walker crossing the view at 5 frames per second moves 1-2 face widths between frames."""
        self.min_iou = min_iou
        self.min_landmark_similarity = min_landmark_similarity
        self.max_age_s = max_age_s
        self.max_speed = max_speed
        self.max_cameras = max_cameras
        self._cameras: dict[str, _Camera] = {}

    def assign(
        self,
        camera: str,
        at: float,
        boxes: Sequence[np.ndarray],
        landmarks: Sequence[np.ndarray],
        size: tuple[int, int] | None = None,
    ) -> list[str]:
        """The track id of each face of one frame, in order; new faces start new tracks."""
        return [track.track_id for track in self.tracks_of(camera, at, boxes, landmarks, size)]

    def tracks_of(
        self,
        camera: str,
        at: float,
        boxes: Sequence[np.ndarray],
        landmarks: Sequence[np.ndarray],
        size: tuple[int, int] | None = None,
    ) -> list[Track]:
        """The track of each face of one frame (``size``: the frame's height and width), in order."""
        state = self._camera(camera)
        if size is not None and state.size != size:
            state.tracks, state.size = [], size
        state.tracks = self._live(state.tracks, at)
        pairs = self._candidate_pairs(state.tracks, boxes, landmarks, at)
        found: list[Track | None] = [None] * len(boxes)
        taken: set[int] = set()
        for _score, face, track_index in pairs:
            if found[face] is None and track_index not in taken:
                taken.add(track_index)
                found[face] = self._continue(state.tracks[track_index], boxes[face], landmarks[face], at)
        return [
            track or self._start(camera, state, boxes[face], landmarks[face], at) for face, track in enumerate(found)
        ]

    def expected_boxes(self, camera: str, at: float) -> list[np.ndarray]:
        """Where the camera's live tracks expect their faces at ``at``: the scan plan looks closely there."""
        state = self._cameras.get(camera)
        if state is None:
            return []
        return [track.predicted(at)[0] for track in self._live(state.tracks, at)]

    def _live(self, tracks: list[Track], at: float) -> list[Track]:
        return [track for track in tracks if at - track.last_seen <= self.max_age_s]

    def _candidate_pairs(
        self, tracks: list[Track], boxes: Sequence[np.ndarray], landmarks: Sequence[np.ndarray], at: float
    ) -> list[tuple[float, int, int]]:
        # Where each track is expected, and where it was last seen: a walker may stop, and a velocity measured over
        # two frames captured milliseconds apart can overshoot.
        expected = [(track.predicted(at), (track.box, track.landmarks)) for track in tracks]
        pairs = []
        for face, (box, points) in enumerate(zip(boxes, landmarks, strict=True)):
            box, points = np.asarray(box), np.asarray(points)
            for index, places in enumerate(expected):
                overlap = max(iou(box, place_box) for place_box, _ in places)
                if overlap >= self.min_iou:
                    pairs.append((1.0 + overlap, face, index))  # overlap first: it is the stronger evidence
                    continue
                near = max(landmark_similarity(points, place_points, place_box) for place_box, place_points in places)
                if near >= self.min_landmark_similarity:
                    pairs.append((near, face, index))
                    continue
                within = self._within_reach(tracks[index], box, at)
                if within > 0:
                    pairs.append((within * self.min_landmark_similarity, face, index))  # the weakest evidence
        return sorted(pairs, reverse=True)

    def _within_reach(self, track: Track, box: np.ndarray, at: float) -> float:
        """1 at the track's last place, falling to 0 at the farthest its person can have walked since (``max_speed``
        face widths per second), for a face of about the track's size; 0 beyond that or for another size."""
        width, track_width = float(box[2] - box[0]), float(track.box[2] - track.box[0])
        if not 0.67 <= width / max(track_width, 1.0) <= 1.5:
            return 0.0
        reach = self.max_speed * track_width * max(0.0, at - track.last_seen)
        shift = float(np.linalg.norm((box[:2] + box[2:]) / 2 - (track.box[:2] + track.box[2:]) / 2))
        return max(0.0, 1.0 - shift / reach) if reach > 0 else 0.0

    @staticmethod
    def _continue(track: Track, box: np.ndarray, points: np.ndarray, at: float) -> Track:
        box = np.asarray(box, float)
        if at > track.last_seen:
            centre_shift = (box[:2] + box[2:]) / 2 - (track.box[:2] + track.box[2:]) / 2
            track.velocity = centre_shift / (at - track.last_seen)
        track.box, track.landmarks = box, np.asarray(points, float)
        track.last_seen = max(track.last_seen, at)  # a replayed older frame must not turn the clock back
        track.frames += 1
        return track

    @staticmethod
    def _start(camera: str, state: _Camera, box: np.ndarray, points: np.ndarray, at: float) -> Track:
        started_ms = round(at * 1000)
        if started_ms == state.last_started_ms:  # several new faces in one frame
            state.started_in_that_ms += 1
            track_id = f"{camera}/t{started_ms}.{state.started_in_that_ms}"
        else:
            state.last_started_ms, state.started_in_that_ms = started_ms, 1
            track_id = f"{camera}/t{started_ms}"
        track = Track(track_id, box=np.asarray(box, float), landmarks=np.asarray(points, float), last_seen=at)
        state.tracks.append(track)
        return track

    def _camera(self, camera: str) -> _Camera:
        state = self._cameras.pop(camera, None) or _Camera()
        self._cameras[camera] = state  # most recently seen last, so the longest-idle camera is forgotten first
        while len(self._cameras) > self.max_cameras:
            self._cameras.pop(next(iter(self._cameras)))
        return state


@dataclass(frozen=True)
class BestFaces:
    """Which faces of a track are worth a 1:N search; a person walking past is searched a few times, not per frame.

    The first ``first_faces`` faces of a track of at least ``min_quality`` are searched whatever their quality, so
    that one track can meet the decision policy's ``min_agreeing_frames`` (keep ``first_faces`` at least as high);
    after them a face is searched only when its quality beats the best one searched so far by ``margin`` points;
    never more than ``max_faces`` in all.
    """

    min_quality: float = 10.0
    first_faces: int = 2
    margin: float = 10.0
    max_faces: int = 3

    def skip_reason(self, track: Track, quality: float) -> str | None:
        """Why this face of the track is not searched (a metric label), or None when it is worth a search."""
        if track.searched >= self.max_faces:
            return "track_searched_enough"
        if quality < self.min_quality:
            return "low_quality"
        if track.searched >= self.first_faces and quality < track.best_searched + self.margin:
            return "not_better"
        return None

    def select(self, track: Track, quality: float) -> str | None:
        """``skip_reason``, and when the face is worth a search, count it as searched for its track."""
        reason = self.skip_reason(track, quality)
        if reason is None:
            track.searched += 1
            track.best_searched = max(track.best_searched, quality)
        return reason
