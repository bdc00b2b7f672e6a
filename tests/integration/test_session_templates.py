"""Session-scoped templates in the gallery: the ``session-`` prefix is capture's, and such a template is verified 1:1
against its session's frames but never returned by a 1:N search (GalleryService.Search, the stream search).

A matching replica runs in this process (its gallery inspected directly for the stream search) behind token
authentication, with two principals: an officer (enroller and operator) and capture's own service principal. It
calls real detection and embedding services (separate processes, real models) on real photos.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_watchlists import face_services  # noqa: F401 - a fixture, shared

from sightline.common import codec
from sightline.common.audit import AuditLog, AuditSettings
from sightline.common.auth import (
    SERVICE_CALLER_ROLES,
    AccessPolicy,
    Principal,
    Role,
    hash_token,
    new_token,
    service_principal,
)
from sightline.common.rpc import GrpcServer, channel
from sightline.common.stage import InputEvent
from sightline.matching.audit_trail import GalleryAudit
from sightline.matching.gallery import Gallery
from sightline.matching.index import SearchIndex
from sightline.matching.peers import FaceClient
from sightline.matching.service import GalleryServicer, Matcher, open_gallery
from sightline.matching.settings import MatchingSettings
from sightline.matching.templates import generate_key
from sightline.matching.watchlists import WatchlistServicer
from sightline.tooling.localstack import LocalStack
from sightline.v1 import events_pb2, gallery_pb2, gallery_pb2_grpc, types_pb2

OFFICER_TOKEN, CAPTURE_TOKEN = new_token(), new_token()
SESSION_SUBJECT = "session-3f2a"


@dataclass
class Replica:
    gallery: Gallery
    faces: FaceClient
    address: str  # with token authentication
    open_address: str  # the same gallery without authentication (dev mode)

    def galleries(self, token: str = "") -> gallery_pb2_grpc.GalleryServiceStub:
        return gallery_pb2_grpc.GalleryServiceStub(channel(self.address if token else self.open_address, token=token))


@pytest.fixture(scope="module")
def replica(face_services: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    folder = tmp_path_factory.mktemp("session-templates")
    settings = MatchingSettings(
        template_key=generate_key(),
        database_url=f"sqlite:///{folder / 'gallery.db'}",
        detection_addr=face_services.addresses["detection"],
        embedding_addr=face_services.addresses["embedding"],
    )
    gallery = open_gallery(settings)
    faces = FaceClient(settings.detection_addr, settings.embedding_addr, settings.peer_timeout_s)
    audit = AuditLog.open_configured(settings=AuditSettings(database_url=f"sqlite:///{folder / 'audit.db'}"))
    principals = [
        Principal("officer-1", frozenset({Role.ENROLLER, Role.OPERATOR}), hash_token(OFFICER_TOKEN)),
        Principal(service_principal("capture"), SERVICE_CALLER_ROLES["capture"], hash_token(CAPTURE_TOKEN)),
    ]
    servers = [GrpcServer("127.0.0.1", 0, access=access) for access in (AccessPolicy(principals), None)]
    for server in servers:
        server.add(GalleryServicer(gallery, faces, settings, GalleryAudit(audit)))
        server.add(WatchlistServicer(gallery, GalleryAudit(audit)))
        server.start()
    yield Replica(gallery, faces, *(f"127.0.0.1:{server.port}" for server in servers))
    for server in servers:
        server.stop(0)
    gallery.close()
    audit.close()


def enrol(galleries: gallery_pb2_grpc.GalleryServiceStub, subject_id: str, image: bytes, *watchlists: str) -> None:
    request = gallery_pb2.EnrollRequest(subject_id=subject_id, images=[image], watchlists=watchlists)
    reply = galleries.Enroll(request, timeout=60)
    assert reply.templates_added == 1, reply


def candidates(galleries: gallery_pb2_grpc.GalleryServiceStub, image: bytes, watchlist: str = "") -> list[str]:
    request = gallery_pb2.SearchRequest(probe_image=image, top_k=10, watchlist=watchlist)
    return [c.subject_id for c in galleries.Search(request, timeout=60).candidates]


def embedded_frame(replica: Replica, image: bytes, claim: str, watchlists: list[str]) -> InputEvent:
    """The embedding stage's event for a gate frame of ``image`` verified against ``claim``."""
    probe = replica.faces.largest_face(image)
    frame = types_pb2.FrameRef(
        frame_id="gate-1:s:1",
        source_id="gate-1",
        sequence=1,
        captured_at=codec.now(),
        purpose=types_pb2.PURPOSE_ECHANNEL,
        session_id="3f2a",
        claim_subject_id=claim,
        watchlists=watchlists,
    )
    face = events_pb2.FaceEmbedding(
        face_index=0, box=probe.face.box, quality=probe.face.quality, vector=probe.vector.tolist()
    )
    value = events_pb2.FacesEmbedded(frame=frame, faces=[face]).SerializeToString()
    return InputEvent(b"gate-1", value, "sightline.embeddings.v1", 0, 1)


def test_only_capture_may_enrol_a_session_subject(replica: Replica, face_photos: Path) -> None:
    image = (face_photos / "biden.jpg").read_bytes()
    with pytest.raises(grpc.RpcError) as refused:
        enrol(replica.galleries(OFFICER_TOKEN), "session-x", image)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (
        "subject id 'session-x': ids starting with 'session-' are reserved for the "
        "templates of e-channel gate sessions, enrolled by service:capture only; "
        "choose another id"
    )
    assert replica.gallery.store.get_subject("session-x") is None
    enrol(replica.galleries(CAPTURE_TOKEN), "session-by-capture", image)
    enrol(replica.galleries(), "session-dev-mode", image)  # authentication off: nobody to tell apart
    enrol(replica.galleries(OFFICER_TOKEN), "sessions-2026", image)  # only the exact prefix is reserved
    for subject_id in ("session-by-capture", "session-dev-mode", "sessions-2026"):
        replica.galleries(OFFICER_TOKEN).DeleteSubject(gallery_pb2.DeleteSubjectRequest(subject_id=subject_id))


def test_a_session_template_is_verified_one_to_one_but_never_a_search_candidate(
    replica: Replica, face_photos: Path
) -> None:
    officer = replica.galleries(OFFICER_TOKEN)
    enrol(replica.galleries(CAPTURE_TOKEN), SESSION_SUBJECT, (face_photos / "obama.jpg").read_bytes())
    enrol(officer, "obama-enrolled", (face_photos / "obama3.jpg").read_bytes(), "stop-z")
    # Even on a watchlist (an officer may put it there), the session subject stays out of searches.
    gallery_pb2_grpc.WatchlistServiceStub(channel(replica.address, token=OFFICER_TOKEN)).AddMembers(
        gallery_pb2.AddMembersRequest(watchlist="stop-z", subject_ids=[SESSION_SUBJECT]), timeout=10
    )
    probe = (face_photos / "obama2.jpg").read_bytes()

    verified = officer.Verify(gallery_pb2.VerifyRequest(subject_id=SESSION_SUBJECT, probe_image=probe), timeout=60)
    assert verified.verification.subject_found and verified.verification.verified

    assert candidates(officer, probe) == ["obama-enrolled"]  # the same face, enrolled as an ordinary subject, is found
    assert candidates(officer, probe, "stop-z") == ["obama-enrolled"]

    matcher = Matcher(replica.gallery, 10)
    [output] = matcher.process_event(embedded_frame(replica, probe, SESSION_SUBJECT, ["stop-z"]))
    [face] = events_pb2.MatchResult.FromString(output.value).faces
    assert face.verification.subject_found and face.verification.verified
    assert [c.subject_id for c in face.candidates] == ["obama-enrolled"]
    [output] = matcher.process_event(embedded_frame(replica, probe, SESSION_SUBJECT, []))
    assert [c.subject_id for c in events_pb2.MatchResult.FromString(output.value).faces[0].candidates] == [
        "obama-enrolled"
    ]


def test_the_index_masks_verify_only_subjects_out_of_every_search() -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(3, 128)).astype(np.float32)
    index = SearchIndex()
    index.add(1, "traveller", vectors[0], ["stop-a"])
    index.add(2, "session-1", vectors[1], ["stop-a"])
    index.add(3, "session-1", vectors[2])
    for probe in vectors:
        assert [c.subject_id for c in index.search(probe, top_k=3)[0]] == ["traveller"]
        assert [c.subject_id for c in index.search(probe, top_k=3, watchlists=["stop-a"])[0]] == ["traveller"]
    assert index.verify(vectors[2], "session-1") == pytest.approx(0.0, abs=1e-3)
    index.remove_subject("traveller")
    assert index.search(vectors[0], top_k=3) == [[]]
    index.remove_subject("session-1")
    index.add(4, "traveller", vectors[0])
    assert [c.subject_id for c in index.search(vectors[1], top_k=3)[0]] == ["traveller"]
