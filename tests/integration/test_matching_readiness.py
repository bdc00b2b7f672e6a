"""A matching replica matches only while it is in step with the gallery database, on a real SQLite file made
unreachable (another connection holds it locked, as a stalled or lost database server would), a real gRPC server's
health, the real broker for erasure notices and a real audit log.

- cut off from the database, the replica stops matching: searches are UNAVAILABLE, stream frames fail with a
  transient error (retried, not dead-lettered), health is NOT_SERVING while the liveness name stays SERVING;
- an erasure notice on the broker drops the subject from a replica at once, database or not, and that replica
  refuses to match until the database confirms the erasure;
- a frame whose source id is too long to be audited is not searched.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from sightline.common import codec
from sightline.common.audit import AuditLog, TopicPublisher
from sightline.common.auth import AccessPolicy, Principal, Role, hash_token, new_token
from sightline.common.rpc import LIVENESS_SERVICE, GrpcServer, channel, check_health
from sightline.common.stage import InputEvent
from sightline.common.transient import is_transient
from sightline.matching.audit_trail import GalleryAudit
from sightline.matching.erasure import erasure_notice, erasure_publisher
from sightline.matching.erasure_listener import ErasureListener
from sightline.matching.gallery import Gallery
from sightline.matching.peers import FaceClient
from sightline.matching.readiness import GalleryUnavailable
from sightline.matching.service import GalleryServicer, Matcher
from sightline.matching.settings import MatchingSettings
from sightline.matching.store import GalleryStore
from sightline.matching.stream_audit import StreamSearchAudit
from sightline.matching.templates import TemplateCipher, generate_key
from sightline.v1 import events_pb2, gallery_pb2, gallery_pb2_grpc, types_pb2

KEY = generate_key()
TOKEN = new_token()
UNREACHABLE = "127.0.0.1:9"  # detection and embedding: a search that gets past the readiness check fails there


def probe(port: int, *service: str) -> int:
    """The exit code of the container probe, ``python -m sightline.common.healthcheck PORT [SERVICE]``."""
    command = [sys.executable, "-m", "sightline.common.healthcheck", str(port), *service]
    return subprocess.run(command, capture_output=True, timeout=30, check=False).returncode


def wait_until(condition: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


@contextmanager
def unreachable(database: Path) -> Iterator[None]:
    """The gallery database locked by another connection: every read of the replicas waits, then fails."""
    with closing(sqlite3.connect(database, isolation_level=None, timeout=0)) as holder:
        holder.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")


@pytest.fixture()
def database(tmp_path: Path) -> Path:
    return tmp_path / "gallery.db"


@pytest.fixture()
def replicas(database: Path) -> Iterator[Callable[..., Gallery]]:
    """``replica(refresh_interval_s, max_staleness_s)``: a Gallery on the shared database, closed at the end."""
    opened: list[Gallery] = []

    def replica(refresh_interval_s: float = 0.1, max_staleness_s: float = 0.4) -> Gallery:
        store = GalleryStore.open(f"sqlite:///{database}", TemplateCipher.from_base64(KEY, "k1"))
        opened.append(Gallery(store, 0.6, refresh_interval_s, max_staleness_s=max_staleness_s))
        return opened[-1]

    yield replica
    for gallery in opened:
        gallery.close()


def vectors(count: int, seed: int) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).standard_normal((count, 128)).astype(np.float32))


def enrol(gallery: Gallery, subject_id: str, vector: np.ndarray) -> None:
    gallery.enroll(subject_id, "", [], [vector], ("test-model", "1"), [80.0])


def found(gallery: Gallery, vector: np.ndarray) -> list[str]:
    return [candidate.subject_id for candidate in gallery.search(vector[None, :], 3)[0]]


def embedded(source_id: str, vector: np.ndarray) -> InputEvent:
    frame = types_pb2.FrameRef(
        frame_id=f"{source_id[:20]}:1",
        source_id=source_id,
        sequence=1,
        captured_at=codec.now(),
        purpose=types_pb2.PURPOSE_CCTV,
    )
    faces = [events_pb2.FaceEmbedding(face_index=0, vector=vector.tolist(), track_id="t0")]
    return InputEvent(
        None, events_pb2.FacesEmbedded(frame=frame, faces=faces).SerializeToString(), "sightline.embeddings.v1", 0, 1
    )


def test_a_replica_cut_off_from_its_database_stops_matching_until_it_can_check_again(
    replicas: Callable[..., Gallery],
    database: Path,
    tmp_path: Path,
) -> None:
    gallery = replicas(refresh_interval_s=0.1, max_staleness_s=0.4)
    alice = vectors(1, seed=1)[0]
    enrol(gallery, "alice", alice)
    audit = AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}")
    settings = MatchingSettings(
        template_key=KEY, database_url=f"sqlite:///{database}", detection_addr=UNREACHABLE, embedding_addr=UNREACHABLE
    )
    officer = Principal("officer-1", frozenset({Role.OPERATOR}), hash_token(TOKEN))
    server = GrpcServer("127.0.0.1", 0, workers=4, access=AccessPolicy([officer]))
    server.add(GalleryServicer(gallery, FaceClient(UNREACHABLE, UNREACHABLE, 1.0), settings, GalleryAudit(audit)))
    server.start()
    gallery.readiness.subscribe(server.set_serving)  # as matching's main() ties them
    address = f"127.0.0.1:{server.port}"
    search = gallery_pb2_grpc.GalleryServiceStub(channel(address, token=TOKEN)).Search
    try:
        assert check_health(address) == "SERVING" and found(gallery, alice)[:1] == ["alice"]
        with unreachable(database):
            assert wait_until(lambda: check_health(address) == "NOT_SERVING", timeout_s=3)
            assert check_health(address, service="sightline.v1.GalleryService") == "NOT_SERVING"
            assert check_health(address, service=LIVENESS_SERVICE) == "SERVING"  # up, not ready: no restart
            # The chart's TLS exec probes: readiness fails, liveness (the same name) passes.
            assert probe(server.port) == 1 and probe(server.port, LIVENESS_SERVICE) == 0
            with pytest.raises(GalleryUnavailable, match="no successful check of the gallery database") as refused:
                gallery.search(alice[None, :], 3)
            assert is_transient(refused.value)  # the stream stage retries the frame later, never dead-letters it
            with pytest.raises(GalleryUnavailable):
                Matcher(gallery, 3).process_event(embedded("cam-1", alice))
            with pytest.raises(grpc.RpcError) as failed:  # refused before detection and embedding are called
                search(gallery_pb2.SearchRequest(probe_image=b"not looked at"), timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "this matching replica is not matching" in failed.value.details()
        assert wait_until(lambda: check_health(address) == "SERVING", timeout_s=5)
        assert found(gallery, alice)[:1] == ["alice"]
        with pytest.raises(grpc.RpcError) as failed:  # in step again: the search gets as far as the face services
            search(gallery_pb2.SearchRequest(probe_image=b"not looked at"), timeout=10)
        assert "not matching" not in failed.value.details()
    finally:
        server.stop(0)
        audit.close()


def test_an_erasure_notice_drops_the_subject_at_once_while_the_database_is_unreachable(
    replicas: Callable[..., Gallery],
    database: Path,
    kafka: object,
) -> None:
    run = uuid.uuid4().hex[:8]  # the session broker keeps other tests' notices: ids of this run only
    alice, bob = f"alice-{run}", f"bob-{run}"
    alice_vector, bob_vector = vectors(2, seed=2)
    writer = replicas(refresh_interval_s=0.1, max_staleness_s=0.4)
    enrol(writer, alice, alice_vector)
    enrol(writer, bob, bob_vector)
    # A replica that checks the database only every 30 s, so the notice, not its own check, is what it acts on.
    behind = replicas(refresh_interval_s=30.0, max_staleness_s=60.0)
    listener = ErasureListener(kafka, behind.erased).start()  # type: ignore[arg-type]
    publisher = TopicPublisher(kafka)
    try:
        removal = writer.remove(alice)
        assert found(behind, alice_vector)[:1] == [alice]  # not yet told: it still matches her
        with unreachable(database):
            erasure_publisher(publisher)(erasure_notice(alice, "DSAR-7", removal))
            assert wait_until(lambda: alice not in behind.index.subject_ids(), timeout_s=15)
            assert bob in behind.index.subject_ids()
            with pytest.raises(GalleryUnavailable, match="erasure notice"):  # not until the database confirms it
                behind.search(bob_vector[None, :], 3)
        assert wait_until(lambda: not behind.readiness.why_not_ready(), timeout_s=10)
        assert found(behind, bob_vector)[:1] == [bob] and alice not in found(behind, alice_vector)
    finally:
        listener.close()
        publisher.close()


def test_a_frame_whose_source_id_cannot_be_audited_is_not_searched(
    replicas: Callable[..., Gallery],
    tmp_path: Path,
) -> None:
    gallery = replicas()
    alice = vectors(1, seed=3)[0]
    enrol(gallery, "alice", alice)
    audit = AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}")
    stream_audit = StreamSearchAudit(audit, interval_s=3600)  # flushed by hand
    try:
        with pytest.raises(codec.MalformedEvent, match="too long to be audited"):  # dead-lettered, never searched
            Matcher(gallery, 3, stream_audit).process_event(embedded("cam-" + "x" * 2000, alice))
        [output] = Matcher(gallery, 3, stream_audit).process_event(embedded("cam-2", alice))
        assert events_pb2.MatchResult.FromString(output.value).faces[0].candidates[0].subject_id == "alice"
        assert stream_audit.flush() == 1  # only the frame that was searched, and it is on record
        [record] = audit.records(action="STREAM_SEARCH")
        assert record.details["source_id"] == "cam-2"
    finally:
        stream_audit.close()
        audit.close()
