"""Every gRPC method of every service of a running local stack, called with generated hostile messages.

The methods are not listed here: each server is asked for its services (server reflection) and the generated
descriptors give their methods and message types, so a method added to the protos is fuzzed without a change here.
Each message is drawn by ``sightline.tooling.hostile`` from a fixed seed; half of the fields that name a real thing
(a subject, a watchlist, an open gate session, a folder capture may read) get a real one, so calls get past "not
found". A tenth of the calls carry no token or a wrong one.

The contract of every call: a status the caller can act on. Never INTERNAL, never UNKNOWN (an exception the
servicer did not map), never DEADLINE_EXCEEDED on a unary call (a hang); and no service process exits. The small test
runs in the default suite; the ``slow`` one makes SIGHTLINE_FUZZ_INPUTS calls (2,000; 10,000 for docs/reliability.md)
spread over every method.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from fuzz_budget import FUZZ_INPUTS, FUZZ_SEED
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import sightline.v1
from sightline.cli.gallery import enroll
from sightline.cli.watchlists import watchlist_stub
from sightline.common import auth, rpc
from sightline.tooling.hostile import HostileImages, corrupt, hostile_message
from sightline.tooling.localstack import LocalStack
from sightline.v1 import gallery_pb2, session_pb2, session_pb2_grpc

pytestmark = [pytest.mark.fuzz, pytest.mark.e2e]

DEFAULT_CALLS_PER_METHOD = 12
UNARY_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 5.0  # a stream's length is the caller's choice (a slow Ingest): cut it, and that is no failure
STREAM_MESSAGES = 3
FAILING = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SUBJECT, WATCHLIST, GATE = "fuzz-subject", "fuzz-list", "fuzz-gate"
# Served only by a sharded gallery (SIGHTLINE_MATCHING_SHARDS > 1), which the local stack is not.
NOT_ON_A_LOCAL_STACK = {"sightline.v1.ShardService"}


@dataclass(frozen=True)
class Method:
    service: str  # the gRPC server (capture, detection, ...)
    path: str  # /package.Service/Method
    descriptor: MethodDescriptor

    @property
    def request_type(self) -> Any:
        return message_factory.GetMessageClass(self.descriptor.input_type)

    @property
    def response_type(self) -> Any:
        return message_factory.GetMessageClass(self.descriptor.output_type)


@dataclass(frozen=True)
class Call:
    method: Method
    code: grpc.StatusCode
    details: str

    def failed(self) -> bool:
        timed_out = self.code == grpc.StatusCode.DEADLINE_EXCEEDED and not self.method.descriptor.server_streaming
        return self.code in FAILING or timed_out

    def text(self) -> str:
        return f"{self.method.path} {self.code.name} {self.details}"


def served_methods(stack: LocalStack) -> list[Method]:
    """Every method of every Sightline service each server says it serves (server reflection)."""
    for module in pkgutil.iter_modules(sightline.v1.__path__):  # the descriptors of every proto file
        importlib.import_module(f"sightline.v1.{module.name}")
    methods = []
    for service, address in stack.addresses.items():
        with rpc.channel(address) as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            reply = next(reflection.ServerReflectionInfo(iter([ask]), timeout=10))
        names = [s.name for s in reply.list_services_response.service if s.name.startswith("sightline.")]
        for name in names:
            for method in descriptor_pool.Default().FindServiceByName(name).methods:
                methods.append(Method(service, f"/{name}/{method.name}", method))
    return methods


@pytest.fixture(scope="module")
def methods(hostile_stack: LocalStack) -> list[Method]:
    found = served_methods(hostile_stack)
    # Every method of the role table is served by some process of the stack, and so is fuzzed; but for those of
    # services a local stack does not run.
    expected = {path for path in auth.METHOD_ROLES if path.split("/")[1] not in NOT_ON_A_LOCAL_STACK}
    assert expected <= {method.path for method in found}
    return found


@pytest.fixture(scope="module")
def known_values(
    hostile_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory, face_images: tuple[bytes, ...]
) -> dict[str, list[object]]:
    """Real values for fields of these names: an enrolled subject on a watchlist, an open gate session, a folder of
    hostile images capture may read (the local stack lets capture read the temporary folder)."""
    gallery = hostile_stack.addresses["matching"]
    watchlist = gallery_pb2.Watchlist(name=WATCHLIST, purpose="fuzzing", owner="fuzz suite")
    watchlist_stub(gallery).CreateWatchlist(gallery_pb2.CreateWatchlistRequest(watchlist=watchlist), timeout=30)
    folder = tmp_path_factory.mktemp("hostile-source")
    portrait = folder / "portrait.jpg"
    portrait.write_bytes(face_images[0])
    assert enroll(SUBJECT, [portrait], [WATCHLIST], address=gallery) == 1
    rng = random.Random(FUZZ_SEED)
    images = HostileImages(extra_seeds=face_images)
    for index in range(6):
        (folder / f"{index:02d}.{rng.choice(['jpg', 'png', 'gif', 'tiff'])}").write_bytes(images.image(rng))
    with rpc.channel(hostile_stack.addresses["capture"]) as channel:
        opened = session_pb2_grpc.KioskServiceStub(channel).OpenSession(
            session_pb2.OpenSessionRequest(gate_id=GATE, subject_id=SUBJECT), timeout=30
        )
    return {
        "subject_id": [SUBJECT],
        "subject_ids": [SUBJECT],
        "claim_subject_id": [SUBJECT],
        "name": [WATCHLIST],
        "watchlists": [WATCHLIST],
        "stop_lists": [WATCHLIST],
        "session_id": [opened.session_id],
        "gate_id": [GATE],
        "source_uri": [str(folder), str(portrait), str(folder / "00.jpg")],
        "portrait": list(face_images),
        "images": list(face_images),
        "image": list(face_images),
    }


class Caller:
    """Calls methods with generated requests on a stack: the admin token mostly, none or a wrong one sometimes."""

    def __init__(self, stack: LocalStack, known: dict[str, list[object]], images: HostileImages, seed: int) -> None:
        self.rng = random.Random(seed)
        self.known, self.images = known, images
        self._channels: dict[tuple[str, str], grpc.Channel] = {}
        self._stack = stack

    def call(self, method: Method) -> Call:
        request = hostile_message(method.request_type, self.rng, self.images, known=self.known)
        credentials = self.rng.choices(["admin", "none", "wrong"], weights=[18, 1, 1])[0]
        channel = self._channel(method.service, credentials)
        try:
            if method.descriptor.server_streaming:
                stream = channel.unary_stream(
                    method.path,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=method.response_type.FromString,
                )(request, timeout=STREAM_TIMEOUT_S)
                for _, _response in zip(range(STREAM_MESSAGES), stream, strict=False):
                    pass
                stream.cancel()
            else:
                channel.unary_unary(
                    method.path,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=method.response_type.FromString,
                )(request, timeout=UNARY_TIMEOUT_S)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.CANCELLED and method.descriptor.server_streaming:
                return Call(method, grpc.StatusCode.OK, "stream cut by the caller")
            return Call(method, code, error.details() or "")
        return Call(method, grpc.StatusCode.OK, "")

    def _channel(self, service: str, credentials: str) -> grpc.Channel:
        key = (service, credentials)
        if key not in self._channels:
            token = {"admin": None, "none": "", "wrong": "not-a-token-of-this-stack"}[credentials]
            self._channels[key] = rpc.channel(self._stack.addresses[service], token=token)
        return self._channels[key]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


@pytest.fixture()
def caller(
    hostile_stack: LocalStack, known_values: dict[str, list[object]], hostile_images: HostileImages
) -> Iterator[Caller]:
    calling = Caller(hostile_stack, known_values, hostile_images, FUZZ_SEED)
    yield calling
    calling.close()


def fuzz_methods(stack: LocalStack, methods: list[Method], caller: Caller, per_method: int) -> Counter[str]:
    started = time.monotonic()
    calls = [caller.call(method) for _ in range(per_method) for method in methods]
    codes = Counter(f"{call.method.path} {call.code.name}" for call in calls)
    failures = [call.text() for call in calls if call.failed()]
    print(f"\n{len(calls)} calls to {len(methods)} methods in {time.monotonic() - started:.1f} s")
    for line, count in sorted(codes.items()):
        print(f"  {count:5d} {line}")
    assert not failures, "\n".join(sorted(set(failures))[:20])
    assert stack.poll_crashed() == []
    return codes


def test_every_method_answers_generated_messages_with_a_status_a_caller_can_act_on(
    hostile_stack: LocalStack, methods: list[Method], caller: Caller
) -> None:
    codes = fuzz_methods(hostile_stack, methods, caller, DEFAULT_CALLS_PER_METHOD)
    assert sum(codes.values()) == DEFAULT_CALLS_PER_METHOD * len(methods)


@pytest.mark.slow
def test_every_method_answers_thousands_of_generated_messages(
    hostile_stack: LocalStack, methods: list[Method], caller: Caller
) -> None:
    per_method = -(-FUZZ_INPUTS // len(methods))  # at least FUZZ_INPUTS calls in all
    codes = fuzz_methods(hostile_stack, methods, caller, per_method)
    assert sum(codes.values()) == per_method * len(methods)


def test_requests_that_do_not_parse_are_refused_as_invalid_argument(
    hostile_stack: LocalStack, methods: list[Method]
) -> None:
    rng = random.Random(FUZZ_SEED)
    codes = Counter()
    for method in methods:
        garbage = corrupt(method.request_type().SerializeToString(), rng) + b"\x0a\xff\xff\xff\x0f"
        with rpc.channel(hostile_stack.addresses[method.service]) as channel:
            try:
                call = channel.unary_stream if method.descriptor.server_streaming else channel.unary_unary
                result = call(method.path)(garbage, timeout=UNARY_TIMEOUT_S)
                list(result) if method.descriptor.server_streaming else None
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
    assert codes == Counter({"INVALID_ARGUMENT": len(methods)})
    assert hostile_stack.poll_crashed() == []
