"""One test per crash the fuzz suite found and that was fixed: the input that crashed, and what it gets now.

In process first (codec, images, configuration, policy, tokens file, capture's source policy), then the gRPC ones on
the suite's local stack (capture's Ingest, decision's ReviewService).
"""

from __future__ import annotations

import io
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from sightline.capture.settings import CaptureSettings
from sightline.capture.source_policy import SourcePolicy, SourceRefused
from sightline.common import auth, cloudevents, codec, rpc
from sightline.common.config import KafkaSettings
from sightline.common.images import decode_image
from sightline.common.topics import ALERTS, FACES
from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import Policy, load_policy
from sightline.decision.review.store import ReviewStore
from sightline.matching.service import _descriptors as descriptors
from sightline.tooling.hostile import alias_bomb
from sightline.tooling.localstack import LocalStack
from sightline.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    capture_pb2,
    capture_pb2_grpc,
    events_pb2,
    gallery_pb2,
    gallery_pb2_grpc,
    review_pb2,
    review_pb2_grpc,
    session_pb2,
    types_pb2,
)

pytestmark = pytest.mark.fuzz


# --- in process -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "nanos"), [(2**62, 0), (253_402_300_800, 0), (-62_135_596_801, 0), (0, -1)])
def test_an_event_with_a_timestamp_no_date_can_hold_is_malformed(seconds: int, nanos: int) -> None:
    # Was: parsed, then ValueError from Timestamp.ToDatetime when a stage sent its output (CloudEvents ce_time) or
    # decision checked erasures; outside the processor, so no dead letter could catch it.
    detected = events_pb2.FacesDetected()
    detected.frame.frame_id = "cam:1:1"
    detected.frame.captured_at.seconds, detected.frame.captured_at.nanos = seconds, nanos
    with pytest.raises(codec.MalformedEvent, match=r"frame\.captured_at is not a valid timestamp"):
        codec.parse(events_pb2.FacesDetected, detected.SerializeToString())
    assert cloudevents.with_event_headers(FACES.name, detected.SerializeToString(), []) == []


def test_an_event_with_valid_timestamps_still_parses() -> None:
    match = events_pb2.MatchResult()
    match.frame.frame_id = "cam:1:1"
    match.frame.captured_at.seconds = 253_402_300_799  # 9999-12-31T23:59:59Z, the last valid second
    match.matched_at.CopyFrom(codec.now())
    assert codec.parse(events_pb2.MatchResult, match.SerializeToString()) == match


def test_a_signed_32_bit_image_with_negative_values_decodes_to_black_not_garbage() -> None:
    # Was: RuntimeWarning "invalid value encountered in cast" and undefined pixels.
    pixels = np.array([[-5, -100], [7, -(2**31)]], dtype=np.int32)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="I").save(buffer, "TIFF")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rgb = decode_image(buffer.getvalue())
    assert rgb[:, :, 0].tolist() == [[0, 0], [255, 0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kafka: [1, 2]\n", "section 'kafka' must be a mapping"),  # was TypeError
        ("kafka: 5\n", "section 'kafka' must be a mapping"),  # was TypeError
        ("kafka: {1: 2}\n", "section 'kafka' must be a mapping"),  # was TypeError: keywords must be strings
        ("kafka: {bootstrap_servers: [\n", "not valid YAML"),  # was yaml's ParserError
        ("[" * 5000, "not valid YAML|nested too deeply"),  # was RecursionError, after seconds
        (alias_bomb("kafka", "bootstrap_servers"), "aliases are expanded"),  # was minutes of CPU
    ],
)
def test_a_broken_configuration_file_fails_with_a_value_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    config = tmp_path / "sightline.yaml"
    config.write_text(text)
    monkeypatch.setenv("SIGHTLINE_CONFIG_FILE", str(config))
    with pytest.raises(ValueError, match=message) as raised:
        KafkaSettings()
    assert str(config) in str(raised.value)


@pytest.mark.parametrize("text", ["[" * 5000, alias_bomb("version", "x")])
def test_a_policy_file_nested_too_deep_or_an_alias_bomb_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="policy file"):
        load_policy(path)


def test_a_policy_file_that_is_a_folder_is_refused_with_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read"):  # was IsADirectoryError
        load_policy(tmp_path)


def test_a_tokens_file_with_keys_of_several_types_is_refused_naming_them() -> None:
    # Was TypeError from sorting the unknown keys ('<' not supported between str and int).
    text = f"- {{principal: ops, roles: [operator], token_sha256: {'a' * 64}, 1: x, token: y}}\n"
    with pytest.raises(auth.TokensFileError, match=r"unknown keys \['1', 'token'\]"):
        auth.parse_principals(text)


@pytest.mark.parametrize(
    "entry",
    [
        '{principal: "ops\\n", roles: [operator], token_sha256: ' + "a" * 64 + "}",  # a name ending in a newline
        "{principal: ops, roles: [operator], token_sha256: " + '"' + "a" * 64 + '\\n"}',  # a hash ending in one
        "{principal: [ops], roles: [operator], token_sha256: " + "a" * 64 + "}",  # a list is not a name
    ],
)
def test_tokens_file_names_and_hashes_must_match_their_rule_whole(entry: str) -> None:
    with pytest.raises(auth.TokensFileError):
        auth.parse_principals(f"- {entry}\n")


def test_a_tokens_file_alias_bomb_is_refused() -> None:
    with pytest.raises(auth.TokensFileError, match="aliases are expanded"):
        auth.parse_principals(alias_bomb("roles", "x"))


def test_an_erasure_dated_at_the_end_of_time_withholds_decisions_without_overflowing(tmp_path: Path) -> None:
    # Was OverflowError (date value out of range) for every later decision naming the subject: the erasure time
    # plus the grace period is past datetime.max. An erasure notice may carry any valid timestamp.
    with ReviewStore.open(f"sqlite:///{tmp_path / 'review.db'}") as store:
        store.erase_subject("someone", datetime.max.replace(tzinfo=UTC))
        store.erase_subject("no-one", datetime.min.replace(tzinfo=UTC))
        assert store.erased_since("someone", datetime.now(UTC))
        assert not store.erased_since("no-one", datetime.now(UTC))
        assert store.erased_since("no-one", datetime.min.replace(tzinfo=UTC))


def test_an_unknown_enum_value_is_named_not_raised() -> None:
    # Was ValueError "Enum AlertStatus has no name defined for value 99" from the CloudEvents id of an alert (and
    # of a session event with an unknown kind, and in decision's session desk, which logs the kind).
    alert = events_pb2.Alert(alert_id="a1", status=99)
    headers = dict(cloudevents.with_event_headers(ALERTS.name, alert.SerializeToString(), []))
    assert headers["ce_id"] == b"a1:UNKNOWN_99"
    assert codec.enum_label(session_pb2.SessionEvent.Kind, 42, "KIND_") == "UNKNOWN_42"
    assert codec.enum_value(events_pb2.AlertStatus, "confirmed", "ALERT_STATUS_") == events_pb2.ALERT_STATUS_CONFIRMED
    with pytest.raises(ValueError, match="unknown AlertStatus 'SURE': one of UNSPECIFIED, PENDING_REVIEW"):
        codec.enum_value(events_pb2.AlertStatus, "SURE", "ALERT_STATUS_")


@pytest.mark.parametrize("vectors", [[[0.1] * 128, [0.1] * 64], [[float("nan")] * 128]])
def test_descriptors_of_the_wrong_length_or_not_numbers_are_a_malformed_event(vectors: list[list[float]]) -> None:
    # Was ValueError "setting an array element with a sequence" in matching (ragged vectors); NaN went on to
    # decision as a distance.
    embedded = events_pb2.FacesEmbedded()
    for n, vector in enumerate(vectors):
        embedded.faces.add(face_index=n, vector=vector)
    with pytest.raises(codec.MalformedEvent):
        descriptors(embedded)


def test_a_match_candidate_whose_distance_is_not_a_number_is_a_malformed_event() -> None:
    # Was StopIteration in the calibration table's lookup (no bin holds NaN), dead-lettered as internal_error.
    result = events_pb2.MatchResult(frame=types_pb2.FrameRef(frame_id="cam:1", source_id="cam"))
    result.faces.add(face_index=0, candidates=[types_pb2.MatchCandidate(subject_id="a", distance=float("nan"))])
    result.faces[0].quality.score = 90
    with pytest.raises(codec.MalformedEvent, match="not a finite number"):
        DecisionEngine(Policy()).decide(result)


def test_a_source_with_a_nul_character_is_refused_by_the_source_policy() -> None:
    # Was ValueError "embedded null byte" from stat(), which Ingest reported as UNKNOWN.
    with pytest.raises(SourceRefused, match="NUL"):
        SourcePolicy.local_files().vet("/tmp/frames\x00.jpg")


# --- on the local stack -----------------------------------------------------------------------------------------------


def _ingest(stack: LocalStack, request: capture_pb2.IngestRequest, timeout: float) -> grpc.RpcError | None:
    with rpc.channel(stack.addresses["capture"]) as channel:
        try:
            list(capture_pb2_grpc.CaptureServiceStub(channel).Ingest(request, timeout=timeout))
        except grpc.RpcError as error:
            return error
    return None


@pytest.mark.e2e
@pytest.mark.parametrize("fps", [math.nan, -1.0, math.inf, 1e-9, 1e9])
def test_ingest_refuses_a_sampling_rate_it_cannot_keep(
    hostile_stack: LocalStack, tmp_path: Path, face_images: tuple[bytes, ...], fps: float
) -> None:
    # Was: NaN and negative rates accepted; a tiny one paced a folder's frames for ages, or overflowed time.sleep.
    (tmp_path / "a.jpg").write_bytes(face_images[0])
    error = _ingest(hostile_stack, capture_pb2.IngestRequest(source_uri=str(tmp_path), fps=fps), timeout=30)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT and "fps" in (error.details() or "")


@pytest.mark.e2e
def test_an_ingest_the_caller_gave_up_on_frees_its_stream_slot_while_pacing(
    hostile_stack: LocalStack, tmp_path: Path
) -> None:
    # Was: a folder paced at the slowest rate slept until its next frame was due (1000 s) after the caller left,
    # holding its worker thread and its stream slot; once every slot was held, every Ingest was refused.
    slow = tmp_path / "slow"
    slow.mkdir()
    for index in range(2):
        Image.new("RGB", (16, 16)).save(slow / f"{index}.png")
    settings = CaptureSettings()  # what the local stack's capture runs with
    slots = settings.grpc_workers - settings.grpc_reserved_workers
    paced = capture_pb2.IngestRequest(source_uri=str(slow), source_id="paced", fps=0.001)
    with ThreadPoolExecutor(max_workers=slots) as pool:  # every slot taken, each call left after its first frame
        errors = list(pool.map(lambda _: _ingest(hostile_stack, paced, timeout=3.0), range(slots)))
    assert all(error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED for error in errors)
    time.sleep(1.0)  # the pacing loop notices the caller has gone within PACING_CHECK_S
    quick = capture_pb2.IngestRequest(source_uri=str(slow / "0.png"), source_id="quick", no_pacing=True)
    assert _ingest(hostile_stack, quick, timeout=30) is None


@pytest.mark.e2e
@pytest.mark.parametrize(
    "request_fields",
    [
        {"status": 99},  # was UNKNOWN: Enum AlertStatus has no name defined for value 99
        {"page_token": "9" * 30},  # was UNKNOWN: Python int too large to convert to SQLite INTEGER
    ],
)
def test_list_alerts_refuses_a_page_no_store_can_have(hostile_stack: LocalStack, request_fields: dict) -> None:
    with rpc.channel(hostile_stack.addresses["decision"]) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            review_pb2_grpc.ReviewServiceStub(channel).ListAlerts(
                review_pb2.ListAlertsRequest(**request_fields), timeout=30
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.e2e
@pytest.mark.parametrize(("seconds", "nanos"), [(2**62, 0), (0, -1)])
def test_list_feedback_refuses_a_since_that_is_no_time(hostile_stack: LocalStack, seconds: int, nanos: int) -> None:
    # Was UNKNOWN: Timestamp is not valid.
    request = review_pb2.ListFeedbackRequest()
    request.since.seconds, request.since.nanos = seconds, nanos
    with rpc.channel(hostile_stack.addresses["decision"]) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            review_pb2_grpc.ReviewServiceStub(channel).ListFeedback(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.e2e
@pytest.mark.parametrize(
    "request_fields",
    [
        {"action": 2**31 - 1},  # was UNKNOWN: Enum AuditAction has no name defined for value 2147483647
        {"after_sequence": 2**64 - 1},  # was UNKNOWN: Python int too large to convert to SQLite INTEGER
    ],
)
def test_list_audit_records_refuses_what_no_record_can_have(hostile_stack: LocalStack, request_fields: dict) -> None:
    with rpc.channel(hostile_stack.addresses["decision"]) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            audit_pb2_grpc.AuditServiceStub(channel).ListAuditRecords(
                audit_pb2.ListAuditRecordsRequest(**request_fields), timeout=30
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.e2e
def test_a_membership_expiry_that_is_no_time_is_invalid_argument(hostile_stack: LocalStack) -> None:
    # Was UNKNOWN: "Timestamp is not valid" from Enroll and AddMembers (ToDatetime's ValueError, not mapped).
    request = gallery_pb2.AddMembersRequest(watchlist="no-such-list", subject_ids=["someone"])
    request.expires_at.seconds = 2**62
    with rpc.channel(hostile_stack.addresses["matching"]) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            gallery_pb2_grpc.WatchlistServiceStub(channel).AddMembers(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid timestamp" in (raised.value.details() or "")
