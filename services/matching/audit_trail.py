"""The gallery's audit records: who (the caller's principal) did what to whom, why, and with what result.

Every gallery call that touches a person's data (Enroll, DeleteSubject, EraseSubject, Verify, Search) and every
watchlist change appends one record to the system's one audit chain (``common/audit.py``), refused calls included:
``audits_refusals`` records the INVALID_ARGUMENT and NOT_FOUND outcomes before ``rpc_errors`` turns them into a
status. Details hold ids, counts and scores, never images or descriptors. Reads of lists and subjects are not
audited; stream searches are, in aggregate (``stream_audit.py``).

The records of the calls that write (Enroll, DeleteSubject, EraseSubject, every watchlist change) are ``entry``s
committed with the write in the gallery's audit outbox (``audit_outbox.py``), so a write is never left unaudited and
goes on while the audit log cannot be written. Those of searches, verifications and refusals, which write nothing,
are appended directly (``record``): while the audit log cannot be written such a call is UNAVAILABLE, never answered
unaudited.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from sightline.common.audit import ANONYMOUS, Action, AuditLog, principal_of
from sightline.common.rpc import InvalidInput, NotFound, Unavailable
from sightline.common.transient import is_transient
from sightline.matching.audit_outbox import AuditEntry, AuditOutboxRelay, OutboxPolicy

if TYPE_CHECKING:
    from sightline.matching.gallery import Gallery

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
    """The matching service's records, naming the caller of each gRPC call: appended to the audit log (``record``), or
    made for a write to commit with it (``entry``) and relayed by the gallery's outbox (``outbox_of``, ``outbox``:
    how the relay runs)."""

    def __init__(
        self,
        log: AuditLog,
        principal: Callable[[grpc.ServicerContext], str] = principal_of,
        outbox: OutboxPolicy | None = None,
    ) -> None:
        self.log = log
        self._principal = principal
        self._outbox = outbox

    def caller(self, context: grpc.ServicerContext) -> str:
        return self._principal(context) or ANONYMOUS

    def outbox_of(self, gallery: Gallery) -> AuditOutboxRelay:
        """The relay of the gallery's outbox to this log, started with the first servicer that asks."""
        return gallery.audit_outbox(self.log, self._outbox)

    def entry(
        self,
        context: grpc.ServicerContext,
        action: Action,
        subject_id: str = "",
        purpose: str = "",
        result: str = "ok",
        details: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """A record for the outbox, shortened as ``record`` shortens it."""
        return AuditEntry(
            self.caller(context),
            action,
            subject_id[:MAX_AUDITED_ID],
            purpose[:MAX_PURPOSE_CHARS],
            result[:MAX_RESULT_CHARS],
            details or {},
        )

    def record(
        self,
        context: grpc.ServicerContext,
        action: Action,
        subject_id: str = "",
        purpose: str = "",
        result: str = "ok",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Appends the record now; Unavailable (the call fails, to be retried) when the audit log cannot be written."""
        entry = self.entry(context, action, subject_id, purpose, result, details)
        try:
            self.log.append(entry.principal, entry.action, entry.subject_id, entry.purpose, entry.result, entry.details)
        except Exception as error:
            if not is_transient(error):
                raise
            raise Unavailable(f"the audit log cannot be written now ({error}); nothing was done unaudited") from error


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
