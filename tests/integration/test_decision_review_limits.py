"""Over-long fields at the decision service's APIs, on a real gRPC server on 127.0.0.1 with the real Review and Audit
servicers over SQLite: an alert id, a reviewer's comment or an audit filter longer than ``common/limits.py`` allows is
refused with INVALID_ARGUMENT before the servicer runs (no review is stored, no REVIEW record written), and the
refusal is audited as ACCESS_DENIED with the request-limits purpose, never with the field's value. A comment within
the shared limit is taken: the review store's own check is that same limit, not a second, stricter one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from sightline.common import limits
from sightline.common.audit import Action, AuditLog, AuditRecord, AuditServicer
from sightline.common.auth import AccessPolicy, Principal, Role, hash_token, new_token
from sightline.common.denials import LIMITS_PURPOSE, DenialAudit
from sightline.common.rpc import GrpcServer, channel
from sightline.decision.review.recorder import AlertRecorder
from sightline.decision.review.servicer import ReviewServicer
from sightline.decision.review.store import ReviewStore
from sightline.v1 import audit_pb2, audit_pb2_grpc, events_pb2, review_pb2, review_pb2_grpc

TOKEN = new_token()
ALERT_ID = "a1b2c3d4e5f6a7b8"


@dataclass
class Decision:
    reviews: review_pb2_grpc.ReviewServiceStub
    audit_api: audit_pb2_grpc.AuditServiceStub
    audit: AuditLog
    store: ReviewStore

    def refusals(self) -> list[AuditRecord]:
        return self.audit.records(action=Action.ACCESS_DENIED)


@pytest.fixture()
def decision(tmp_path: Path) -> Iterator[Decision]:
    """The decision service's gRPC side as ``service.main`` assembles it, with one reviewer-auditor and an alert."""
    url = f"sqlite:///{tmp_path / 'decision.db'}"
    audit, store = AuditLog.open(url), ReviewStore.open(url)
    denials = DenialAudit(audit)
    officer = Principal("officer-1", frozenset({Role.REVIEWER, Role.AUDITOR}), hash_token(TOKEN))
    server = GrpcServer("127.0.0.1", 0, workers=4, access=AccessPolicy([officer]), on_denied=denials)
    server.add(ReviewServicer(store, audit, lambda _: None))
    server.add(AuditServicer(audit))
    server.start()
    alert = events_pb2.Alert(
        alert_id=ALERT_ID,
        decision_id="d1",
        source_id="cam-1",
        subject_id="obama",
        watchlists=["wl"],
        status=events_pb2.ALERT_STATUS_PENDING_REVIEW,
    )
    alert.raised_at.GetCurrentTime()
    AlertRecorder(store, audit).record(alert)
    ch = channel(f"127.0.0.1:{server.port}", token=TOKEN)
    yield Decision(review_pb2_grpc.ReviewServiceStub(ch), audit_pb2_grpc.AuditServiceStub(ch), audit, store)
    ch.close()
    server.stop(0)
    denials.close()
    store.close()
    audit.close()


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        call()  # type: ignore[operator]
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
    return failed.value


def test_an_over_long_comment_is_refused_before_the_review_and_audited(decision: Decision) -> None:
    note = "n" * (limits.TEXT_LIMITS["comment"] + 1)
    request = review_pb2.ReviewAlertRequest(alert_id=ALERT_ID, action=review_pb2.REVIEW_ACTION_REJECT, comment=note)
    error = refused(lambda: decision.reviews.ReviewAlert(request, timeout=10))
    assert error.details() == f"comment: longer than {limits.TEXT_LIMITS['comment']} characters"
    assert decision.store.get(ALERT_ID).reviews == () and decision.store.get(ALERT_ID).status == "PENDING_REVIEW"
    assert decision.audit.records(action=Action.REVIEW) == []  # the servicer never ran
    (record,) = decision.refusals()
    assert (record.principal, record.purpose, record.result) == (
        "officer-1",
        LIMITS_PURPOSE,
        "refused: INVALID_ARGUMENT",
    )
    assert record.details["method"] == "/sightline.v1.ReviewService/ReviewAlert"
    assert "nnnn" not in str(record.details)


def test_over_long_ids_and_filters_are_refused_and_audited(decision: Decision) -> None:
    long_id = "f" * (limits.ID_CHARS + 1)
    refused(lambda: decision.reviews.GetAlert(review_pb2.GetAlertRequest(alert_id=long_id), timeout=10))
    confirm = review_pb2.ReviewAlertRequest(alert_id=long_id, action=review_pb2.REVIEW_ACTION_CONFIRM)
    refused(lambda: decision.reviews.ReviewAlert(confirm, timeout=10))
    listing = audit_pb2.ListAuditRecordsRequest(subject_id=long_id)
    refused(lambda: decision.audit_api.ListAuditRecords(listing, timeout=10))
    methods = [r.details["method"] for r in decision.refusals()]
    assert methods == [
        "/sightline.v1.ReviewService/GetAlert",
        "/sightline.v1.ReviewService/ReviewAlert",
        "/sightline.v1.AuditService/ListAuditRecords",
    ]
    assert all(r.purpose == LIMITS_PURPOSE and long_id not in str(r.details) for r in decision.refusals())


def test_a_comment_within_the_shared_limit_is_taken(decision: Decision) -> None:
    note = "n" * limits.TEXT_LIMITS["comment"]
    request = review_pb2.ReviewAlertRequest(alert_id=ALERT_ID, action=review_pb2.REVIEW_ACTION_CONFIRM, comment=note)
    reviewed = decision.reviews.ReviewAlert(request, timeout=10)
    assert reviewed.confirmations == 1 and reviewed.reviews[0].comment == note
    assert decision.refusals() == []
