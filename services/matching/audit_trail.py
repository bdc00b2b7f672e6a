"""The gallery's audit records: who (the caller's principal) did what to whom, why, and with what result.

Every gallery call that touches a person's data (Enroll, DeleteSubject, EraseSubject, Verify, Search) and every
watchlist change appends one record to the system's one audit chain (``common/audit.py``), refused calls included:
``audits_refusals`` records the INVALID_ARGUMENT and NOT_FOUND outcomes before ``rpc_errors`` turns them into a
status. Details hold ids, counts and scores, never images or descriptors. Reads of lists and subjects are not
audited; stream searches are, in aggregate (``stream_audit.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc

from sightline.common.audit import ANONYMOUS, Action, AuditLog, principal_of
from sightline.common.rpc import InvalidInput, NotFound

SERVICE_PRINCIPAL = "service:matching"
MAX_AUDITED_ID = 128
MAX_RESULT_CHARS = 500
MAX_PURPOSE_CHARS = 200
MAX_NAMES_CHARS = 1000

# Purposes of calls whose request has no purpose field.
ENROL_PURPOSE = "enrolment"
DELETE_PURPOSE = "gallery-deletion"
ERASE_PURPOSE = "erasure-request"
SEARCH_PURPOSE = "gallery-search"
VERIFY_PURPOSE = "gallery-verification"
WATCHLIST_PURPOSE = "watchlist-administration"

F = TypeVar("F", bound=Callable[..., Any])


class GalleryAudit:
    """Appends the matching service's records to the audit log, naming the caller of each gRPC call."""

    def __init__(self, log: AuditLog, principal: Callable[[grpc.ServicerContext], str] = principal_of) -> None:
        self.log = log
        self._principal = principal

    def caller(self, context: grpc.ServicerContext) -> str:
        return self._principal(context) or ANONYMOUS

    def record(
        self,
        context: grpc.ServicerContext,
        action: Action,
        subject_id: str = "",
        purpose: str = "",
        result: str = "ok",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.log.append(
            self.caller(context),
            action,
            subject_id[:MAX_AUDITED_ID],
            purpose[:MAX_PURPOSE_CHARS],
            result[:MAX_RESULT_CHARS],
            details,
        )


def joined_names(names: Iterable[str]) -> str:
    """Ids or list names as one comma-separated detail, shortened (with the count) to fit an audit detail."""
    unique = sorted(set(names))
    text = ",".join(unique)
    return text if len(text) <= MAX_NAMES_CHARS else f"{text[: MAX_NAMES_CHARS - 24]}... ({len(unique)} in all)"


def audits_refusals(action: Action, purpose: str) -> Callable[[F], F]:
    """Records a call the method refuses (InvalidInput, NotFound) with the refusal as its result, then re-raises.

    For methods of a servicer with a ``_audit`` (``GalleryAudit``); put it under ``@rpc_errors``. The purpose is the
    request's own when it has one.
    """

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(self, request, context)
            except (InvalidInput, NotFound) as error:
                outcome = "refused" if isinstance(error, InvalidInput) else "not found"
                self._audit.record(
                    context,
                    action,
                    getattr(request, "subject_id", ""),
                    getattr(request, "purpose", "") or purpose,
                    f"{outcome}: {error}",
                    _request_ids(request),
                )
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


def _request_ids(request: Any) -> dict[str, Any]:
    """The names and counts a refused request carried (never its images), for the refusal's record."""
    details: dict[str, Any] = {}
    for field in ("watchlist", "name", "reference"):
        value = getattr(request, field, "")
        value = getattr(value, "name", value)  # CreateWatchlistRequest.watchlist is a Watchlist
        if isinstance(value, str) and value:
            details[field] = value[:MAX_AUDITED_ID]
    for field in ("subject_ids", "images"):
        if hasattr(request, field):
            details[field] = len(getattr(request, field))
    return details
