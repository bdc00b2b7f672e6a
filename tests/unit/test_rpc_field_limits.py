"""The field limits every gRPC server applies to each request (``limits.violation``), on the real request messages:
ids, free text, URIs, lists, nested messages and maps; the reason names the field and never carries its value."""

from __future__ import annotations

import pytest

from sightline.common import limits
from sightline.v1 import audit_pb2, capture_pb2, gallery_pb2, review_pb2, session_pb2

SECRET = "Q" * 40


@pytest.mark.parametrize(
    ("request_message", "reason"),
    [
        (
            capture_pb2.IngestRequest(source_uri="/photos", source_id="cam-" + SECRET * 7),
            "source_id: longer than 256 characters",
        ),
        (
            capture_pb2.IngestRequest(source_uri="rtsp://camera/" + SECRET * 52),
            "source_uri: longer than 2048 characters",
        ),
        (
            gallery_pb2.EnrollRequest(subject_id="p-1", watchlists=["staff", SECRET * 7]),
            "watchlists: longer than 256 characters",
        ),
        (
            gallery_pb2.CreateWatchlistRequest(watchlist=gallery_pb2.Watchlist(name="w", purpose=SECRET * 103)),
            "watchlist.purpose: longer than 4096 characters",
        ),
        (
            gallery_pb2.AddMembersRequest(watchlist="w", subject_ids=["p-1"] * 1001),
            "subject_ids: more than 1000 entries",
        ),
        (
            review_pb2.ReviewAlertRequest(alert_id="abcdef", comment=SECRET * 103),
            "comment: longer than 4096 characters",
        ),
        (
            session_pb2.CancelSessionRequest(session_id="s-1", reason=SECRET * 103),
            "reason: longer than 4096 characters",
        ),
        (audit_pb2.AuditRecord(details={"source_id": SECRET * 103}), "details: longer than 4096 characters"),
        (audit_pb2.AuditRecord(details={SECRET * 7: "x"}), "details key: longer than 256 characters"),
    ],
)
def test_a_request_over_a_limit_is_named_by_its_field(request_message: object, reason: str) -> None:
    assert limits.violation(request_message) == reason  # type: ignore[arg-type]
    assert SECRET not in reason


def test_requests_at_the_limits_pass() -> None:
    assert (
        limits.violation(capture_pb2.IngestRequest(source_uri="u" * limits.URI_CHARS, source_id="s" * limits.ID_CHARS))
        is None
    )
    assert limits.violation(gallery_pb2.AddMembersRequest(watchlist="w", subject_ids=["p"] * limits.MAX_ITEMS)) is None
    assert limits.violation(review_pb2.ReviewAlertRequest(alert_id="a", comment="c" * limits.TEXT_CHARS)) is None


def test_bytes_fields_are_left_to_the_message_size_limit() -> None:
    """Images are as large as a photo: the server's message size limit bounds them, not the field limits."""
    assert limits.violation(gallery_pb2.EnrollRequest(subject_id="p-1", images=[b"\xff" * 1_000_000])) is None
