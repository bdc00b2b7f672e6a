"""The limits every gRPC server enforces, on real servers on 127.0.0.1 whose refusals are audited (SQLite):

- idle health Watch and reflection streams, more of them than the server has threads, are held to their pools
  (more are refused with RESOURCE_EXHAUSTED), so health Check keeps answering within a second and callers without
  credentials cannot take the slots of authenticated API streams;
- idle streams are cancelled, freeing their slots; calls beyond maximum_concurrent_rpcs are refused at once;
- over-long fields are refused with INVALID_ARGUMENT naming the field (never echoing it) before the real gallery,
  watchlist and capture servicers see them, and each refusal is audited with the caller's principal (the
  decision's review APIs: test_decision_review_limits.py).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sightline.capture.service import Capture, CaptureServicer
from sightline.capture.settings import CaptureSettings
from sightline.common.audit import AuditLog, AuditRecord
from sightline.common.auth import AccessPolicy, Principal, Role, hash_token, new_token
from sightline.common.bus import read_topics
from sightline.common.denials import LIMITS_PURPOSE, DenialAudit
from sightline.common.rpc import GrpcServer, channel
from sightline.common.serverlimits import ServerLimits
from sightline.common.topics import FRAMES
from sightline.matching.audit_trail import GalleryAudit
from sightline.matching.peers import FaceClient
from sightline.matching.service import GalleryServicer, open_gallery
from sightline.matching.settings import MatchingSettings
from sightline.matching.templates import generate_key
from sightline.matching.watchlists import WatchlistServicer
from sightline.v1 import capture_pb2, capture_pb2_grpc, gallery_pb2, gallery_pb2_grpc

TOKEN = new_token()
OFFICER = "officer-1"
UNREACHABLE = "127.0.0.1:9"  # the gallery's detection and embedding: no refused request may get that far
SECRET = "Z" * 50  # in every over-long value: it must appear in no status and no audit record


@dataclass
class Running:
    server: GrpcServer
    address: str
    audit: AuditLog
    denials: DenialAudit

    def refusals(self) -> list[AuditRecord]:
        return self.audit.records(action="ACCESS_DENIED")


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """``serve(workers, limits, servicers=[factory(audit)])``: a started server, refusals audited."""
    started: list[Running] = []

    def start(
        workers: int = 4, limits: ServerLimits | None = None, servicers: tuple[Callable[[AuditLog], Any], ...] = ()
    ) -> Running:
        audit = AuditLog.open(f"sqlite:///{tmp_path / f'audit-{len(started)}.db'}")
        denials = DenialAudit(audit)
        officer = Principal(OFFICER, frozenset({Role.ENROLLER, Role.OPERATOR}), hash_token(TOKEN))
        server = GrpcServer("127.0.0.1", 0, workers, access=AccessPolicy([officer]), on_denied=denials, limits=limits)
        for factory in servicers:
            server.add(factory(audit))
        server.start()
        started.append(Running(server, f"127.0.0.1:{server.port}", audit, denials))
        return started[-1]

    yield start
    for running in started:
        running.server.stop(0)
        running.denials.close()
        running.audit.close()


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value


def wait_for(condition: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


# -- streams ----------------------------------------------------------------------------------------------------------


class ReflectionStream:
    """A reflection stream (open to anyone) that sends a request only when asked, idle otherwise."""

    def __init__(self, ch: grpc.Channel) -> None:
        self._requests: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        self._responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter(self._requests.get, None), timeout=60
        )

    def send(self) -> None:
        self._requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))

    def ask(self) -> object:
        self.send()
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()


class WatchStream:
    """A health Watch stream (open to anyone): the first status, then nothing while the status does not change."""

    def __init__(self, ch: grpc.Channel) -> None:
        self._responses = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60)

    def ask(self) -> object:
        return next(self._responses)

    def close(self) -> None:
        self._responses.cancel()


class HeldIngest(capture_pb2_grpc.CaptureServiceServicer):
    """An authenticated API stream that reports once, then stays open without a message (a paused camera)."""

    def Ingest(
        self, request: capture_pb2.IngestRequest, context: grpc.ServicerContext
    ) -> Iterator[capture_pb2.IngestResponse]:
        yield capture_pb2.IngestResponse(source_id=request.source_id)
        while context.is_active():
            time.sleep(0.05)


class IngestStream:
    def __init__(self, ch: grpc.Channel) -> None:
        self._responses = capture_pb2_grpc.CaptureServiceStub(ch).Ingest(
            capture_pb2.IngestRequest(source_uri="held", source_id="cam-1"), timeout=60
        )

    def ask(self) -> object:
        return next(self._responses)

    def close(self) -> None:
        self._responses.cancel()


Stream = ReflectionStream | WatchStream | IngestStream


@pytest.fixture()
def streams() -> Iterator[Callable[[Callable[[grpc.Channel], Stream], grpc.Channel], Stream]]:
    """``open(kind, channel)``: a stream of that kind, cancelled at the end of the test."""
    opened: list[Stream] = []

    def open_stream(kind: Callable[[grpc.Channel], Stream], ch: grpc.Channel) -> Stream:
        opened.append(kind(ch))
        return opened[-1]

    yield open_stream
    for stream in opened:
        stream.close()


def admitted(stream: Stream, pool_full: str = "") -> bool:
    """Whether the server answers the stream (True) or refuses it as its pool is full (False)."""
    try:
        stream.ask()
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert pool_full in error.details()
        return False
    return True


def timed_check(address: str) -> float:
    """Seconds health Check took to answer SERVING."""
    started = time.monotonic()
    with channel(address, token="") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - started


def test_idle_streams_are_held_to_their_pools_and_health_check_answers_within_a_second(
    serve: Callable[..., Running],
    streams: Callable[..., Stream],
) -> None:
    # 4 threads: 2 for streams, 1 of those for callers without credentials; 3 health Watch streams (no thread).
    limits = ServerLimits(max_streams=2, max_concurrent_rpcs=64, max_open_streams=1, max_watchers=3)
    running = serve(workers=4, limits=limits, servicers=[lambda _: HeldIngest()])
    anonymous, officer = channel(running.address, token=""), channel(running.address, token=TOKEN)
    try:
        # 10 idle anonymous streams, more than the server has threads (all started at once: which ones are
        # admitted is up to the server).
        watches = [streams(WatchStream, anonymous) for _ in range(6)]
        reflections = [streams(ReflectionStream, anonymous) for _ in range(4)]
        assert sorted(admitted(stream, "health Watch streams") for stream in watches) == [False] * 3 + [True] * 3
        reflected = [admitted(stream, "reflection streams") for stream in reflections]
        assert sorted(reflected) == [False] * 3 + [True]
        assert max(timed_check(running.address) for _ in range(5)) < 1.0
        # They could not take the authenticated stream's slot; the threaded pool is now full, Check still answers.
        assert admitted(streams(IngestStream, officer))
        assert not admitted(streams(IngestStream, officer), "streams this server runs at once")
        assert max(timed_check(running.address) for _ in range(5)) < 1.0
        # The anonymous reflection stream ends: its thread goes to the next authenticated stream.
        reflections[reflected.index(True)].close()
        assert wait_for(lambda: admitted(streams(IngestStream, officer)), timeout_s=5)
    finally:
        anonymous.close()
        officer.close()
    methods = {record.details["method"]: record for record in running.refusals()}
    assert set(methods) == {
        "/grpc.health.v1.Health/Watch",
        "/sightline.v1.CaptureService/Ingest",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }
    assert {(r.result, r.purpose) for r in methods.values()} == {("refused: RESOURCE_EXHAUSTED", LIMITS_PURPOSE)}
    assert methods["/sightline.v1.CaptureService/Ingest"].principal == OFFICER
    assert methods["/grpc.health.v1.Health/Watch"].principal == "anonymous"
    # Repeats of a kind are counted, not recorded one by one: one record per kind until the window closes.
    assert len(running.refusals()) == 3


def test_a_closed_stream_frees_its_slot(serve: Callable[..., Running], streams: Callable[..., Stream]) -> None:
    running = serve(workers=4, limits=ServerLimits(max_streams=2, max_concurrent_rpcs=64, max_watchers=1))
    with channel(running.address, token="") as ch:
        first = streams(WatchStream, ch)
        assert admitted(first) and not admitted(streams(WatchStream, ch))
        first.close()
        assert wait_for(lambda: admitted(streams(WatchStream, ch)), timeout_s=5)
        reflection = streams(ReflectionStream, ch)
        assert admitted(reflection) and not admitted(streams(ReflectionStream, ch))
        reflection.close()
        assert wait_for(lambda: admitted(streams(ReflectionStream, ch)), timeout_s=5)


def test_idle_streams_are_cancelled_and_free_their_slots(
    serve: Callable[..., Running],
    streams: Callable[..., Stream],
) -> None:
    limits = ServerLimits(max_streams=1, max_concurrent_rpcs=16, max_watchers=1, stream_idle_s=0.5)
    running = serve(workers=3, limits=limits)
    with channel(running.address, token="") as ch:
        idle_reflection, idle_watch = streams(ReflectionStream, ch), streams(WatchStream, ch)
        assert admitted(idle_reflection) and admitted(idle_watch)
        assert not admitted(streams(ReflectionStream, ch)) and not admitted(streams(WatchStream, ch))
        time.sleep(1.5)  # three idle periods
        for stream in (idle_reflection, idle_watch):
            assert refused(stream.ask).code() == grpc.StatusCode.CANCELLED
        busy = streams(ReflectionStream, ch)
        assert wait_for(lambda: admitted(busy), timeout_s=2)  # the slots are free again
        for _ in range(8):  # a stream with traffic is never idle, however long it stays open
            time.sleep(0.2)
            busy.ask()
        assert admitted(streams(WatchStream, ch))


def test_calls_beyond_maximum_concurrent_rpcs_are_refused_at_once(
    serve: Callable[..., Running],
    streams: Callable[..., Stream],
) -> None:
    # Two calls at once, on two threads: a third call is refused rather than queued behind them.
    running = serve(workers=2, limits=ServerLimits(max_streams=2, max_concurrent_rpcs=2, max_open_streams=2))
    with channel(running.address, token="") as ch:
        holding = [streams(ReflectionStream, ch) for _ in range(2)]
        assert all(admitted(stream) for stream in holding)  # both calls running, both threads held
        started = time.monotonic()
        error = refused(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - started < 1.0
        holding[0].close()  # one call ends: room for the next
        assert wait_for(lambda: answers(running.address), timeout_s=5)


def answers(address: str) -> bool:
    try:
        return timed_check(address) < 1.0
    except grpc.RpcError:
        return False


# -- over-long fields -------------------------------------------------------------------------------------------------


def assert_refused_for_length(error: grpc.RpcError, field: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith(f"{field}: ") and SECRET not in error.details()


def assert_audited(running: Running, expected: dict[str, str]) -> None:
    """Each refused method has one record naming the caller and the field, and no over-long value is anywhere."""
    records = running.refusals()
    assert {r.details["method"]: r.details["reason"] for r in records} == expected
    assert {(r.principal, r.result, r.purpose) for r in records} == {
        (OFFICER, "refused: INVALID_ARGUMENT", LIMITS_PURPOSE)
    }
    assert all(SECRET not in str(r) for r in running.audit.records())


def test_over_long_fields_never_reach_the_gallery_and_are_audited(
    serve: Callable[..., Running],
    tmp_path: Path,
) -> None:
    settings = MatchingSettings(
        template_key=generate_key(),
        database_url=f"sqlite:///{tmp_path / 'gallery.db'}",
        detection_addr=UNREACHABLE,
        embedding_addr=UNREACHABLE,
    )
    gallery = open_gallery(settings)
    faces = FaceClient(UNREACHABLE, UNREACHABLE, 1.0)
    running = serve(
        servicers=[
            lambda audit: GalleryServicer(gallery, faces, settings, GalleryAudit(audit)),
            lambda audit: WatchlistServicer(gallery, GalleryAudit(audit)),
        ]
    )
    try:
        with channel(running.address, token=TOKEN) as ch:
            galleries, lists = gallery_pb2_grpc.GalleryServiceStub(ch), gallery_pb2_grpc.WatchlistServiceStub(ch)
            long_id = "p-" + SECRET * 200  # 10,002 characters
            for _ in range(3):  # repeats of one kind are counted, not recorded one by one
                assert_refused_for_length(
                    refused(
                        lambda: galleries.Enroll(
                            gallery_pb2.EnrollRequest(subject_id=long_id, images=[b"image"]), timeout=10
                        )
                    ),
                    "subject_id",
                )
            assert_refused_for_length(
                refused(
                    lambda: lists.CreateWatchlist(
                        gallery_pb2.CreateWatchlistRequest(
                            watchlist=gallery_pb2.Watchlist(name="w", purpose=SECRET * 100)
                        ),
                        timeout=10,
                    )
                ),
                "watchlist.purpose",
            )
            assert_refused_for_length(
                refused(
                    lambda: lists.AddMembers(
                        gallery_pb2.AddMembersRequest(watchlist="w", subject_ids=["p-1"] * 1001), timeout=10
                    )
                ),
                "subject_ids",
            )
            # Within the limits, the same call reaches the servicer (and fails at the unreachable face services).
            error = refused(
                lambda: galleries.Enroll(gallery_pb2.EnrollRequest(subject_id="p-1", images=[b"image"]), timeout=10)
            )
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "face services" in error.details()
        assert gallery.store.subject_ids() == set() and gallery.store.list_watchlists() == []
        assert_audited(
            running,
            {
                "/sightline.v1.GalleryService/Enroll": "subject_id: longer than 256 characters",
                "/sightline.v1.WatchlistService/CreateWatchlist": "watchlist.purpose: longer than 4096 characters",
                "/sightline.v1.WatchlistService/AddMembers": "subject_ids: more than 1000 entries",
            },
        )
    finally:
        gallery.close()


def test_an_over_long_source_id_is_refused_at_ingest_and_nothing_is_published(
    serve: Callable[..., Running],
    kafka: object,
    face_photos: Path,
) -> None:
    capture = Capture(CaptureSettings(), kafka)  # type: ignore[arg-type]
    running = serve(servicers=[lambda _: CaptureServicer(capture)])
    since_ms = int(time.time() * 1000)
    try:
        with channel(running.address, token=TOKEN) as ch:
            ingest = capture_pb2_grpc.CaptureServiceStub(ch).Ingest
            photo = str(face_photos / "obama.jpg")
            assert_refused_for_length(
                refused(
                    lambda: list(
                        ingest(capture_pb2.IngestRequest(source_uri=photo, source_id="cam-" + SECRET * 100), timeout=10)
                    )
                ),
                "source_id",
            )
            assert_refused_for_length(
                refused(
                    lambda: list(
                        ingest(
                            capture_pb2.IngestRequest(source_uri=photo + "?" + SECRET * 50, source_id="cam-ok"),
                            timeout=10,
                        )
                    )
                ),
                "source_uri",
            )
        published = list(read_topics(kafka, [FRAMES.name], since_ms, idle_timeout_s=1.0))  # type: ignore[arg-type]
        assert not [record for record in published if SECRET.encode() in (record.key or b"") + (record.value or b"")]
        reasons = sorted(r.details["reason"] for r in running.refusals())
        assert reasons == ["source_id: longer than 256 characters", "source_uri: longer than 2048 characters"]
        assert {r.principal for r in running.refusals()} == {OFFICER}
    finally:
        capture.producer.close()
