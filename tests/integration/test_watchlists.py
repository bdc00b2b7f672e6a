"""Watchlists, their thresholds and expiring memberships, and the gallery's audit trail, against a real matching
gRPC server on 127.0.0.1 (in this process, so its gallery and audit log can be inspected) that calls real detection
and embedding services (separate processes, real models) on real photos.

The server admits calls by bearer token, as in production, so audit records carry a real principal. Its refresh
interval is 30 s: a membership that expires within the test stops matching because the gallery wakes up at the
expiry, not because it polled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest

from sightline.cli.main import main as cli
from sightline.common import codec, scores
from sightline.common.audit import Action, AuditLog, AuditSettings, parse_time
from sightline.common.auth import AccessPolicy, Principal, Role, hash_token, new_token
from sightline.common.rpc import GrpcServer, channel
from sightline.common.stage import InputEvent
from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import Policy
from sightline.matching.audit_outbox import WRITTEN_AT, OutboxPolicy
from sightline.matching.audit_trail import GalleryAudit
from sightline.matching.erasure import ErasureNotifier
from sightline.matching.gallery import Gallery
from sightline.matching.peers import FaceClient
from sightline.matching.service import GalleryServicer, Matcher, open_gallery
from sightline.matching.settings import MatchingSettings
from sightline.matching.stream_audit import StreamSearchAudit
from sightline.matching.templates import generate_key
from sightline.matching.watchlists import WatchlistServicer
from sightline.tooling.localstack import LocalStack
from sightline.v1 import audit_pb2, events_pb2, gallery_pb2, gallery_pb2_grpc, types_pb2

OFFICER = "officer-1"
TOKEN = new_token()


# -- a matching replica in this process ---------------------------------------------------------------------------


@dataclass
class Replica:
    gallery: Gallery
    server: GrpcServer
    faces: FaceClient
    address: str

    def gallery_stub(self) -> gallery_pb2_grpc.GalleryServiceStub:
        return gallery_pb2_grpc.GalleryServiceStub(channel(self.address, token=TOKEN))

    def watchlist_stub(self) -> gallery_pb2_grpc.WatchlistServiceStub:
        return gallery_pb2_grpc.WatchlistServiceStub(channel(self.address, token=TOKEN))

    def stop(self) -> None:
        self.server.stop(0)
        self.gallery.close()


def start_replica(
    faces: LocalStack,
    gallery_url: str,
    key: str,
    audit: AuditLog,
    refresh_interval_s: float,
    notify_erased: ErasureNotifier | None = None,
    outbox: OutboxPolicy | None = None,
) -> Replica:
    """A matching replica as main() builds one: gallery, audited GalleryService and WatchlistService (``outbox``: how
    their audit outbox is relayed), token auth."""
    settings = MatchingSettings(
        template_key=key,
        database_url=gallery_url,
        refresh_interval_s=refresh_interval_s,
        detection_addr=faces.addresses["detection"],
        embedding_addr=faces.addresses["embedding"],
    )
    gallery = open_gallery(settings)
    client = FaceClient(settings.detection_addr, settings.embedding_addr, settings.peer_timeout_s)
    trail = GalleryAudit(audit, outbox=outbox)
    officer = Principal(OFFICER, frozenset({Role.ENROLLER, Role.OPERATOR}), hash_token(TOKEN))
    server = GrpcServer("127.0.0.1", 0, access=AccessPolicy([officer]))
    server.add(GalleryServicer(gallery, client, settings, trail, notify_erased))
    server.add(WatchlistServicer(gallery, trail))
    server.start()
    return Replica(gallery, server, client, f"127.0.0.1:{server.port}")


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@pytest.fixture(scope="module")
def face_services(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("faces"), ports="auto", services=("detection", "embedding")) as stack:
        stack.start(timeout=120)
        yield stack


@pytest.fixture(scope="module")
def audit_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('audit') / 'audit.db'}"


@pytest.fixture(scope="module")
def audit(audit_url: str) -> Iterator[AuditLog]:
    log = AuditLog.open_configured(settings=AuditSettings(database_url=audit_url))
    yield log
    log.close()


@pytest.fixture(scope="module")
def replica(face_services: LocalStack, tmp_path_factory: pytest.TempPathFactory, audit: AuditLog) -> Iterator[Replica]:
    url = f"sqlite:///{tmp_path_factory.mktemp('gallery') / 'gallery.db'}"
    running = start_replica(face_services, url, generate_key(), audit, refresh_interval_s=30.0)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def galleries(replica: Replica) -> gallery_pb2_grpc.GalleryServiceStub:
    return replica.gallery_stub()


@pytest.fixture(scope="module")
def watchlists(replica: Replica) -> gallery_pb2_grpc.WatchlistServiceStub:
    return replica.watchlist_stub()


def photo(folder: Path, name: str) -> bytes:
    return (folder / name).read_bytes()


def enrol(
    galleries: gallery_pb2_grpc.GalleryServiceStub, subject_id: str, image: bytes, *watchlists: str, **fields: object
) -> gallery_pb2.EnrollResponse:
    reply = galleries.Enroll(
        gallery_pb2.EnrollRequest(subject_id=subject_id, images=[image], watchlists=watchlists, **fields)
    )  # type: ignore[arg-type]
    assert reply.templates_added == 1, reply
    return reply


def search(
    galleries: gallery_pb2_grpc.GalleryServiceStub, image: bytes, watchlist: str = ""
) -> list[types_pb2.MatchCandidate]:
    return list(galleries.Search(gallery_pb2.SearchRequest(probe_image=image, top_k=5, watchlist=watchlist)).candidates)


def records(audit: AuditLog, after: int = 0, **filters: str) -> list:  # type: ignore[type-arg]
    return audit.records(after=after, limit=10_000, **filters)  # type: ignore[arg-type]


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# -- watchlists ------------------------------------------------------------------------------------------------


def test_watchlists_are_created_shown_updated_and_deleted(watchlists, audit: AuditLog) -> None:  # type: ignore[no-untyped-def]
    start = audit.head()[0]
    created = watchlists.CreateWatchlist(
        gallery_pb2.CreateWatchlistRequest(
            watchlist=gallery_pb2.Watchlist(
                name="stop-list", purpose="court order 7/2026", target_fmr=1e-4, default_membership_days=30
            )
        )
    )
    assert (created.name, created.purpose, created.owner, created.default_membership_days) == (
        "stop-list",
        "court order 7/2026",
        OFFICER,
        30,
    )  # no owner given: the caller owns it
    assert created.target_fmr == pytest.approx(1e-4, rel=1e-9)
    assert created.threshold_distance == pytest.approx(scores.distance_for_fmr(1e-4), abs=1e-6)
    again = refused(lambda: watchlists.CreateWatchlist(gallery_pb2.CreateWatchlistRequest(watchlist=created)))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS and "already exists" in again.details()

    created.purpose, created.owner, created.target_fmr = "court order 8/2026", "unit-9", 0
    updated = watchlists.UpdateWatchlist(created)
    assert (updated.purpose, updated.owner, updated.target_fmr, updated.threshold_distance) == (
        "court order 8/2026",
        "unit-9",
        0,
        0,
    )
    assert watchlists.GetWatchlist(gallery_pb2.GetWatchlistRequest(name="stop-list")) == updated
    assert "stop-list" in [w.name for w in watchlists.ListWatchlists(gallery_pb2.ListWatchlistsRequest()).watchlists]

    deleted = watchlists.DeleteWatchlist(gallery_pb2.DeleteWatchlistRequest(name="stop-list"))
    assert (
        deleted.deleted and not watchlists.DeleteWatchlist(gallery_pb2.DeleteWatchlistRequest(name="stop-list")).deleted
    )
    gone = refused(lambda: watchlists.GetWatchlist(gallery_pb2.GetWatchlistRequest(name="stop-list")))
    assert gone.code() == grpc.StatusCode.NOT_FOUND

    trail = [(r.action, r.principal, r.result, r.details.get("watchlist")) for r in records(audit, start)]
    assert trail == [
        ("WATCHLIST", OFFICER, "list created", "stop-list"),
        ("WATCHLIST", OFFICER, "refused: watchlist 'stop-list' already exists", "stop-list"),
        ("WATCHLIST", OFFICER, "list updated", "stop-list"),
        ("WATCHLIST", OFFICER, "list deleted", "stop-list"),
        ("WATCHLIST", OFFICER, "no such list", "stop-list"),
    ]


@pytest.mark.parametrize(
    ("watchlist", "says"),
    [
        (gallery_pb2.Watchlist(name="no purpose"), "invalid watchlist name"),
        (gallery_pb2.Watchlist(name="quiet"), "needs a purpose"),
        (gallery_pb2.Watchlist(name="strict", purpose="p", target_fmr=1e-14), "below the calibration table's range"),
        (gallery_pb2.Watchlist(name="loose", purpose="p", target_fmr=1.5), "target FMR must be in (0, 1)"),
        (gallery_pb2.Watchlist(name="forever", purpose="p", default_membership_days=10**6), "at most 36500"),
    ],
)
def test_bad_watchlists_are_refused_with_the_reason_and_audited(
    watchlists,
    audit: AuditLog,  # type: ignore[no-untyped-def]
    watchlist: gallery_pb2.Watchlist,
    says: str,
) -> None:
    start = audit.head()[0]
    error = refused(lambda: watchlists.CreateWatchlist(gallery_pb2.CreateWatchlistRequest(watchlist=watchlist)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and says in error.details()
    [record] = records(audit, start)
    assert record.action == "WATCHLIST" and record.result.startswith("refused: ") and says in record.result


def test_memberships_need_an_existing_list_and_enrolled_subjects(watchlists, galleries, face_photos: Path) -> None:  # type: ignore[no-untyped-def]
    watchlists.CreateWatchlist(
        gallery_pb2.CreateWatchlistRequest(watchlist=gallery_pb2.Watchlist(name="m-list", purpose="p"))
    )
    enrol(galleries, "m-subject", photo(face_photos, "obama.jpg"))
    for request, code, says in (
        (
            gallery_pb2.AddMembersRequest(watchlist="nope", subject_ids=["m-subject"]),
            grpc.StatusCode.NOT_FOUND,
            "create it first",
        ),
        (
            gallery_pb2.AddMembersRequest(watchlist="m-list", subject_ids=["m-subject", "ghost"]),
            grpc.StatusCode.NOT_FOUND,
            "'ghost' is not enrolled",
        ),
        (gallery_pb2.AddMembersRequest(watchlist="m-list"), grpc.StatusCode.INVALID_ARGUMENT, "no subject_ids"),
    ):
        error = refused(lambda request=request: watchlists.AddMembers(request))
        assert error.code() == code and says in error.details()
    past = gallery_pb2.AddMembersRequest(watchlist="m-list", subject_ids=["m-subject"])
    past.expires_at.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    assert "not in the future" in refused(lambda: watchlists.AddMembers(past)).details()
    assert watchlists.GetWatchlist(gallery_pb2.GetWatchlistRequest(name="m-list")).member_count == 0  # all or nothing

    added = watchlists.AddMembers(gallery_pb2.AddMembersRequest(watchlist="m-list", subject_ids=["m-subject"]))
    assert [(m.subject_id, m.expired, m.HasField("expires_at")) for m in added.memberships] == [
        ("m-subject", False, False)
    ]
    removed = watchlists.RemoveMembers(
        gallery_pb2.RemoveMembersRequest(watchlist="m-list", subject_ids=["m-subject", "x"])
    )
    assert removed.removed == 1


def test_enrolling_into_an_unknown_list_creates_it_and_candidates_carry_list_thresholds(  # type: ignore[no-untyped-def]
    watchlists, galleries, face_photos: Path, audit: AuditLog
) -> None:
    watchlists.CreateWatchlist(
        gallery_pb2.CreateWatchlistRequest(
            watchlist=gallery_pb2.Watchlist(name="vip", purpose="protection detail", target_fmr=1e-3)
        )
    )
    start = audit.head()[0]
    enrol(galleries, "t-obama", photo(face_photos, "obama.jpg"), "vip", "brand-new", purpose="case 41")

    fresh = watchlists.GetWatchlist(gallery_pb2.GetWatchlistRequest(name="brand-new"))
    assert (fresh.purpose, fresh.owner, fresh.member_count) == ("", OFFICER, 1)  # `watchlists list` shows it needs one
    [enrolled] = records(audit, start)
    assert (enrolled.action, enrolled.subject_id, enrolled.purpose, enrolled.principal) == (
        "ENROL",
        "t-obama",
        "case 41",
        OFFICER,
    )
    assert enrolled.details["watchlists"] == "brand-new,vip" and enrolled.details["watchlists_created"] == "brand-new"
    assert enrolled.details["templates_added"] == "1"

    [best, *_] = search(galleries, photo(face_photos, "obama3.jpg"), watchlist="vip")
    assert best.subject_id == "t-obama" and list(best.watchlists) == ["brand-new", "vip"]
    # Only the list that sets a target FMR carries a threshold: the other is left to the decision policy.
    assert dict(best.watchlist_thresholds) == {"vip": pytest.approx(scores.distance_for_fmr(1e-3), abs=1e-6)}


def test_a_membership_stops_matching_at_its_expiry_by_itself(watchlists, galleries, face_photos: Path) -> None:  # type: ignore[no-untyped-def]
    watchlists.CreateWatchlist(
        gallery_pb2.CreateWatchlistRequest(watchlist=gallery_pb2.Watchlist(name="visitors", purpose="day passes"))
    )
    enrol(galleries, "x-biden", photo(face_photos, "biden.jpg"))
    request = gallery_pb2.AddMembersRequest(watchlist="visitors", subject_ids=["x-biden"])
    expires_at = datetime.now(UTC) + timedelta(seconds=2)
    request.expires_at.FromDatetime(expires_at)
    watchlists.AddMembers(request)
    probe = photo(face_photos, "biden.jpg")
    assert [c.subject_id for c in search(galleries, probe, "visitors")] == ["x-biden"]

    # Nothing but searches from here on: no write, no reload call. The server polls the database every 30 s only.
    assert wait_until(lambda: not search(galleries, probe, "visitors"), timeout=6, step=0.1)
    assert datetime.now(UTC) >= expires_at - timedelta(milliseconds=100)  # not before its time

    [unfiltered, *_] = search(galleries, probe)
    assert (
        unfiltered.subject_id == "x-biden" and "visitors" not in unfiltered.watchlists
    )  # still enrolled, off the list
    assert watchlists.GetWatchlist(gallery_pb2.GetWatchlistRequest(name="visitors")).member_count == 0
    listed = watchlists.ListMembers(gallery_pb2.ListMembersRequest(watchlist="visitors", include_expired=True))
    assert [(m.subject_id, m.expired) for m in listed.memberships] == [("x-biden", True)]
    assert not watchlists.ListMembers(gallery_pb2.ListMembersRequest(watchlist="visitors")).memberships

    # An expiry with no list to apply it to is a mistake, not something to ignore silently.
    lonely = gallery_pb2.EnrollRequest(subject_id="x-biden", images=[probe])
    lonely.membership_expires_at.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    error = refused(lambda: galleries.Enroll(lonely))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs watchlists" in error.details()


def test_the_decision_engine_applies_a_lists_gallery_threshold_first(watchlists, galleries, face_photos: Path) -> None:  # type: ignore[no-untyped-def]
    lenient = scores.distance_for_fmr(1e-2)
    watchlists.CreateWatchlist(
        gallery_pb2.CreateWatchlistRequest(
            watchlist=gallery_pb2.Watchlist(name="lenient", purpose="missing persons", target_fmr=1e-2)
        )
    )
    enrol(galleries, "d-obama", photo(face_photos, "obama.jpg"), "lenient")
    [candidate, *_] = search(galleries, photo(face_photos, "obama3.jpg"), "lenient")
    strict = scores.distance_for_fmr(1e-9)
    assert candidate.subject_id == "d-obama" and strict < candidate.distance < lenient  # the case this test is about

    # The policy's own threshold for the list (the operator's fallback) and the global one are both too strict.
    policy = Policy(min_agreeing_frames=1, match_max_distance=strict, watchlist_target_fmr={"lenient": 1e-9})

    def decide(found: types_pb2.MatchCandidate) -> events_pb2.Decision:
        frame = types_pb2.FrameRef(frame_id="f-1", source_id="cam-d", captured_at=codec.now())
        result = events_pb2.MatchResult(
            frame=frame, faces=[events_pb2.FaceMatch(quality=types_pb2.FaceQuality(score=90), candidates=[found])]
        )
        return DecisionEngine(policy).decide(result)[0][0]

    decided = decide(candidate)
    assert decided.outcome == events_pb2.OUTCOME_MATCH and decided.subject_id == "d-obama"
    assert f"{lenient:.3f} (watchlist lenient: the gallery's threshold)" in decided.reasons[0]
    without = types_pb2.MatchCandidate()
    without.CopyFrom(candidate)
    without.ClearField("watchlist_thresholds")
    assert decide(without).outcome == events_pb2.OUTCOME_NO_MATCH  # the policy's fallback alone says no


# -- the gallery's audit trail ---------------------------------------------------------------------------------


def test_gallery_calls_are_audited_with_the_callers_principal(
    galleries,
    face_photos: Path,
    audit: AuditLog,  # type: ignore[no-untyped-def]
    audit_url: str,
    replica: Replica,
) -> None:
    start = audit.head()[0]
    enrol(galleries, "a-obama", photo(face_photos, "obama.jpg"), "audit-list")
    galleries.Verify(gallery_pb2.VerifyRequest(subject_id="a-obama", probe_image=photo(face_photos, "obama2.jpg")))
    galleries.Search(gallery_pb2.SearchRequest(probe_image=photo(face_photos, "obama3.jpg"), watchlist="audit-list"))
    error = refused(
        lambda: galleries.Verify(
            gallery_pb2.VerifyRequest(subject_id="ghost", probe_image=photo(face_photos, "obama.jpg"))
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = refused(lambda: galleries.Enroll(gallery_pb2.EnrollRequest(subject_id="bad id", images=[b"x"])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    vector = next(r.vector for r in replica.gallery.store.load_templates() if r.subject_id == "a-obama")
    galleries.DeleteSubject(gallery_pb2.DeleteSubjectRequest(subject_id="a-obama"))

    trail = records(audit, start)
    assert [(r.action, r.subject_id, r.result) for r in trail] == [
        ("ENROL", "a-obama", "ok"),
        ("VERIFY", "a-obama", "verified"),
        ("SEARCH", "a-obama", "ok"),  # the best candidate within threshold
        ("VERIFY", "ghost", "not found: subject 'ghost' is not enrolled"),
        (
            "ENROL",
            "bad id",
            "refused: invalid subject id 'bad id': use 1-128 letters, digits and . _ : @ - "
            "(starting with a letter or digit)",
        ),
        ("DELETE", "a-obama", "deleted"),
    ]
    assert {r.principal for r in trail} == {OFFICER}
    assert [r.purpose for r in trail] == [
        "enrolment",
        "gallery-verification",
        "gallery-search",
        "gallery-verification",
        "enrolment",
        "gallery-deletion",
    ]
    assert float(trail[1].details["distance"]) < float(trail[1].details["threshold"])
    assert trail[2].details["watchlist"] == "audit-list" and trail[2].details["candidate_ids"] == "a-obama"
    # A write's record went through the outbox: it says when the write committed, before it was appended.
    deleted = dict(trail[5].details)
    assert parse_time(deleted.pop(WRITTEN_AT)) <= trail[5].at
    assert deleted == {"templates_removed": "1", "watchlists": "audit-list"}
    assert WRITTEN_AT not in trail[1].details  # a verification wrote nothing: appended directly
    assert audit.verify().intact
    dump = Path(audit_url[len("sqlite:///") :]).read_bytes()
    assert vector.tobytes() not in dump and vector.astype(np.float64).tobytes() not in dump  # no descriptor, ever


def test_stream_searches_are_audited_per_source_and_interval(
    replica: Replica,
    galleries,
    face_photos: Path,  # type: ignore[no-untyped-def]
    audit: AuditLog,
) -> None:
    enrol(galleries, "s-biden", photo(face_photos, "biden.jpg"), "stream-list")
    probes = [replica.faces.largest_face(photo(face_photos, name)) for name in ("biden.jpg", "obama.jpg")]

    def event(source: str, sequence: int, watchlists: list[str]) -> InputEvent:
        frame = types_pb2.FrameRef(
            frame_id=f"{source}:{sequence}",
            source_id=source,
            sequence=sequence,
            captured_at=codec.now(),
            purpose=types_pb2.PURPOSE_CCTV,
            watchlists=watchlists,
        )
        faces = [
            events_pb2.FaceEmbedding(
                face_index=i,
                box=p.face.box,
                quality=p.face.quality,
                vector=p.vector.tolist(),
                track_id=f"{source}/t{i}",
            )
            for i, p in enumerate(probes)
        ]
        return InputEvent(
            None,
            events_pb2.FacesEmbedded(frame=frame, faces=faces).SerializeToString(),
            "sightline.embeddings.v1",
            0,
            sequence,
        )

    start = audit.head()[0]
    stream_audit = StreamSearchAudit(audit, interval_s=3600)  # flushed by hand here; the timer has its own test
    try:
        matcher = Matcher(replica.gallery, 5, stream_audit)
        [output] = matcher.process_event(event("cam-a", 1, []))
        matched = events_pb2.MatchResult.FromString(output.value)
        assert [f.track_id for f in matched.faces] == ["cam-a/t0", "cam-a/t1"]  # tracks travel on to decision
        assert {c.subject_id for c in matched.faces[0].candidates[:2]} == {"s-biden", "x-biden"}  # both from biden.jpg
        matcher.process_event(event("cam-a", 2, []))
        matcher.process_event(event("cam-b", 1, ["stream-list"]))
        assert stream_audit.flush() == 2  # one record per source for the interval
        matcher.process_event(event("cam-b", 2, ["stream-list"]))
    finally:
        stream_audit.close()  # shutdown writes what is left
    by_source = [
        (
            r.details["source_id"],
            r.details["frames"],
            r.details["faces_searched"],
            r.details["watchlists_searched"],
            r.principal,
            r.purpose,
        )
        for r in records(audit, start, action="STREAM_SEARCH")
    ]
    assert by_source == [
        ("cam-a", "2", "4", "*", "service:matching", "cctv-watchlist"),
        ("cam-b", "1", "2", "stream-list", "service:matching", "cctv-watchlist"),
        ("cam-b", "1", "2", "stream-list", "service:matching", "cctv-watchlist"),
    ]
    within = [int(r.details["candidates_within_threshold"]) for r in records(audit, start, action="STREAM_SEARCH")]
    assert within[0] >= 2 and within[1] == within[2] == 1  # biden within threshold on each frame; on cam-b only him


def test_matching_and_decision_append_to_one_chain(audit: AuditLog, audit_url: str) -> None:
    decision = AuditLog.open_configured(settings=AuditSettings(database_url=audit_url))  # as decision's main() does
    try:
        start = audit.head()[0]
        for i in range(3):
            audit.append("service:matching", Action.STREAM_SEARCH, "", "cctv-watchlist", "ok", {"source_id": f"c{i}"})
            decision.append("service:decision", Action.ALERT, f"subject-{i}", "cctv-watchlist", "PENDING_REVIEW")
        trail = records(audit, start)
        assert [r.principal for r in trail] == ["service:matching", "service:decision"] * 3
        assert [r.sequence for r in trail] == list(range(start + 1, start + 7))
        assert all(b.prev_hash == a.hash for a, b in zip(trail, trail[1:], strict=False))
        assert decision.verify().intact
    finally:
        decision.close()


def test_the_stream_audit_timer_writes_without_a_call(audit: AuditLog) -> None:
    start = audit.head()[0]
    stream_audit = StreamSearchAudit(audit, interval_s=0.2)
    try:
        frame = types_pb2.FrameRef(frame_id="cam-t:1", source_id="cam-t", purpose=types_pb2.PURPOSE_CCTV)
        stream_audit.count(frame, faces=1, within_threshold=0)
        assert wait_until(lambda: len(records(audit, start, action="STREAM_SEARCH")) == 1, timeout=5)
    finally:
        stream_audit.close()
    [record] = records(audit, start, action="STREAM_SEARCH")
    assert (record.details["source_id"], record.details["frames"], record.details["faces_searched"]) == (
        "cam-t",
        "1",
        "1",
    )


def test_a_watchlist_record_goes_to_the_topic_with_its_own_action(audit: AuditLog) -> None:
    record = audit.append(OFFICER, Action.WATCHLIST, "", "p", "list created", {"watchlist": "w"})
    assert audit.records(after=record.sequence - 1, limit=1)[0].action == "WATCHLIST"
    assert record.to_proto().action == audit_pb2.AUDIT_ACTION_WATCHLIST  # the copy on sightline.audit.v1


# -- the command line --------------------------------------------------------------------------------------------


def test_the_watchlists_command(
    replica: Replica,
    galleries,
    face_photos: Path,
    capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
    audit: AuditLog,
) -> None:
    where = ["--matching", replica.address, "--token", TOKEN]

    def run(*args: str) -> tuple[int, str]:
        code = cli([*args[:2], *where, *args[2:]]) if args[0] == "watchlists" else cli([*args, *where])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    code, out = run(
        "watchlists",
        "create",
        "cli-list",
        "--purpose",
        "border alerts",
        "--owner",
        "unit-3",
        "--target-fmr",
        "1e-3",
        "--default-days",
        "7",
    )
    assert code == 0 and "target FMR 0.001" in out and "7 days" in out
    code, out = run(
        "enroll",
        "c-obama",
        str(face_photos / "obama.jpg"),
        "--watchlist",
        "cli-auto",
        "--purpose",
        "case 9",
        "--days",
        "3",
    )
    assert code == 0 and "1 template(s) added on cli-auto" in out
    code, out = run("watchlists", "list")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "(NO PURPOSE: set one)" in lines["cli-auto"] and "border alerts" in lines["cli-list"]
    code, out = run("watchlists", "update", "cli-auto", "--purpose", "now it has one")
    assert code == 0 and "now it has one" in out and f"owner      {OFFICER}" in out

    code, out = run("watchlists", "add", "cli-list", "c-obama", "--expires", "2031-01-01")
    assert code == 0 and "c-obama" in out and "until 2031-01-01T00:00:00+00:00" in out
    code, out = run("watchlists", "members", "cli-list")
    assert code == 0 and "c-obama" in out and "current" in out
    code, out = run("watchlists", "show", "cli-list")
    assert code == 0 and "members    1 current" in out
    code, out = run("watchlists", "remove", "cli-list", "c-obama")
    assert code == 0 and "1 of 1 subject(s) removed" in out
    code, out = run("watchlists", "add", "cli-list", "ghost")
    assert code == 1 and "NOT_FOUND" in out and "'ghost' is not enrolled" in out
    code, out = run("watchlists", "delete", "cli-list")
    assert code == 0 and "deleted" in out
    code, out = run("watchlists", "show", "cli-list")
    assert code == 1 and "NOT_FOUND" in out
    auto = replica.gallery.store.list_members("cli-auto")
    assert [m.subject_id for m in auto] == ["c-obama"]
    assert abs((auto[0].expires_at - datetime.now(UTC)).total_seconds() - 3 * 86400) < 120
    [enrolled] = [r for r in records(audit, action="ENROL") if r.subject_id == "c-obama"]
    assert enrolled.purpose == "case 9"
