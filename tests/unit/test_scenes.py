"""The synthetic detection scenes (sightline.tooling.scenes): repeatable, truthful and free of unannotated faces."""

from __future__ import annotations

import numpy as np
import pytest

from sightline.tooling.scenes import (
    FACE_WIDTHS,
    UNANNOTATED_FACES,
    FaceLibrary,
    background_regions,
    context_crop,
    make_scene,
    scenes,
)

FULL_HD = (1920, 1080)


@pytest.fixture(scope="module")
def library() -> FaceLibrary:
    return FaceLibrary()


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_same_seed_same_frames_other_seed_other_frames(library: FaceLibrary) -> None:
    for index in range(3):  # one of each background kind
        first = make_scene(library, FULL_HD, 48, index, seed=7)
        again = make_scene(library, FULL_HD, 48, index, seed=7)
        assert np.array_equal(first.image, again.image)
        assert first.faces == again.faces
        other = make_scene(library, FULL_HD, 48, index, seed=8)
        assert not np.array_equal(first.image, other.image)


def test_a_frame_does_not_depend_on_the_frames_made_before_it(library: FaceLibrary) -> None:
    series = list(scenes(library, FULL_HD, [40, 64], frames_per_width=2, face_free_frames=1, seed=3))
    alone = make_scene(library, FULL_HD, 64, 1, seed=3)
    assert np.array_equal(series[3].image, alone.image)
    assert series[3].faces == alone.faces


@pytest.mark.parametrize("size", [FULL_HD, (3840, 2160)])
def test_truth_boxes_inside_the_frame_of_the_asked_width_and_apart(library: FaceLibrary, size: tuple[int, int]) -> None:
    width, height = size
    for face_px in FACE_WIDTHS:
        for index in range(3 if width < 3840 else 1):
            scene = make_scene(library, size, face_px, index, seed=1)
            assert scene.image.shape == (height, width, 3)
            assert scene.image.dtype == np.uint8
            assert len(scene.faces) >= 4, "the frame should hold several faces"
            for x1, y1, x2, y2 in scene.faces:
                assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
                assert abs((x2 - x1) - face_px) <= 1.0
                assert abs((y2 - y1) - face_px) <= 0.15 * face_px + 1  # dlib boxes are near squares
            for i, a in enumerate(scene.faces):
                for b in scene.faces[i + 1 :]:
                    assert not _overlap(a, b)


def test_face_free_frames_have_no_truth(library: FaceLibrary) -> None:
    for index in range(6):
        scene = make_scene(library, FULL_HD, None, index, seed=2)
        assert scene.faces == []
        assert scene.face_px is None
    assert {make_scene(library, FULL_HD, None, i).background for i in range(3)} == {"street", "texture", "photo"}


def test_background_crops_never_include_an_annotated_face(library: FaceLibrary) -> None:
    tiles = []
    for index in range(2, 30, 3):  # the photo-background frames
        for face_px in (None, 32):
            scene = make_scene(library, FULL_HD, face_px, index, seed=5)
            assert scene.background == "photo"
            tiles += scene.tiles
    assert tiles
    for photo, tile in tiles:
        assert not any(_overlap(tile, box) for box in library.boxes[photo]), (photo, tile)
        assert not any(_overlap(tile, other) for other in UNANNOTATED_FACES.get(photo, [])), (photo, tile)
        assert any(
            r[0] <= tile[0] and r[1] <= tile[1] and tile[2] <= r[2] and tile[3] <= r[3] for r in library.regions[photo]
        )
    for photo, regions in library.regions.items():
        assert photo not in {"obama.jpg", "biden.jpg"}  # portraits give faces only
        for region in regions:
            assert not any(_overlap(region, box) for box in library.boxes[photo])


def test_background_regions_keep_clear_of_faces() -> None:
    boxes = [(200.0, 100.0, 240.0, 140.0), (300.0, 120.0, 340.0, 160.0)]
    regions = background_regions(boxes, (400, 500))
    assert regions
    for region in regions:
        for x1, y1, x2, y2 in boxes:
            pad = 0.5 * (x2 - x1)
            assert not _overlap(region, (x1 - pad, y1 - pad, x2 + pad, y2 + pad))
    assert background_regions(boxes, (400, 500), exclude=[(0, 0, 500, 400)]) == []


def test_face_crops_leave_neighbouring_faces_out(library: FaceLibrary) -> None:
    assert len(library.faces) >= 30
    for face in library.faces:
        others = [b for b in library.boxes[face.photo] if b != face.box]
        others += [tuple(map(float, r)) for r in UNANNOTATED_FACES.get(face.photo, [])]
        assert not any(_overlap(face.crop, other) for other in others)
        x1, y1, x2, y2 = face.crop
        assert x1 <= face.box[0] and y1 <= face.box[1] and face.box[2] <= x2 and face.box[3] <= y2
    # Two faces side by side: the crop of one is cut short of the other, or refused when there is no room.
    crop = context_crop((100.0, 100.0, 140.0, 140.0), [(160.0, 100.0, 200.0, 140.0)], (400, 400))
    assert crop is not None and crop[2] <= 160
    assert context_crop((100.0, 100.0, 140.0, 140.0), [(142.0, 100.0, 182.0, 140.0)], (400, 400)) is None
