"""``sightline.v1.ReviewService``: list, show and review alerts; each status change is published, each review audited.

Status changes go out through the store's outbox (``published_status``): one that could not be published yet is
published again by ``ReviewServicer.flush_outbox``, so integrators see every change at least once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import grpc

from sightline.common.audit import ANONYMOUS, Action, AuditLog, principal_of
from sightline.common.rpc import InvalidInput, NotFound
from sightline.common.sqlstore import MAX_DB_INTEGER
from sightline.common.topics import ALERTS
from sightline.decision.review.store import (
    CONFIRM,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    REJECT,
    ReviewRefused,
    ReviewStore,
    StoredAlert,
    status_name,
)
from sightline.v1 import events_pb2, review_pb2, review_pb2_grpc

log = logging.getLogger(__name__)

REVIEW_PURPOSE = "human-review"  # what a review action is for, as audited

_ACTIONS = {review_pb2.REVIEW_ACTION_CONFIRM: CONFIRM, review_pb2.REVIEW_ACTION_REJECT: REJECT}


class ReviewServicer(review_pb2_grpc.ReviewServiceServicer):
    """``sightline.v1.ReviewService``: list, show and review alerts; publishes status changes and audits reviews."""

    def __init__(
        self,
        store: ReviewStore,
        audit: AuditLog,
        publish_alert: Callable[[events_pb2.Alert], None],
        principal: Callable[[grpc.ServicerContext], str] = principal_of,
    ) -> None:
        self._store = store
        self._audit = audit
        self._publish_alert = publish_alert
        self._principal = principal

    def ListAlerts(self, request: review_pb2.ListAlertsRequest, context: grpc.ServicerContext) -> Any:
        with _status_errors(context):
            after, limit, status = _alert_page(request)
            alerts = self._store.list_alerts(status, limit, after)
        reply = review_pb2.ListAlertsResponse(alerts=[a.to_proto() for a in alerts])
        if len(alerts) == limit:
            reply.next_page_token = str(alerts[-1].sequence)
        return reply

    def GetAlert(self, request: review_pb2.GetAlertRequest, context: grpc.ServicerContext) -> Any:
        with _status_errors(context):
            return self._store.get(request.alert_id).to_proto()

    def ListFeedback(self, request: review_pb2.ListFeedbackRequest, context: grpc.ServicerContext) -> Any:
        with _status_errors(context):
            since = _since(request)
        feedback = self._store.feedback(since)
        reply = review_pb2.ListFeedbackResponse(feedback=[f.to_proto() for f in feedback])
        counts = Counter((f.subject_id, f.source_id) for f in feedback)
        for (subject_id, source_id), rejections in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            reply.counts.add(subject_id=subject_id, source_id=source_id, rejections=rejections)
        return reply

    def ReviewAlert(self, request: review_pb2.ReviewAlertRequest, context: grpc.ServicerContext) -> Any:
        reviewer = self._principal(context)
        if not reviewer:
            self._audit.append(
                ANONYMOUS,
                Action.ACCESS_DENIED,
                "",
                REVIEW_PURPOSE,
                "refused: no principal",
                {"alert_id": request.alert_id[:64], "method": "ReviewAlert"},
            )
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "reviewing needs an authenticated reviewer")
        action = _ACTIONS.get(request.action, "")
        with _status_errors(context, on_error=lambda error: self._audit_refused(reviewer, request, action, error)):
            after, changed = self._store.review(
                request.alert_id, reviewer, action, request.comment, request.not_this_person
            )
        self._audit_review(reviewer, request, action, after, after.status)
        if changed:
            self.flush_outbox()
        return after.to_proto()

    def flush_outbox(self) -> int:
        """Publish every status change not yet on the alerts topic; returns how many were published."""
        published = 0
        for stored in self._store.unpublished():
            try:
                self._publish_alert(stored.alert)
            except Exception:
                log.warning(
                    "could not publish an alert status change; will retry",
                    exc_info=True,
                    extra={"alert_id": stored.alert.alert_id, "status": stored.status},
                )
                break
            self._store.mark_published(stored.alert.alert_id, stored.status)
            published += 1
        return published

    def _audit_refused(
        self, reviewer: str, request: review_pb2.ReviewAlertRequest, action: str, error: Exception
    ) -> None:
        try:
            current: StoredAlert | None = self._store.get(request.alert_id)  # names the subject, when there is one
        except (NotFound, InvalidInput):
            current = None
        self._audit_review(reviewer, request, action, current, f"refused: {error}")

    def _audit_review(
        self, reviewer: str, request: review_pb2.ReviewAlertRequest, action: str, after: StoredAlert | None, result: str
    ) -> None:
        details: dict[str, Any] = {
            "alert_id": after.alert.alert_id if after else request.alert_id[:64],
            "action": action or "UNSPECIFIED",
            "not_this_person": request.not_this_person,
        }
        if after is not None:
            details.update(source_id=after.alert.source_id, confirmations=after.confirmations)
        subject = after.alert.subject_id if after else ""
        self._audit.append(reviewer, Action.REVIEW, subject, REVIEW_PURPOSE, result[:500], details)


def _alert_page(request: review_pb2.ListAlertsRequest) -> tuple[int, int, str | None]:
    """(after, limit, status) of a ListAlerts page; InvalidInput for a token or a status no page can have."""
    try:
        after = int(request.page_token or 0)
    except ValueError:
        raise InvalidInput(f"bad page_token {request.page_token[:40]!r}") from None
    if not 0 <= after <= MAX_DB_INTEGER:  # a token is an alert's sequence: what the store's integers can hold
        raise InvalidInput(f"bad page_token {request.page_token[:40]!r}")
    if request.status and request.status not in events_pb2.AlertStatus.values():
        raise InvalidInput(f"unknown alert status {request.status}")
    status = status_name(request.status) if request.status else None
    return after, min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE), status


def _since(request: review_pb2.ListFeedbackRequest) -> datetime | None:
    if not request.HasField("since"):
        return None
    try:
        return request.since.ToDatetime(UTC)
    except ValueError as error:  # seconds or nanos outside what a timestamp can be
        raise InvalidInput(f"since is not a valid timestamp: {error}") from None


@contextmanager
def _status_errors(
    context: grpc.ServicerContext, on_error: Callable[[Exception], None] | None = None
) -> Iterator[None]:
    """Map the store's errors to gRPC statuses with their message; ``on_error`` sees the error first (to audit it)."""
    codes = (
        (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (ReviewRefused, grpc.StatusCode.FAILED_PRECONDITION),
    )
    try:
        yield
    except (InvalidInput, NotFound, ReviewRefused) as error:
        if on_error is not None:
            on_error(error)
        code = next(code for kind, code in codes if isinstance(error, kind))
        context.abort(code, str(error))


def alert_publisher(publisher: Any) -> Callable[[events_pb2.Alert], None]:
    """Publish an alert's new status to ``sightline.alerts.v1``, keyed by source id, waiting for the broker."""

    def publish(alert: events_pb2.Alert) -> None:
        publisher.send(ALERTS.name, alert.source_id.encode(), alert.SerializeToString(), wait=True)

    return publish
