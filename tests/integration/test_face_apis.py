"""The request path against real service processes: detection, embedding and gallery gRPC APIs on 127.0.0.1."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from sightline.common.rpc import channel
from sightline.tooling.localstack import LocalStack
from sightline.v1 import (
    detection_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    gallery_pb2,
    gallery_pb2_grpc,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    run_dir = tmp_path_factory.mktemp("apis")
    # Matching audits every gallery call: into this run's own audit log, never the user's.
    audit = {"SIGHTLINE_AUDIT_DATABASE_URL": f"sqlite:///{run_dir / 'audit.db'}"}
    with LocalStack(run_dir, ports="auto", services=("detection", "embedding", "matching"), env=audit) as running:
        running.start(timeout=120)
        yield running


@pytest.fixture(scope="module")
def detection(stack: LocalStack) -> detection_pb2_grpc.DetectionServiceStub:
    return detection_pb2_grpc.DetectionServiceStub(channel(stack.addresses["detection"]))


@pytest.fixture(scope="module")
def embedding(stack: LocalStack) -> embedding_pb2_grpc.EmbeddingServiceStub:
    return embedding_pb2_grpc.EmbeddingServiceStub(channel(stack.addresses["embedding"]))


@pytest.fixture(scope="module")
def gallery(stack: LocalStack) -> gallery_pb2_grpc.GalleryServiceStub:
    return gallery_pb2_grpc.GalleryServiceStub(channel(stack.addresses["matching"]))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_detect_one_face_with_landmarks_quality_and_chip(detection, face_photos: Path) -> None:  # type: ignore[no-untyped-def]
    reply = detection.Detect(
        detection_pb2.DetectRequest(image=(face_photos / "obama.jpg").read_bytes(), include_chips=True)
    )
    assert len(reply.faces) == 1
    face = reply.faces[0]
    assert 0 < face.box.x1 < face.box.x2 <= reply.width and 0 < face.box.y1 < face.box.y2 <= reply.height
    assert len(face.landmarks) == 5 and len(face.detector_keypoints) == 6
    assert all(face.box.x1 <= p.x <= face.box.x2 and face.box.y1 <= p.y <= face.box.y2 for p in face.landmarks)
    assert face.chip_size == 150 and len(face.chip) == 150 * 150 * 3
    assert face.quality.inter_eye_px > 30 and 0 < face.quality.score <= 100


def test_detect_handles_rgba_and_grayscale(detection, face_photos: Path) -> None:  # type: ignore[no-untyped-def]
    rgba = detection.Detect(detection_pb2.DetectRequest(image=(face_photos / "32bit.png").read_bytes()))
    grey = png(Image.open(face_photos / "obama.jpg").convert("L"))
    assert len(rgba.faces) >= 1
    assert len(detection.Detect(detection_pb2.DetectRequest(image=grey)).faces) == 1


@pytest.mark.parametrize("payload", [b"", b"not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 100])
def test_detect_bad_image_is_invalid_argument(detection, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        detection.Detect(detection_pb2.DetectRequest(image=payload))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details()


def test_embed_chips_and_reject_wrong_sizes(detection, embedding, face_photos: Path) -> None:  # type: ignore[no-untyped-def]
    faces = [
        detection.Detect(detection_pb2.DetectRequest(image=(face_photos / n).read_bytes(), include_chips=True)).faces[0]
        for n in ("obama.jpg", "obama2.jpg", "biden.jpg")
    ]
    reply = embedding.Embed(
        embedding_pb2.EmbedRequest(chips=[embedding_pb2.FaceChip(rgb=f.chip, size=f.chip_size) for f in faces])
    )
    vectors = np.array([d.vector for d in reply.descriptors])
    assert vectors.shape == (3, 128) and reply.model_name
    same, different = np.linalg.norm(vectors[0] - vectors[1]), np.linalg.norm(vectors[0] - vectors[2])
    assert same < 0.6 < different
    with pytest.raises(grpc.RpcError) as caught:
        embedding.Embed(embedding_pb2.EmbedRequest(chips=[embedding_pb2.FaceChip(rgb=b"\x00" * 100, size=150)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_gallery_enrol_verify_search_list_delete(gallery, face_photos: Path) -> None:  # type: ignore[no-untyped-def]
    photo = lambda name: (face_photos / name).read_bytes()  # noqa: E731
    enrolled = gallery.Enroll(
        gallery_pb2.EnrollRequest(subject_id="obama", images=[photo("obama.jpg")], watchlists=["wl"])
    )
    assert enrolled.templates_added == 1 and enrolled.results[0].accepted
    gallery.Enroll(gallery_pb2.EnrollRequest(subject_id="biden", images=[photo("biden.jpg")]))

    same = gallery.Verify(gallery_pb2.VerifyRequest(subject_id="obama", probe_image=photo("obama2.jpg")))
    other = gallery.Verify(gallery_pb2.VerifyRequest(subject_id="biden", probe_image=photo("obama2.jpg")))
    assert same.verification.verified and same.verification.distance < 0.6
    assert not other.verification.verified and other.verification.distance > 0.6

    found = gallery.Search(gallery_pb2.SearchRequest(probe_image=photo("obama3.jpg"), top_k=5))
    assert [c.subject_id for c in found.candidates][0] == "obama"
    assert list(found.candidates[0].watchlists) == ["wl"]
    on_list = gallery.Search(gallery_pb2.SearchRequest(probe_image=photo("obama3.jpg"), watchlist="wl"))
    assert [c.subject_id for c in on_list.candidates] == ["obama"]

    listed = gallery.ListSubjects(gallery_pb2.ListSubjectsRequest(page_size=1))
    rest = gallery.ListSubjects(gallery_pb2.ListSubjectsRequest(page_size=1, page_token=listed.next_page_token))
    assert [s.subject_id for s in listed.subjects] + [s.subject_id for s in rest.subjects] == ["biden", "obama"]
    assert not rest.next_page_token

    deleted = gallery.DeleteSubject(gallery_pb2.DeleteSubjectRequest(subject_id="biden"))
    assert deleted.deleted and deleted.templates_removed == 1
    after = gallery.Search(gallery_pb2.SearchRequest(probe_image=photo("biden.jpg"), top_k=5))
    assert "biden" not in [c.subject_id for c in after.candidates]


def test_gallery_rejects_bad_requests_clearly(gallery, face_photos: Path) -> None:  # type: ignore[no-untyped-def]
    blank = png(Image.new("RGB", (320, 240), (90, 90, 90)))
    reply = gallery.Enroll(gallery_pb2.EnrollRequest(subject_id="nobody", images=[blank, b"junk"]))
    assert reply.templates_added == 0
    assert [r.reason for r in reply.results][0] == "no face found in the image"
    assert "not a recognised image format" in reply.results[1].reason
    assert "nobody" not in [s.subject_id for s in gallery.ListSubjects(gallery_pb2.ListSubjectsRequest()).subjects]
    for bad in (
        gallery_pb2.EnrollRequest(subject_id="", images=[blank]),
        gallery_pb2.EnrollRequest(subject_id="x y", images=[blank]),
        gallery_pb2.EnrollRequest(subject_id="ok"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            gallery.Enroll(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        gallery.Verify(
            gallery_pb2.VerifyRequest(subject_id="ghost", probe_image=(face_photos / "obama.jpg").read_bytes())
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_every_service_exports_the_shared_metric_names(stack: LocalStack, detection, face_photos: Path) -> None:  # type: ignore[no-untyped-def]
    import urllib.request

    detection.Detect(detection_pb2.DetectRequest(image=(face_photos / "obama.jpg").read_bytes()))
    for name, port in stack.metrics_ports.items():
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for metric in (
            "sightline_events_processed_total",
            "sightline_events_deadlettered_total",
            "sightline_stage_latency_seconds",
            "sightline_model_inference_seconds",
        ):
            assert f"# TYPE {metric}" in body, f"{name} does not export {metric}"
    detection_metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['detection']}/metrics").read()
    assert (
        b'sightline_model_inference_seconds_count{model="detector+landmarks",service="detection"}' in detection_metrics
    )
    matching_metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['matching']}/metrics").read()
    assert b"sightline_gallery_templates" in matching_metrics
