"""Focused scanning of CCTV frames: per-camera scan settings, regions of interest, motion, tracks and rolling tiles,
on real faces shrunk into 1080p frames and on synthetic walkers (sightline.tooling.walkers), with the real detector."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from test_small_faces import detector, found, obama, street, with_faces  # noqa: F401 (detector, obama: fixtures)

from sightline.common.models import regions
from sightline.common.models.blazeface import FaceDetector
from sightline.detection import motion
from sightline.detection.scan_plan import ScanPlanner, _tiles
from sightline.detection.settings import CameraScan, DetectionSettings
from sightline.detection.tracker import FaceTracker
from sightline.tooling.scenes import FaceLibrary
from sightline.tooling.walkers import Walker, faces_of, video

WIDTH, HEIGHT = 1920, 1080
STREET = CameraScan(min_face_px=40, roi=None, tile_px=480)


@pytest.fixture(scope="module")
def library() -> FaceLibrary:
    return FaceLibrary()


def test_each_camera_may_set_its_own_scan() -> None:
    settings = DetectionSettings(
        cctv_min_face_px=40,
        cameras={"lobby": {"min_face_px": 64, "roi": [[0, 0.3, 1, 1]]}, "portraits": {"min_face_px": 0, "tile_px": 0}},
    )
    assert settings.camera_scan("street-1") == CameraScan(40, None, settings.cctv_tile_px)
    assert settings.camera_scan("lobby") == CameraScan(64, [(0, 0.3, 1, 1)], settings.cctv_tile_px)
    assert settings.camera_scan("portraits") == CameraScan(0, None, 0)


@pytest.mark.parametrize(
    "camera",
    [{"roi": [[0.5, 0, 0.4, 1]]}, {"roi": [[0, 0, 1.5, 1]]}, {"roi": []}, {"tile": 320}, {"min_face_px": -1}],
)
def test_a_bad_camera_scan_is_refused_at_start(camera: dict) -> None:
    with pytest.raises(ValidationError):
        DetectionSettings(cameras={"cam": camera})


def test_regions_merge_only_when_that_saves_pixels() -> None:
    assert regions.merged([(0, 0, 100, 100), (50, 0, 150, 100)]) == [(0, 0, 150, 100)]
    apart = [(0, 0, 100, 100), (500, 500, 600, 600)]
    assert sorted(regions.merged(apart)) == apart
    corner = [(0, 0, 400, 40), (360, 0, 400, 400)]  # an L: its bounding box is mostly empty
    assert sorted(regions.merged(corner)) == corner
    fitted = regions.fitted((10, 10, 75, 40), 100, 100, 32)
    assert (fitted[2] - fitted[0]) % 32 == 0 and (fitted[3] - fitted[1]) % 32 == 0
    assert fitted[0] <= 10 and fitted[2] >= 75 and 0 <= fitted[0] and fitted[2] <= 100


def test_motion_is_where_the_picture_changed() -> None:
    before = street(1)
    after = before.copy()
    after[400:520, 900:990] = 255 - after[400:520, 900:990]  # something moved there
    assert motion.changed_regions(None, motion.thumbnail(after), WIDTH, HEIGHT) is None  # first frame: everywhere
    moved = motion.changed_regions(motion.thumbnail(before), motion.thumbnail(after), WIDTH, HEIGHT)
    assert moved is not None and len(moved) == 1
    x1, y1, x2, y2 = moved[0]
    assert x1 <= 900 and y1 <= 400 and x2 >= 990 and y2 >= 520 and (x2 - x1) * (y2 - y1) < 200 * 200
    noisy = np.clip(before + np.random.default_rng(0).normal(0, 3, before.shape), 0, 255).astype(np.uint8)
    assert motion.changed_regions(motion.thumbnail(before), motion.thumbnail(noisy), WIDTH, HEIGHT) == []
    assert motion.changed_regions(motion.thumbnail(before), motion.thumbnail(255 - before), WIDTH, HEIGHT) is None


def test_faces_outside_the_region_of_interest_are_ignored(detector: FaceDetector, obama: np.ndarray) -> None:
    frame, boxes = with_faces(obama, 64, seed=2)  # faces at x 200, 700, 1200, 1500
    right_half = [(960, 0, WIDTH, HEIGHT)]
    faces = [d.box for d in detector.detect(frame, 40, roi=right_half)]
    assert all((box[0] + box[2]) / 2 >= 960 for box in faces)
    assert [found(faces, box) for box in boxes] == [False, False, True, True]


def test_a_focused_scan_finds_small_faces_only_where_it_looks(detector: FaceDetector, obama: np.ndarray) -> None:
    frame, boxes = with_faces(obama, 44, seed=4)
    around_first = [tuple(int(v) for v in regions.grown(boxes[0], 60))]
    faces = [d.box for d in detector.detect(frame, 40, focus=around_first)]
    assert [found(faces, box) for box in boxes] == [True, False, False, False]
    everywhere = [d.box for d in detector.detect(frame, 40)]
    assert all(found(everywhere, box) for box in boxes)


def test_a_camera_scan_follows_walkers_and_keeps_a_still_face(detector: FaceDetector, library: FaceLibrary) -> None:
    """Frame 0 is scanned in full; later frames only where people move, around tracks and one tile in turn: a
    walker is found in every frame it is wholly in, and a person standing still is kept by the track around it."""
    obama, biden = faces_of(library, "obama.jpg")[0], faces_of(library, "biden.jpg")[0]
    walkers = [
        Walker("walker", obama, 0, 24, (300, 400), (1500, 500), (48, 72)),
        Walker("still", biden, 0, 24, (1400, 850), (1400, 850), (50, 50)),
    ]
    planner, tracker = ScanPlanner(), FaceTracker()
    seen: dict[str, list[int]] = {"walker": [], "still": []}
    shares = []
    for frame in video(library, walkers, 25, background=0):
        at = frame.index * 0.1
        areas = planner.areas("cam", STREET, frame.image, tracker.expected_boxes("cam", at))
        shares.append(areas.scanned_share(WIDTH, HEIGHT))
        faces = detector.detect(frame.image, areas.min_face_px, areas.roi, areas.focus)
        tracker.tracks_of("cam", at, [np.array(f.box) for f in faces], [f.keypoints[:5] for f in faces])
        for label, box in frame.faces:
            if found([f.box for f in faces], box):
                seen[label].append(frame.index)
    assert shares[0] == 1.0 and max(shares[1:]) < 0.35, shares
    assert seen == {"walker": list(range(25)), "still": list(range(25))}, seen


def test_with_nothing_moving_and_no_track_each_tile_comes_round(detector: FaceDetector, obama: np.ndarray) -> None:
    """A face that neither moves nor has a track (it was missed, or just turned to the camera) is scanned closely
    when its tile's turn comes (or a neighbour's, whose margin reaches it): in every round of the tiles."""
    frame, boxes = with_faces(obama, 44, seed=5)
    planner = ScanPlanner()
    tiles = _tiles(WIDTH, HEIGHT, STREET.tile_px)
    rounds = 2
    found_in = []
    for _ in range(1 + rounds * len(tiles)):
        areas = planner.areas("cam", STREET, frame, [])
        faces = [d.box for d in detector.detect(frame, areas.min_face_px, areas.roi, areas.focus)]
        found_in.append(found(faces, boxes[0]))
    assert found_in[0], "the first frame of a camera is scanned in full"
    later = found_in[1:]
    assert all(any(later[r * len(tiles) : (r + 1) * len(tiles)]) for r in range(rounds)), found_in
    assert sum(later) < len(later) / 2, "only the frames whose tiles reach the face look at it closely"
