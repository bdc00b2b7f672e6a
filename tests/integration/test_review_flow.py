"""Human review against a real decision service process: alerts raised from the matches topic, reviewed over gRPC
and with the ``sightline review`` command, every status change on the alerts topic, every action in the audit chain.
Reviewers are who their bearer tokens say (a tokens file given to the stack); a call without one is refused.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from sightline.common.auth import AUTHORIZATION_KEY, Principal, Role, dump_principals, hash_token, new_token
from sightline.common.bus import make_producer, read_topics
from sightline.common.config import KafkaSettings
from sightline.common.rpc import channel
from sightline.common.topics import ALERTS, AUDIT, DECISIONS, MATCHES
from sightline.tooling.localstack import LocalStack
from sightline.v1 import audit_pb2, audit_pb2_grpc, events_pb2, review_pb2, review_pb2_grpc, types_pb2

REVIEWERS = ("alice", "bob", "carol")
TOKENS = {name: new_token() for name in (*REVIEWERS, "dana")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    run_dir = tmp_path_factory.mktemp("review")
    tokens_file = run_dir / "reviewers.yaml"
    tokens_file.write_text(
        dump_principals(
            [Principal(name, frozenset({Role.REVIEWER}), hash_token(TOKENS[name])) for name in REVIEWERS]
            + [Principal("dana", frozenset({Role.AUDITOR}), hash_token(TOKENS["dana"]))]
        )
    )
    env = {
        "SIGHTLINE_DECISION_DATABASE_URL": f"sqlite:///{run_dir / 'decision.db'}",
        "SIGHTLINE_AUDIT_DATABASE_URL": f"sqlite:///{run_dir / 'audit.db'}",
        "SIGHTLINE_AUTH_TOKENS_FILE": str(tokens_file),
    }
    with LocalStack(run_dir, ports="auto", services=("decision",), env=env) as running:
        running.start(timeout=120)
        yield running


@pytest.fixture(scope="module")
def kafka(stack: LocalStack) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=stack.bootstrap_servers, session_timeout_ms=2000, heartbeat_interval_ms=500)


@pytest.fixture(scope="module")
def review(stack: LocalStack) -> review_pb2_grpc.ReviewServiceStub:
    """As the stack's own local-admin: this process started the stack, so its channels carry that token."""
    return review_pb2_grpc.ReviewServiceStub(channel(stack.addresses["decision"]))


def database(stack: LocalStack) -> Path:
    """The audit trail's database."""
    return stack.run_dir / "audit.db"


def sightline(
    *args: str, as_: str = "", run_dir: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The command line, as the holder of ``as_``'s token ($SIGHTLINE_TOKEN), or with no token at all; ``run_dir``
    is where it looks for a running local stack (its addresses and its own token)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SIGHTLINE_TOKEN", "SIGHTLINE_AUTH_TOKEN")}
    if as_:
        env["SIGHTLINE_TOKEN"] = TOKENS[as_]
    if run_dir is not None:
        env["SIGHTLINE_RUN_DIR"] = str(run_dir)
    return subprocess.run(
        [sys.executable, "-m", "sightline.cli.main", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def match_result(source: str, seq: int, t: float, subject: str = "obama") -> events_pb2.MatchResult:
    """What matching publishes for one frame: one good-quality face whose best candidate is on a watchlist."""
    frame = types_pb2.FrameRef(
        frame_id=f"{source}:{seq}", source_id=source, sequence=seq, purpose=types_pb2.PURPOSE_CCTV
    )
    frame.captured_at.FromNanoseconds(int(t * 1e9))
    result = events_pb2.MatchResult(frame=frame, model_name="dlib_resnet", model_version="1")
    face = result.faces.add(face_index=0)
    face.quality.score = 80.0
    face.candidates.add(subject_id=subject, distance=0.33, similarity=0.72, watchlists=["watch"])
    return result


def raise_alert(kafka: KafkaSettings, source: str) -> None:
    """Two agreeing frames on the matches topic: the default policy's MATCH, and an alert."""
    producer = make_producer(kafka)
    now = time.time()
    for seq in (1, 2):
        producer.send(
            MATCHES.name, key=source.encode(), value=match_result(source, seq, now + seq * 0.2).SerializeToString()
        )
    producer.flush(10)
    producer.close()


def wait_for(
    kafka: KafkaSettings,
    topic: str,
    parse: Callable[[bytes], Any],
    done: Callable[[list[Any]], bool],
    timeout: float = 60.0,
) -> list[Any]:
    """The records of a topic, from the start, once ``done(records)`` holds; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [parse(r.value) for r in read_topics(kafka, [topic], idle_timeout_s=1.0)]
        if done(seen) or time.monotonic() > deadline:
            assert done(seen), f"timed out waiting on {topic}: {seen}"
            return seen
        time.sleep(0.5)


def alert_events(kafka: KafkaSettings, source: str, statuses: list[int]) -> list[events_pb2.Alert]:
    def parse(value: bytes) -> events_pb2.Alert:
        return events_pb2.Alert.FromString(value)

    def done(seen: list[events_pb2.Alert]) -> bool:
        return [a.status for a in seen if a.source_id == source] == statuses

    return [a for a in wait_for(kafka, ALERTS.name, parse, done) if a.source_id == source]


def as_reviewer(name: str) -> list[tuple[str, str]]:
    """Call metadata with the reviewer's bearer token (it replaces the channel's own)."""
    return [(AUTHORIZATION_KEY, f"Bearer {TOKENS[name]}")]


def test_two_person_review_over_grpc(
    stack: LocalStack, kafka: KafkaSettings, review: review_pb2_grpc.ReviewServiceStub
) -> None:
    raise_alert(kafka, "gate-cam")
    (raised,) = alert_events(kafka, "gate-cam", [events_pb2.ALERT_STATUS_PENDING_REVIEW])
    assert raised.subject_id == "obama" and list(raised.watchlists) == ["watch"]

    stored = review.GetAlert(review_pb2.GetAlertRequest(alert_id=raised.alert_id), timeout=10)
    assert stored.alert.status == events_pb2.ALERT_STATUS_PENDING_REVIEW and stored.confirmations_required == 2
    confirm = review_pb2.ReviewAlertRequest(
        alert_id=raised.alert_id, action=review_pb2.REVIEW_ACTION_CONFIRM, comment="matches the watchlist photo"
    )
    first = review.ReviewAlert(confirm, metadata=as_reviewer("alice"), timeout=10)
    assert first.alert.status == events_pb2.ALERT_STATUS_PENDING_REVIEW and first.confirmations == 1
    with pytest.raises(grpc.RpcError) as twice:
        review.ReviewAlert(confirm, metadata=as_reviewer("alice"), timeout=10)
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "second, different reviewer" in twice.value.details()
    anonymous_stub = review_pb2_grpc.ReviewServiceStub(channel(stack.addresses["decision"], token=""))
    with pytest.raises(grpc.RpcError) as anonymous:
        anonymous_stub.ReviewAlert(confirm, timeout=10)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as claimed:  # naming oneself in metadata, as before tokens, counts for nothing
        anonymous_stub.ReviewAlert(confirm, metadata=[("x-sightline-principal", "bob")], timeout=10)
    assert claimed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    second = review.ReviewAlert(confirm, metadata=as_reviewer("bob"), timeout=10)
    assert second.alert.status == events_pb2.ALERT_STATUS_CONFIRMED
    assert [(r.reviewer, r.action) for r in second.reviews] == [
        ("alice", review_pb2.REVIEW_ACTION_CONFIRM),
        ("bob", review_pb2.REVIEW_ACTION_CONFIRM),
    ]

    # Integrators see the alert raised, then confirmed: each status change, on the alerts topic.
    changes = alert_events(
        kafka, "gate-cam", [events_pb2.ALERT_STATUS_PENDING_REVIEW, events_pb2.ALERT_STATUS_CONFIRMED]
    )
    assert {a.alert_id for a in changes} == {raised.alert_id}
    with pytest.raises(grpc.RpcError) as closed:
        review.ReviewAlert(
            review_pb2.ReviewAlertRequest(alert_id=raised.alert_id, action=review_pb2.REVIEW_ACTION_REJECT),
            metadata=as_reviewer("carol"),
            timeout=10,
        )
    assert closed.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in closed.value.details()

    # The audit trail: the alert, both reviews (and the refusals), chained; the chain verifies over gRPC too.
    audit = audit_pb2_grpc.AuditServiceStub(channel(stack.addresses["decision"], token=TOKENS["dana"]))
    records = audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(page_size=100), timeout=10).records
    about = [r for r in records if r.details.get("alert_id") == raised.alert_id]
    summary = [(audit_pb2.AuditAction.Name(r.action), r.principal, r.result) for r in about]
    assert ("AUDIT_ACTION_ALERT", "service:decision", "PENDING_REVIEW") in summary
    assert ("AUDIT_ACTION_REVIEW", "alice", "PENDING_REVIEW") in summary
    assert ("AUDIT_ACTION_REVIEW", "bob", "CONFIRMED") in summary
    assert any(p == "carol" and result.startswith("refused") for _, p, result in summary)
    assert all(r.subject_id == "obama" for r in about if r.action != audit_pb2.AUDIT_ACTION_ACCESS_DENIED)
    refusals = [
        (r.principal, r.result, r.details["method"])
        for r in records
        if r.action == audit_pb2.AUDIT_ACTION_ACCESS_DENIED
    ]
    # Two anonymous calls, one kind of refusal within a minute: audited at once, the repeat counted in a record
    # written when the window closes (common/denials.py), so a flood of bad calls cannot flood the chain.
    assert refusals == [("anonymous", "refused: UNAUTHENTICATED", "/sightline.v1.ReviewService/ReviewAlert")]
    as_reviewer_only = audit_pb2_grpc.AuditServiceStub(channel(stack.addresses["decision"], token=TOKENS["alice"]))
    with pytest.raises(grpc.RpcError) as not_auditor:
        as_reviewer_only.VerifyChain(audit_pb2.VerifyChainRequest(), timeout=10)
    assert not_auditor.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert audit.VerifyChain(audit_pb2.VerifyChainRequest(), timeout=10).intact

    # Every record also went to the audit topic, in chain order.
    published = wait_for(kafka, AUDIT.name, audit_pb2.AuditRecord.FromString, lambda seen: len(seen) >= len(records))
    assert [r.hash for r in published[: len(records)]] == [r.hash for r in records]


def test_review_and_audit_commands(stack: LocalStack, kafka: KafkaSettings, tmp_path: Path) -> None:
    address = stack.addresses["decision"]
    raise_alert(kafka, "lobby-cam")
    (raised,) = alert_events(kafka, "lobby-cam", [events_pb2.ALERT_STATUS_PENDING_REVIEW])
    short = raised.alert_id[:12]

    unauthenticated = sightline("review", "list", "--decision", address)
    assert unauthenticated.returncode == 1 and "UNAUTHENTICATED" in unauthenticated.stderr
    # Against the stack of its run dir, the command finds the address and the stack's own (local-admin) token.
    as_stack_admin = sightline("review", "list", run_dir=stack.run_dir)
    assert as_stack_admin.returncode == 0 and short in as_stack_admin.stdout, as_stack_admin.stderr
    listed = sightline("review", "list", "--decision", address, as_="carol")
    assert listed.returncode == 0, listed.stderr
    assert "PENDING_REVIEW" in listed.stdout and short in listed.stdout and "confirmations 0/2" in listed.stdout
    confirmed = sightline("review", "confirm", short, "--decision", address, as_="alice")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "confirmations 1/2" in confirmed.stdout and "CONFIRM" in confirmed.stdout and "by alice" in confirmed.stdout
    again = sightline("review", "confirm", short, "--decision", address, as_="alice")
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr and "already confirmed" in again.stderr
    claimed = sightline("review", "reject", short, "--as", "bob", "--decision", address, as_="alice")
    assert claimed.returncode == 2 and "--as is gone" in claimed.stderr
    rejected = sightline(
        "review",
        "reject",
        short,
        "--not-this-person",
        "--comment",
        "lookalike",
        "--decision",
        address,
        "--token",
        TOKENS["bob"],
    )
    assert rejected.returncode == 0, rejected.stderr
    assert "ALERT REJECTED" in rejected.stdout and "not-this-person: lookalike" in rejected.stdout
    shown = sightline("review", "show", short, "--decision", address, as_="carol")
    assert shown.returncode == 0 and raised.alert_id in shown.stdout and shown.stdout.count(" by ") == 2
    assert sightline("review", "show", "ffffff", "--decision", address, as_="carol").returncode == 1
    alert_events(kafka, "lobby-cam", [events_pb2.ALERT_STATUS_PENDING_REVIEW, events_pb2.ALERT_STATUS_REJECTED])

    # "Not this person": the same subject on the same camera, after the cool-down, is matched but raises no alert.
    producer = make_producer(kafka)
    later = time.time() + 120
    for seq in (3, 4):
        producer.send(
            MATCHES.name, key=b"lobby-cam", value=match_result("lobby-cam", seq, later + seq).SerializeToString()
        )
    producer.flush(10)
    producer.close()
    decisions = wait_for(
        kafka,
        DECISIONS.name,
        events_pb2.Decision.FromString,
        lambda seen: {d.frame.sequence for d in seen if d.frame.source_id == "lobby-cam"} >= {3, 4},
    )
    suppressed = [d for d in decisions if d.frame.source_id == "lobby-cam" and d.frame.sequence in (3, 4)]
    assert not any(d.alert_id for d in suppressed)
    assert any(d.outcome == events_pb2.OUTCOME_MATCH and "alert suppressed" in d.reasons[-1] for d in suppressed)
    alert_events(kafka, "lobby-cam", [events_pb2.ALERT_STATUS_PENDING_REVIEW, events_pb2.ALERT_STATUS_REJECTED])

    url = f"sqlite:///{database(stack)}"
    verified = sightline("audit", "verify", "--database-url", url)
    assert verified.returncode == 0 and "intact" in verified.stdout, verified.stdout + verified.stderr
    listing = sightline("audit", "list", "--action", "review", "--database-url", url)
    assert listing.returncode == 0 and "principal" not in listing.stderr
    assert "alice" in listing.stdout and "bob" in listing.stdout and "REJECTED" in listing.stdout

    # A copy of the database, edited behind the service's back, fails verification and names the record.
    copy = tmp_path / "tampered.db"
    shutil.copy(database(stack), copy)
    with sqlite3.connect(copy) as conn:
        conn.execute("DROP TRIGGER audit_records_no_update")
        conn.execute("UPDATE audit_records SET principal = 'mallory' WHERE sequence = 2")
    # The keyring stays with the stack: the copy's records are checked against the key they were written with.
    broken = sightline(
        "audit", "verify", "--database-url", f"sqlite:///{copy}", "--keys-file", str(stack.run_dir / "audit.keys")
    )
    assert broken.returncode == 1 and "BROKEN at record 2" in broken.stdout
    missing = sightline("audit", "verify", "--database-url", f"sqlite:///{tmp_path / 'none.db'}")
    assert missing.returncode == 2 and "no audit log" in missing.stderr
