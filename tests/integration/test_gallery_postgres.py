"""The matching service with its gallery in PostgreSQL: enrolment and verification through the real gRPC API,
and a second replica sharing the database sees the first one's enrolments."""

from __future__ import annotations

from pathlib import Path

import pytest

from sightline.common.rpc import channel
from sightline.tooling.localstack import LocalStack
from sightline.v1 import gallery_pb2, gallery_pb2_grpc

pytestmark = pytest.mark.postgres


def test_gallery_on_postgres_enrols_verifies_and_survives_a_restart(
    postgres_url: str, tmp_path: Path, face_photos: Path, models_dir: Path
) -> None:
    env = {"SIGHTLINE_MATCHING_DATABASE_URL": postgres_url}
    services = ("detection", "embedding", "matching")
    with LocalStack(tmp_path / "a", ports="auto", services=services, env=env) as stack:
        stack.start(timeout=120)
        gallery = gallery_pb2_grpc.GalleryServiceStub(channel(stack.addresses["matching"]))
        reply = gallery.Enroll(
            gallery_pb2.EnrollRequest(subject_id="obama", images=[(face_photos / "obama.jpg").read_bytes()])
        )
        assert reply.templates_added == 1
    # A new stack (new matching process, new template key file in a new run dir would not decrypt: reuse the key).
    key = (tmp_path / "a" / "template.key").read_text().strip()
    with LocalStack(
        tmp_path / "b", ports="auto", services=services, env={**env, "SIGHTLINE_MATCHING_TEMPLATE_KEY": key}
    ) as stack:
        stack.start(timeout=120)
        gallery = gallery_pb2_grpc.GalleryServiceStub(channel(stack.addresses["matching"]))
        verified = gallery.Verify(
            gallery_pb2.VerifyRequest(subject_id="obama", probe_image=(face_photos / "obama2.jpg").read_bytes())
        )
        assert verified.verification.verified
