"""The enrolment quality gate against real service processes: poor copies of a photo are rejected and name why."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageFilter

from sightline.common.rpc import channel
from sightline.tooling.localstack import LocalStack
from sightline.v1 import gallery_pb2, gallery_pb2_grpc


@pytest.fixture(scope="module")
def gallery(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[gallery_pb2_grpc.GalleryServiceStub]:
    with LocalStack(
        tmp_path_factory.mktemp("enrolment"), ports="auto", services=("detection", "embedding", "matching")
    ) as stack:
        stack.start(timeout=120)
        yield gallery_pb2_grpc.GalleryServiceStub(channel(stack.addresses["matching"]))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def enrolled_ids(gallery: gallery_pb2_grpc.GalleryServiceStub) -> list[str]:
    return [s.subject_id for s in gallery.ListSubjects(gallery_pb2.ListSubjectsRequest(page_size=100)).subjects]


def test_poor_copies_are_rejected_naming_the_failing_components(
    gallery: gallery_pb2_grpc.GalleryServiceStub, face_photos: Path
) -> None:
    photo = Image.open(face_photos / "obama.jpg").convert("RGB")
    blurred = png(photo.filter(ImageFilter.GaussianBlur(6)))
    small = png(photo.resize((photo.width // 6, photo.height // 6), Image.Resampling.LANCZOS))
    reply = gallery.Enroll(gallery_pb2.EnrollRequest(subject_id="poor", images=[blurred, small]), timeout=60)
    assert reply.templates_added == 0
    (blur_result, small_result) = reply.results
    assert not blur_result.accepted and not small_result.accepted
    assert blur_result.reason.startswith("quality too low: ") and "sharpness" in blur_result.reason
    assert "inter_eye_px" in small_result.reason and "< 40" in small_result.reason
    # The measured quality is still reported, so a client can show what to fix.
    assert 0 < small_result.quality.inter_eye_px < 40
    assert "poor" not in enrolled_ids(gallery)


def test_good_photo_is_accepted_and_bad_one_alongside_is_dropped(
    gallery: gallery_pb2_grpc.GalleryServiceStub, face_photos: Path
) -> None:
    original = (face_photos / "obama.jpg").read_bytes()
    blurred = png(Image.open(face_photos / "obama.jpg").convert("RGB").filter(ImageFilter.GaussianBlur(6)))
    reply = gallery.Enroll(gallery_pb2.EnrollRequest(subject_id="obama", images=[original, blurred]), timeout=60)
    assert [r.accepted for r in reply.results] == [True, False]
    assert reply.templates_added == 1 and not reply.results[0].reason
    assert reply.results[0].quality.score > 80
    assert "obama" in enrolled_ids(gallery)
