"""A gallery split into two shards against the same gallery unsplit: real matching gRPC servers on 127.0.0.1 (in this
process, so each shard's index can be inspected), one SQLite gallery shared by all of them, real detection and
embedding services (separate processes, real models) for the photos, and real descriptors of the sample photos.

Two replicas run with shards=2 (shard 0 and shard 1, each serving GalleryService, WatchlistService and ShardService)
and a third with shards=1 over the same database is the reference. What must hold: every search, through either
shard, gives exactly the reference's candidates; each subject is in exactly one shard's index, its own; an enrolment
or deletion made through the other shard is in (or gone from) the owner's index as soon as the call returns; 1:1
verification works through either shard; a shard that is down fails searches as UNAVAILABLE, never with part of the
candidates; and only matching's own principal may call ShardService, refusals audited.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from sightline.common.audit import Action, AuditLog, AuditSettings
from sightline.common.auth import AccessPolicy, Principal, Role, hash_token, new_token, service_principal
from sightline.common.denials import DenialAudit
from sightline.common.rpc import GrpcServer, channel
from sightline.matching.audit_trail import GalleryAudit
from sightline.matching.gallery import Gallery
from sightline.matching.peers import FaceClient
from sightline.matching.service import GalleryServicer, open_gallery
from sightline.matching.settings import MatchingSettings
from sightline.matching.shards import RemoteShards, ShardServicer, ShardUnavailable, pack, shard_of
from sightline.matching.templates import generate_key
from sightline.matching.watchlists import WatchlistServicer
from sightline.tooling.gallery_synth import real_descriptors
from sightline.tooling.localstack import LocalStack
from sightline.v1 import gallery_pb2, gallery_pb2_grpc, shard_pb2, shard_pb2_grpc

TOP_K = 10
NORTH = "north"  # every third subject of the descriptor set is on it


@dataclass
class Replica:
    gallery: Gallery
    server: GrpcServer
    address: str

    def stub(self) -> gallery_pb2_grpc.GalleryServiceStub:
        return gallery_pb2_grpc.GalleryServiceStub(channel(self.address, token=""))

    def subjects(self) -> set[str]:
        return self.gallery.index.subject_ids()

    def stop(self) -> None:
        self.server.stop(0)
        self.gallery.close()


def start_replicas(faces: LocalStack, url: str, key: str, audit: AuditLog, shards: int) -> list[Replica]:
    """The replicas of a gallery with ``shards`` shards, one per shard, built as main() builds them (without access
    control: the last test checks ShardService's)."""
    servers = [GrpcServer("127.0.0.1", 0) for _ in range(shards)]  # bound now: every replica needs every address
    addresses = [f"127.0.0.1:{server.port}" for server in servers]
    replicas = []
    for shard, server in enumerate(servers):
        settings = MatchingSettings(
            template_key=key,
            database_url=url,
            detection_addr=faces.addresses["detection"],
            embedding_addr=faces.addresses["embedding"],
            shards=shards,
            shard=shard,
            shard_addresses=addresses if shards > 1 else [],
            peer_timeout_s=5.0,
        )
        gallery = open_gallery(settings)
        client = FaceClient(settings.detection_addr, settings.embedding_addr, settings.peer_timeout_s)
        trail = GalleryAudit(audit)
        server.add(GalleryServicer(gallery, client, settings, trail))
        server.add(WatchlistServicer(gallery, trail))
        if shards > 1:
            server.add(ShardServicer(gallery, shard, shards))
        server.start()
        replicas.append(Replica(gallery, server, addresses[shard]))
    return replicas


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture(scope="module")
def face_services(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("faces"), ports="auto", services=("detection", "embedding")) as stack:
        stack.start(timeout=120)
        yield stack


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditLog]:
    url = f"sqlite:///{tmp_path_factory.mktemp('audit') / 'audit.db'}"
    log = AuditLog.open_configured(settings=AuditSettings(database_url=url))
    yield log
    log.close()


@dataclass
class Galleries:
    shards: list[Replica]  # shard 0, shard 1
    reference: Replica  # shards=1 over the same database
    key: str
    url: str


@pytest.fixture(scope="module")
def galleries(
    face_services: LocalStack, tmp_path_factory: pytest.TempPathFactory, audit: AuditLog
) -> Iterator[Galleries]:
    url, key = f"sqlite:///{tmp_path_factory.mktemp('gallery') / 'gallery.db'}", generate_key()
    shards = start_replicas(face_services, url, key, audit, shards=2)
    reference = start_replicas(face_services, url, key, audit, shards=1)[0]
    yield Galleries(shards, reference, key, url)
    for replica in (*shards, reference):
        replica.stop()


@dataclass(frozen=True)
class DescriptorSet:
    subjects: dict[str, list[np.ndarray]]  # subject id -> its enrolled templates
    probes: np.ndarray  # every real descriptor (enrolled or not) and a perturbed copy of each


@pytest.fixture(scope="module")
def descriptor_set(galleries: Galleries) -> DescriptorSet:
    """The 104 real descriptors of the sample photos (50 people): up to three templates of each of 48 people enrolled
    as one subject, through the shards alternately (so half the enrolments are written by the other shard's replica);
    every descriptor, and a perturbed copy of each, is a probe."""
    vectors, identities = real_descriptors()
    # Obama and Biden are enrolled from their photos through the gallery API below: enrolled here too, one photo
    # would be two subjects at distance 0, a tie whose order the merge (by subject id) and one index (by row) may
    # break differently.
    people = [person for person in dict.fromkeys(identities) if person not in ("obama", "biden")]
    subjects: dict[str, list[np.ndarray]] = {}
    for number, person in enumerate(people):
        templates = [v.astype(np.float32) for v, who in zip(vectors, identities, strict=True) if who == person][:3]
        subject_id = f"p{number:02d}"
        subjects[subject_id] = templates
        lists = [NORTH] if number % 3 == 0 else []
        writer = galleries.shards[number % 2].gallery
        writer.enroll(subject_id, "", lists, templates, ("dlib", "test"), [80.0] * len(templates))
    rng = np.random.default_rng(5)
    real = vectors.astype(np.float32)
    probes = np.concatenate([real, real + rng.normal(0, 0.03, real.shape).astype(np.float32)])
    return DescriptorSet(subjects, probes)


def in_step(galleries: Galleries, expected: set[str]) -> bool:
    split = set().union(*(replica.subjects() for replica in galleries.shards))
    return galleries.reference.subjects() == expected and split == expected


# -- tests ----------------------------------------------------------------------------------------------------------


def test_each_subject_is_in_exactly_one_shard_its_own(galleries: Galleries, descriptor_set: DescriptorSet) -> None:
    expected = set(descriptor_set.subjects)
    assert wait_until(lambda: in_step(galleries, expected)), "the reference did not catch up with the enrolments"
    zero, one = (replica.subjects() for replica in galleries.shards)
    assert not zero & one
    assert zero == {s for s in expected if shard_of(s, 2) == 0} and one == {s for s in expected if shard_of(s, 2) == 1}
    assert 14 <= len(zero) <= 34  # 48 subjects split by the hash, not all in one shard
    templates = sum(len(t) for t in descriptor_set.subjects.values())
    assert galleries.shards[0].gallery.index.size + galleries.shards[1].gallery.index.size == templates
    assert galleries.reference.gallery.index.size == templates


@pytest.mark.parametrize("watchlists", [[], [NORTH]])
def test_stream_searches_give_the_unsplit_gallerys_candidates(
    galleries: Galleries, descriptor_set: DescriptorSet, watchlists: list[str]
) -> None:
    """208 probes in one batch (as the stream stage searches a burst), top 10: through either shard, exactly the
    candidates, distances, template-free fields and list thresholds of one unsplit gallery."""
    assert wait_until(lambda: in_step(galleries, set(descriptor_set.subjects)))
    expected = galleries.reference.gallery.search(descriptor_set.probes, TOP_K, watchlists)
    for replica in galleries.shards:
        assert replica.gallery.search(descriptor_set.probes, TOP_K, watchlists) == expected
    assert all(len(found) == TOP_K for found in expected)
    found_ids = {c.subject_id for found in expected for c in found}
    assert found_ids & galleries.shards[0].subjects() and found_ids & galleries.shards[1].subjects()  # both shards
    local = galleries.shards[0].gallery.local_search(descriptor_set.probes, TOP_K, watchlists)
    assert {c.subject_id for found in local for c in found} <= galleries.shards[0].subjects()


def test_an_enrolment_through_the_other_shard_is_in_its_own_shard_when_the_call_returns(
    galleries: Galleries, face_photos: Path
) -> None:
    """obama belongs to shard 0 and biden to shard 1: each is enrolled through the other shard's gallery API."""
    assert (shard_of("obama", 2), shard_of("biden", 2)) == (0, 1)
    for subject_id, photo, through, owner in (("obama", "obama.jpg", 1, 0), ("biden", "biden.jpg", 0, 1)):
        request = gallery_pb2.EnrollRequest(subject_id=subject_id, images=[(face_photos / photo).read_bytes()])
        assert galleries.shards[through].stub().Enroll(request).templates_added == 1
        assert subject_id in galleries.shards[owner].subjects()  # at once: SyncSubjects, not the change log
        assert subject_id not in galleries.shards[through].subjects()
        for replica in galleries.shards:  # GetSubject reads the one database: the same answer everywhere
            assert replica.stub().GetSubject(gallery_pb2.GetSubjectRequest(subject_id=subject_id)).template_count == 1


def test_photo_searches_through_either_shard_match_the_unsplit_gallery(galleries: Galleries, face_photos: Path) -> None:
    assert wait_until(lambda: {"obama", "biden"} <= galleries.reference.subjects())
    for photo in ("obama2.jpg", "obama3.jpg", "biden.jpg"):
        request = gallery_pb2.SearchRequest(probe_image=(face_photos / photo).read_bytes(), top_k=TOP_K)
        expected = galleries.reference.stub().Search(request)
        for replica in galleries.shards:
            reply = replica.stub().Search(request)
            assert list(reply.candidates) == list(expected.candidates), photo
            assert reply.threshold_distance == expected.threshold_distance
        assert expected.candidates[0].distance < expected.threshold_distance  # the person was found, in either set


def test_verification_through_either_shard_goes_to_the_subjects_shard(galleries: Galleries, face_photos: Path) -> None:
    assert wait_until(lambda: {"obama", "biden"} <= galleries.reference.subjects())
    probe = (face_photos / "obama3.jpg").read_bytes()
    for subject_id in ("obama", "biden"):
        request = gallery_pb2.VerifyRequest(subject_id=subject_id, probe_image=probe)
        expected = galleries.reference.stub().Verify(request).verification
        for replica in galleries.shards:
            assert replica.stub().Verify(request).verification == expected
        assert expected.subject_found and expected.verified == (subject_id == "obama")


def test_a_deletion_through_the_other_shard_leaves_its_shard_when_the_call_returns(
    galleries: Galleries, descriptor_set: DescriptorSet
) -> None:
    owned_by_1 = sorted(s for s in descriptor_set.subjects if shard_of(s, 2) == 1)[0]
    assert owned_by_1 in galleries.shards[1].subjects()
    reply = galleries.shards[0].stub().DeleteSubject(gallery_pb2.DeleteSubjectRequest(subject_id=owned_by_1))
    assert reply.deleted and reply.templates_removed == len(descriptor_set.subjects[owned_by_1])
    assert owned_by_1 not in galleries.shards[1].subjects()  # at once
    probe = descriptor_set.subjects[owned_by_1][0][None, :]
    for replica in galleries.shards:
        assert owned_by_1 not in {c.subject_id for c in replica.gallery.search(probe, TOP_K)[0]}
    assert wait_until(lambda: owned_by_1 not in galleries.reference.subjects())
    assert galleries.reference.gallery.search(probe, TOP_K) == galleries.shards[0].gallery.search(probe, TOP_K)


def test_a_misaddressed_shard_is_refused_not_searched_twice(galleries: Galleries) -> None:
    """A caller whose address list names shard 1's replica as shard 0 is told so (FAILED_PRECONDITION) instead of
    getting shard 1's subjects twice and shard 0's never."""
    swapped = RemoteShards(1, [galleries.shards[1].address, galleries.shards[0].address], timeout_s=5.0)
    try:
        with pytest.raises(ShardUnavailable, match="holds shard 1 of 2, the call was meant for shard 0 of 2"):
            swapped.search(np.zeros((1, 128), dtype=np.float32), TOP_K)
    finally:
        swapped.close()


def test_only_matching_replicas_may_call_the_shard_service(galleries: Galleries, audit: AuditLog) -> None:
    """With access control, as in production: matching's own principal is served, an operator (who may search the
    gallery) is refused PERMISSION_DENIED, and the refusal is in the audit trail."""
    operator_token, matching_token = new_token(), new_token()
    principals = [
        Principal("officer-7", frozenset({Role.OPERATOR, Role.ENROLLER}), hash_token(operator_token)),
        Principal(service_principal("matching"), frozenset({Role.OPERATOR}), hash_token(matching_token)),
    ]
    denials = DenialAudit(audit)
    server = GrpcServer("127.0.0.1", 0, access=AccessPolicy(principals), on_denied=denials)
    server.add(ShardServicer(galleries.shards[0].gallery, 0, 2, denials))
    server.start()
    start = audit.head()[0]
    request = shard_pb2.SearchShardRequest(
        target=shard_pb2.ShardTarget(shard=0, shards=2), probes=pack(np.zeros((1, 128), np.float32)), top_k=3
    )
    try:
        address = f"127.0.0.1:{server.port}"
        served = shard_pb2_grpc.ShardServiceStub(channel(address, token=matching_token)).SearchShard(request)
        assert len(served.results) == 1 and len(served.results[0].candidates) == 3
        with pytest.raises(grpc.RpcError) as refused:
            shard_pb2_grpc.ShardServiceStub(channel(address, token=operator_token)).SearchShard(request)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only service:matching" in refused.value.details()
    finally:
        server.stop(0)
        denials.close()
    (record,) = audit.records(after=start, action=Action.ACCESS_DENIED.value)
    assert record.principal == "officer-7"
    assert record.details["method"] == "/sightline.v1.ShardService/SearchShard"


def test_a_shard_that_is_down_fails_searches_as_unavailable(galleries: Galleries, face_photos: Path) -> None:
    """Last: stops shard 1. A search through shard 0 is UNAVAILABLE naming the shard, never shard 0's part alone."""
    galleries.shards[1].server.stop(0)
    request = gallery_pb2.SearchRequest(probe_image=(face_photos / "obama2.jpg").read_bytes(), top_k=TOP_K)
    with pytest.raises(grpc.RpcError) as failed:
        galleries.shards[0].stub().Search(request)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"shard 1 of 2 ({galleries.shards[1].address}) did not answer the search" in failed.value.details()
    with pytest.raises(ShardUnavailable):
        galleries.shards[0].gallery.search(np.zeros((1, 128), dtype=np.float32), TOP_K)


# -- the local stack with two shards: separate processes, as `SIGHTLINE_MATCHING_SHARDS=2 sightline up` runs them --


def gallery_subjects(metrics_port: int) -> float:
    """The subjects in a matching process's index, from its own /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    (line,) = [line for line in body.splitlines() if line.startswith('sightline_gallery_subjects{service="matching"}')]
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def sharded_stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    services = ("detection", "embedding", "matching")
    with LocalStack(tmp_path_factory.mktemp("stack") / "run", ports="auto", services=services, shards=2) as stack:
        stack.start(timeout=120)
        yield stack


def test_the_local_stack_runs_one_matching_process_per_shard(sharded_stack: LocalStack, face_photos: Path) -> None:
    """Enrolments through the other shard land in one shard each; searches through either shard equal one unsplit
    gallery over the stack's database; a restarted shard answers the same."""
    stack = sharded_stack
    assert stack.processes == ("detection", "embedding", "matching-0", "matching-1")
    current = stack.status()
    assert current is not None and current.healthy and set(current.services) == set(stack.processes)
    stubs = [gallery_pb2_grpc.GalleryServiceStub(channel(address)) for address in stack.shard_addresses]
    for subject_id, photo, through in (("obama", "obama.jpg", 1), ("biden", "biden.jpg", 0)):
        request = gallery_pb2.EnrollRequest(subject_id=subject_id, images=[(face_photos / photo).read_bytes()])
        assert stubs[through].Enroll(request).templates_added == 1
    ports = [stack.ports.metrics[f"matching-{shard}"] for shard in (0, 1)]
    assert [gallery_subjects(port) for port in ports] == [1.0, 1.0]  # obama in shard 0, biden in shard 1

    reference = open_gallery(
        MatchingSettings(
            template_key=(stack.run_dir / "template.key").read_text().strip(),
            database_url=f"sqlite:///{stack.run_dir / 'gallery.db'}",
            snapshots=False,
        )
    )
    faces = FaceClient(stack.addresses["detection"], stack.addresses["embedding"], 10.0)
    try:
        for round_ in ("first", "after restarting shard 1"):
            for photo in ("obama2.jpg", "biden.jpg"):
                image = (face_photos / photo).read_bytes()
                expected = reference.search(faces.largest_face(image).vector[None, :], TOP_K)[0]
                for stub in stubs:
                    found = stub.Search(gallery_pb2.SearchRequest(probe_image=image, top_k=TOP_K)).candidates
                    assert list(found) == expected, (round_, photo)
                assert [c.subject_id for c in expected] == (
                    ["obama", "biden"] if "obama" in photo else ["biden", "obama"]
                )
            if round_ == "first":
                stack.restart("matching-1")
                stubs[1] = gallery_pb2_grpc.GalleryServiceStub(channel(stack.shard_addresses[1]))
    finally:
        reference.close()
    verify = gallery_pb2.VerifyRequest(subject_id="biden", probe_image=(face_photos / "biden.jpg").read_bytes())
    assert all(stub.Verify(verify).verification.verified for stub in stubs)
