"""The review API (``ReviewService`` on decision): alerts and their human review under the two-person rule.

The reviewer is the principal of the client's bearer token, never a parameter: two reviewers use two clients (two
tokens). A first confirmation keeps an alert PENDING_REVIEW; a second by another reviewer makes it CONFIRMED; a
rejection makes it REJECTED. Each status change is published on ``sightline.alerts.v1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import cast

from sightline.common.codec import enum_value
from sightline.sdk.connection import Connection
from sightline.sdk.inputs import timestamp
from sightline.v1 import events_pb2, review_pb2, review_pb2_grpc

PAGE_SIZE = 200
AlertStatus = events_pb2.AlertStatus


def alert_status(status: AlertStatus | str | None) -> AlertStatus:
    """An alert status from its name with or without prefix (``"CONFIRMED"``, ``"ALERT_STATUS_CONFIRMED"``) or its
    value; None is UNSPECIFIED (every status). ValueError for an unknown name."""
    if status is None:
        return events_pb2.ALERT_STATUS_UNSPECIFIED
    if isinstance(status, str):
        return cast(AlertStatus, enum_value(events_pb2.AlertStatus, status, "ALERT_STATUS_"))
    return status


class ReviewApi:
    """Alerts and reviews: ``client.review``."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def _stub(self) -> review_pb2_grpc.ReviewServiceStub:
        return self._connection.stub(review_pb2_grpc.ReviewServiceStub)

    def alerts(self, status: AlertStatus | str | None = "PENDING_REVIEW") -> Iterator[review_pb2.ReviewedAlert]:
        """Alerts with their reviews, oldest first, page after page; only those with ``status`` (None: all)."""
        request = review_pb2.ListAlertsRequest(status=alert_status(status), page_size=PAGE_SIZE)
        while True:
            reply = self._connection.call(self._stub(), "ListAlerts", request)
            yield from reply.alerts
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token

    def get(self, alert_id: str) -> review_pb2.ReviewedAlert:
        """One alert (its full id or a unique prefix of 6+ characters) with its reviews."""
        reply: review_pb2.ReviewedAlert = self._connection.call(
            self._stub(), "GetAlert", review_pb2.GetAlertRequest(alert_id=alert_id)
        )
        return reply

    def confirm(self, alert_id: str, comment: str = "") -> review_pb2.ReviewedAlert:
        """Confirm as this client's reviewer; ``FailedPrecondition`` when the alert is closed or this reviewer has
        already confirmed it."""
        return self._review(alert_id, review_pb2.REVIEW_ACTION_CONFIRM, comment, not_this_person=False)

    def reject(self, alert_id: str, comment: str = "", *, not_this_person: bool = False) -> review_pb2.ReviewedAlert:
        """Reject as this client's reviewer; ``not_this_person``: the face is not the subject, which suppresses
        further alerts of it on this source and counts in the false-alert feedback."""
        return self._review(alert_id, review_pb2.REVIEW_ACTION_REJECT, comment, not_this_person=not_this_person)

    def feedback(self, since: datetime | None = None) -> review_pb2.ListFeedbackResponse:
        """The "not this person" rejections (since a time, else all that is kept) and their counts per subject and
        source, most first."""
        request = review_pb2.ListFeedbackRequest()
        if since is not None:
            request.since.CopyFrom(timestamp(since))
        reply: review_pb2.ListFeedbackResponse = self._connection.call(self._stub(), "ListFeedback", request)
        return reply

    def _review(
        self, alert_id: str, action: review_pb2.ReviewAction, comment: str, not_this_person: bool
    ) -> review_pb2.ReviewedAlert:
        request = review_pb2.ReviewAlertRequest(
            alert_id=alert_id, action=action, comment=comment, not_this_person=not_this_person
        )
        reply: review_pb2.ReviewedAlert = self._connection.call(self._stub(), "ReviewAlert", request)
        return reply
