"""The per-camera face tracker: walkers keep their track, people side by side get their own, tracks age out; and the
best-quality selection of the faces of a track that are worth a search."""

from __future__ import annotations

import numpy as np

from sightline.detection.tracker import BestFaces, FaceTracker, Track, iou


def face(x: float, y: float, size: float = 80.0) -> tuple[np.ndarray, np.ndarray]:
    box = np.array([x, y, x + size, y + size])
    points = np.array(
        [
            [x + 0.3 * size, y + 0.4 * size],
            [x + 0.4 * size, y + 0.4 * size],
            [x + 0.7 * size, y + 0.4 * size],
            [x + 0.6 * size, y + 0.4 * size],
            [x + 0.5 * size, y + 0.65 * size],
        ]
    )
    return box, points


def frame(tracker: FaceTracker, t: float, *faces: tuple[np.ndarray, np.ndarray], camera: str = "cam") -> list[str]:
    return tracker.assign(camera, t, [f[0] for f in faces], [f[1] for f in faces])


def test_a_person_walking_past_is_one_track() -> None:
    tracker = FaceTracker()
    ids = {frame(tracker, 12.5 + i * 0.2, face(100 + 15 * i, 200))[0] for i in range(15)}
    assert ids == {"cam/t12500"}  # the camera and the capture time of the track's first face, in ms


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
    assert len(set(walker)) == 1
    # Next frame: the walker is where the velocity says (400 px), and someone new appears where the walker was.
    ids = frame(tracker, 0.5, face(100, 200), face(400, 200))
    assert ids[1] == walker[0] and ids[0] != walker[0]


def test_a_walker_who_stops_keeps_the_track_although_the_velocity_said_otherwise() -> None:
    tracker = FaceTracker()
    first = frame(tracker, 0.0, face(100, 200))[0]
    assert frame(tracker, 0.01, face(110, 200))[0] == first  # 1000 px/s measured over 10 ms
    assert frame(tracker, 0.5, face(112, 201))[0] == first  # the prediction is ~500 px off; the last box is not


def test_faces_new_in_the_same_frame_get_distinct_ids_and_a_replay_gets_the_same_ones() -> None:
    ids = frame(FaceTracker(), 3.0, face(100, 200), face(400, 200), face(700, 200))
    assert ids == ["cam/t3000", "cam/t3000.2", "cam/t3000.3"]
    assert frame(FaceTracker(), 3.0, face(100, 200), face(400, 200), face(700, 200)) == ids


def test_a_change_of_frame_size_ends_the_cameras_tracks() -> None:
    tracker = FaceTracker()
    first = tracker.assign("cam", 0.0, *zip(face(100, 200)), size=(480, 640))[0]
    assert tracker.assign("cam", 0.1, *zip(face(102, 200)), size=(480, 640))[0] == first
    assert tracker.assign("cam", 0.2, *zip(face(104, 200)), size=(1080, 1920))[0] != first


# --- best-quality selection --------------------------------------------------------------------------------------


def searched(rule: BestFaces, qualities: list[float]) -> list[str | None]:
    """The selection's verdict on each face of one track, in order (None: searched)."""
    track = Track("cam/t0", np.zeros(4), np.zeros((5, 2)), 0.0)
    return [rule.select(track, quality) for quality in qualities]


def test_a_steady_track_is_searched_on_its_first_faces_only() -> None:
    verdicts = searched(BestFaces(min_quality=10, first_faces=2, margin=10, max_faces=3), [60, 61, 62, 65, 59, 64])
    assert verdicts == [None, None, "not_better", "not_better", "not_better", "not_better"]


def test_a_face_clearly_better_than_the_best_searched_is_searched_up_to_the_limit() -> None:
    verdicts = searched(BestFaces(min_quality=10, first_faces=2, margin=10, max_faces=3), [40, 35, 49, 50, 70, 95])
    assert verdicts == [None, None, "not_better", None, "track_searched_enough", "track_searched_enough"]


def test_faces_under_the_minimum_quality_are_never_searched_and_do_not_count() -> None:
    verdicts = searched(BestFaces(min_quality=30, first_faces=2, margin=10, max_faces=3), [5, 12, 29, 31, 33, 20])
    assert verdicts == ["low_quality", "low_quality", "low_quality", None, None, "low_quality"]


def test_the_selection_is_kept_per_track() -> None:
    rule = BestFaces(min_quality=10, first_faces=1, margin=10, max_faces=2)
    tracker = FaceTracker()
    left, right = tracker.tracks_of("cam", 0.0, *zip(face(100, 200), face(400, 200), strict=True))
    assert [rule.select(left, 50), rule.select(right, 50)] == [None, None]
    left_again, right_again = tracker.tracks_of("cam", 0.1, *zip(face(102, 200), face(402, 200), strict=True))
    assert left_again is left and right_again is right
    assert [rule.select(left_again, 55), rule.select(right_again, 70)] == ["not_better", None]


def test_a_small_face_crossing_the_view_at_5_fps_keeps_its_track() -> None:
    """A 50 px face walking 1.4 m/s across a street camera's view moves about 1.6 face widths between frames at 5
    fps: no overlap and no landmark proximity, but within reach of a walking person, and the size is kept."""
    tracker = FaceTracker()
    walker = {frame(tracker, i * 0.2, face(100 + 80 * i, 300, size=50))[0] for i in range(8)}
    assert len(walker) == 1, walker
    assert frame(tracker, 1.6, face(740, 300, size=50), face(300, 700, size=50))[1] not in walker  # out of reach
    assert frame(tracker, 1.8, face(820, 300, size=120))[0] not in walker  # far too large to be the same face
