"""The per-camera face tracker: walkers keep their track, people side by side get their own, tracks age out."""

from __future__ import annotations

import numpy as np

from sightline.detection.tracker import FaceTracker, iou


def face(x: float, y: float, size: float = 80.0) -> tuple[np.ndarray, np.ndarray]:
    box = np.array([x, y, x + size, y + size])
    points = np.array([[x + 0.3 * size, y + 0.4 * size], [x + 0.4 * size, y + 0.4 * size],
                       [x + 0.7 * size, y + 0.4 * size], [x + 0.6 * size, y + 0.4 * size],
                       [x + 0.5 * size, y + 0.65 * size]])  # fmt: skip
    return box, points


def frame(tracker: FaceTracker, t: float, *faces: tuple[np.ndarray, np.ndarray], camera: str = "cam") -> list[str]:
    return tracker.assign(camera, t, [f[0] for f in faces], [f[1] for f in faces])


def test_a_person_walking_past_is_one_track() -> None:
    tracker = FaceTracker()
    ids = {frame(tracker, i * 0.2, face(100 + 15 * i, 200))[0] for i in range(15)}
    assert ids == {"cam:t1"}


def test_two_people_side_by_side_keep_their_own_tracks_even_when_listed_in_another_order() -> None:
    tracker = FaceTracker()
    left, right = frame(tracker, 0.0, face(100, 200), face(400, 200))
    assert left != right
    swapped = frame(tracker, 0.2, face(410, 205), face(108, 203))
    assert swapped == [right, left]


def test_a_fast_walker_is_followed_by_landmarks_when_boxes_barely_overlap() -> None:
    tracker = FaceTracker(min_iou=0.3)
    first = frame(tracker, 0.0, face(100, 200))[0]
    second_box = face(150, 200)  # moved 50 px with an 80 px box: IoU 0.23
    assert iou(face(100, 200)[0], second_box[0]) < 0.3
    assert frame(tracker, 0.1, second_box)[0] == first


def test_tracks_end_after_max_age_and_cameras_are_independent() -> None:
    tracker = FaceTracker(max_age_s=1.0)
    first = frame(tracker, 0.0, face(100, 200))[0]
    assert frame(tracker, 0.5, face(100, 200), camera="other")[0] != first
    assert frame(tracker, 2.0, face(100, 200))[0] != first


def test_a_new_face_far_away_starts_a_new_track() -> None:
    tracker = FaceTracker()
    first = frame(tracker, 0.0, face(100, 200))[0]
    assert frame(tracker, 0.1, face(600, 50))[0] != first


def test_velocity_prediction_keeps_a_fast_walker_apart_from_a_newcomer_behind() -> None:
    tracker = FaceTracker()
    walker = [frame(tracker, i * 0.1, face(100 + 60 * i, 200))[0] for i in range(5)]
    assert set(walker) == {"cam:t1"}
    # Next frame: the walker is where the velocity says (400 px), and someone new appears where the walker was.
    ids = frame(tracker, 0.5, face(100, 200), face(400, 200))
    assert ids[1] == "cam:t1" and ids[0] != "cam:t1"
