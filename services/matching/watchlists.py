"""``sightline.v1.WatchlistService``: named lists with a purpose, an owner, a threshold and expiring memberships.

Served by matching next to the GalleryService, on the same gallery. A list needs a stated purpose when it is created
or updated; a list that came into being through an enrolment naming an unknown list has none yet (and its creator as
owner) until someone sets one. Every change is audited (action WATCHLIST): creations, updates and deletions once per
call, memberships once per subject, each change's records committed with it (the gallery's audit outbox). Errors:
INVALID_ARGUMENT (bad name, purpose, FMR, expiry), NOT_FOUND (unknown list or subject), ALREADY_EXISTS (name taken).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import grpc

from sightline.common import scores
from sightline.common.audit import Action
from sightline.common.rpc import InvalidInput, NotFound, rpc_errors
from sightline.matching.audit_outbox import AuditEntry
from sightline.matching.audit_trail import WATCHLIST_PURPOSE, GalleryAudit, audits_refusals
from sightline.matching.gallery import Gallery, watchlist_threshold
from sightline.matching.names import check_subject_id, check_watchlist_name
from sightline.matching.store import (
    MAX_TEXT_LENGTH,
    MembershipRecord,
    UnknownSubjectError,
    UnknownWatchlistError,
    WatchlistExistsError,
    WatchlistRecord,
)
from sightline.v1 import gallery_pb2, gallery_pb2_grpc

MAX_MEMBERS_PER_CALL = 1000
MAX_DEFAULT_DAYS = 36_500


def watchlist_proto(record: WatchlistRecord) -> gallery_pb2.Watchlist:
    message = gallery_pb2.Watchlist(
        name=record.name,
        purpose=record.purpose,
        owner=record.owner,
        target_fmr=record.target_fmr or 0.0,
        threshold_distance=watchlist_threshold(record) or 0.0,
        default_membership_days=record.default_membership_days,
        member_count=record.member_count,
    )
    message.created_at.FromDatetime(record.created_at)
    return message


def membership_proto(record: MembershipRecord, now: datetime) -> gallery_pb2.Membership:
    message = gallery_pb2.Membership(
        subject_id=record.subject_id, watchlist=record.watchlist, expired=record.expired(now)
    )
    message.added_at.FromDatetime(record.added_at)
    if record.expires_at is not None:
        message.expires_at.FromDatetime(record.expires_at)
    return message


def future_expiry(message: object, field: str) -> datetime | None:
    """The timestamp ``field`` of a request as an aware datetime, None when unset; INVALID_ARGUMENT if not ahead."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    try:
        at = getattr(message, field).ToDatetime(tzinfo=UTC)
    except ValueError as error:  # seconds or nanos outside what a timestamp can be
        raise InvalidInput(f"{field} is not a valid timestamp: {error}") from None
    if at <= datetime.now(UTC):
        raise InvalidInput(f"{field} {at.isoformat()} is not in the future")
    return at


def _settings(message: gallery_pb2.Watchlist) -> tuple[str, str, float | None, int]:
    """A list's purpose, owner, target FMR (None for 0) and default days, checked."""
    purpose, owner = message.purpose.strip(), message.owner.strip()
    if not purpose:
        raise InvalidInput(f"watchlist {message.name!r} needs a purpose: say why the list exists")
    if len(purpose) > MAX_TEXT_LENGTH or len(owner) > MAX_TEXT_LENGTH:
        raise InvalidInput(f"purpose and owner must be at most {MAX_TEXT_LENGTH} characters")
    target = message.target_fmr or None
    if target is not None:
        try:
            scores.distance_for_fmr(target)
        except scores.CalibrationError as error:
            raise InvalidInput(f"target_fmr: {error}") from None
    if message.default_membership_days > MAX_DEFAULT_DAYS:
        raise InvalidInput(f"default_membership_days must be at most {MAX_DEFAULT_DAYS}")
    return purpose, owner, target, message.default_membership_days


def _list_details(record: WatchlistRecord) -> dict[str, object]:
    return {
        "watchlist": record.name,
        "owner": record.owner,
        "target_fmr": record.target_fmr or "",
        "default_membership_days": record.default_membership_days,
    }


class WatchlistServicer(gallery_pb2_grpc.WatchlistServiceServicer):
    def __init__(self, gallery: Gallery, audit: GalleryAudit) -> None:
        self._gallery = gallery
        self._audit = audit
        audit.outbox_of(gallery)  # the relay of the write records, running from now on

    @rpc_errors
    @audits_refusals(Action.WATCHLIST, WATCHLIST_PURPOSE)
    def CreateWatchlist(
        self, request: gallery_pb2.CreateWatchlistRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.Watchlist:
        name = check_watchlist_name(request.watchlist.name)
        purpose, owner, target, days = _settings(request.watchlist)
        owner = owner or self._audit.caller(context)
        try:
            record = self._gallery.create_watchlist(
                name, purpose, owner, target, days, audit=self._list_audit(context, purpose, "list created")
            )
        except WatchlistExistsError as error:  # a refusal: nothing written, recorded directly
            self._audit.record(context, Action.WATCHLIST, "", purpose, f"refused: {error}", {"watchlist": name})
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{error}; update it instead")
        return watchlist_proto(record)

    @rpc_errors
    @audits_refusals(Action.WATCHLIST, WATCHLIST_PURPOSE)
    def UpdateWatchlist(self, request: gallery_pb2.Watchlist, context: grpc.ServicerContext) -> gallery_pb2.Watchlist:
        name = check_watchlist_name(request.name)
        purpose, owner, target, days = _settings(request)
        try:
            record = self._gallery.update_watchlist(
                name, purpose, owner, target, days, audit=self._list_audit(context, purpose, "list updated")
            )
        except UnknownWatchlistError as error:
            raise NotFound(str(error)) from None
        return watchlist_proto(record)

    @rpc_errors
    def GetWatchlist(
        self, request: gallery_pb2.GetWatchlistRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.Watchlist:
        record = self._gallery.store.get_watchlist(check_watchlist_name(request.name))
        if record is None:
            raise NotFound(f"watchlist {request.name!r} does not exist")
        return watchlist_proto(record)

    @rpc_errors
    def ListWatchlists(
        self, request: gallery_pb2.ListWatchlistsRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.ListWatchlistsResponse:
        return gallery_pb2.ListWatchlistsResponse(
            watchlists=[watchlist_proto(record) for record in self._gallery.store.list_watchlists()]
        )

    @rpc_errors
    @audits_refusals(Action.WATCHLIST, WATCHLIST_PURPOSE)
    def DeleteWatchlist(
        self, request: gallery_pb2.DeleteWatchlistRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.DeleteWatchlistResponse:
        name = check_watchlist_name(request.name)
        purpose = self._purpose_of(name)

        def audited(removed: int | None) -> list[AuditEntry]:
            result = "list deleted" if removed is not None else "no such list"
            details = {"watchlist": name, "memberships_removed": removed or 0}
            return [self._audit.entry(context, Action.WATCHLIST, "", purpose, result, details)]

        removed = self._gallery.delete_watchlist(name, audited)
        return gallery_pb2.DeleteWatchlistResponse(deleted=removed is not None, memberships_removed=removed or 0)

    @rpc_errors
    @audits_refusals(Action.WATCHLIST, WATCHLIST_PURPOSE)
    def AddMembers(
        self, request: gallery_pb2.AddMembersRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.AddMembersResponse:
        name = check_watchlist_name(request.watchlist)
        subject_ids = self._subject_ids(request.subject_ids)
        expires_at = future_expiry(request, "expires_at")
        purpose = self._purpose_of(name)

        def audited(memberships: list[MembershipRecord]) -> list[AuditEntry]:
            return [
                self._audit.entry(
                    context,
                    Action.WATCHLIST,
                    membership.subject_id,
                    purpose,
                    "member added",
                    {"watchlist": name, "expires_at": m.isoformat() if (m := membership.expires_at) else "never"},
                )
                for membership in memberships
            ]

        try:
            memberships = self._gallery.add_members(name, subject_ids, expires_at, audited)
        except UnknownWatchlistError as error:
            raise NotFound(f"{error}: create it first (sightline watchlists create)") from None
        except UnknownSubjectError as error:
            raise NotFound(f"{error}; no membership was added") from None
        now = datetime.now(UTC)
        return gallery_pb2.AddMembersResponse(memberships=[membership_proto(m, now) for m in memberships])

    @rpc_errors
    @audits_refusals(Action.WATCHLIST, WATCHLIST_PURPOSE)
    def RemoveMembers(
        self, request: gallery_pb2.RemoveMembersRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.RemoveMembersResponse:
        name = check_watchlist_name(request.watchlist)
        subject_ids = self._subject_ids(request.subject_ids)
        purpose = self._purpose_of(name)

        def audited(removed: list[str]) -> list[AuditEntry]:
            return [
                self._audit.entry(
                    context,
                    Action.WATCHLIST,
                    subject_id,
                    purpose,
                    "member removed" if subject_id in removed else "not on the list",
                    {"watchlist": name},
                )
                for subject_id in dict.fromkeys(subject_ids)
            ]

        try:
            removed = self._gallery.remove_members(name, subject_ids, audited)
        except UnknownWatchlistError as error:
            raise NotFound(str(error)) from None
        return gallery_pb2.RemoveMembersResponse(removed=len(removed))

    @rpc_errors
    def ListMembers(
        self, request: gallery_pb2.ListMembersRequest, context: grpc.ServicerContext
    ) -> gallery_pb2.ListMembersResponse:
        name = check_watchlist_name(request.watchlist)
        limit = min(request.page_size or 100, 1000)
        try:
            records = self._gallery.store.list_members(
                name, request.include_expired, limit=limit + 1, after=request.page_token or None
            )
        except UnknownWatchlistError as error:
            raise NotFound(str(error)) from None
        now = datetime.now(UTC)
        response = gallery_pb2.ListMembersResponse(memberships=[membership_proto(r, now) for r in records[:limit]])
        if len(records) > limit:
            response.next_page_token = records[limit - 1].subject_id
        return response

    @staticmethod
    def _subject_ids(subject_ids: list[str]) -> list[str]:
        if not subject_ids:
            raise InvalidInput("no subject_ids: name at least one enrolled subject")
        if len(subject_ids) > MAX_MEMBERS_PER_CALL:
            raise InvalidInput(f"{len(subject_ids)} subject ids; at most {MAX_MEMBERS_PER_CALL} per call")
        return [check_subject_id(subject_id) for subject_id in subject_ids]

    def _list_audit(
        self, context: grpc.ServicerContext, purpose: str, result: str
    ) -> Callable[[WatchlistRecord], list[AuditEntry]]:
        """The audit hook of a list created or updated: one record with the list's settings as stored."""
        return lambda record: [self._audit.entry(context, Action.WATCHLIST, "", purpose, result, _list_details(record))]

    def _purpose_of(self, name: str) -> str:
        record = self._gallery.store.get_watchlist(name)
        return record.purpose if record and record.purpose else WATCHLIST_PURPOSE
