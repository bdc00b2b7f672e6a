"""The watchlist API (``WatchlistService`` on matching): lists with a purpose, an owner, a threshold and expiring
memberships (docs/watchlists.md). Every change is audited under the caller's principal."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator
from datetime import datetime

from sightline.sdk.connection import Connection
from sightline.sdk.inputs import timestamp
from sightline.v1 import gallery_pb2, gallery_pb2_grpc

PAGE_SIZE = 500


class WatchlistApi:
    """Named lists of enrolled subjects: ``client.watchlists``."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def _stub(self) -> gallery_pb2_grpc.WatchlistServiceStub:
        return self._connection.stub(gallery_pb2_grpc.WatchlistServiceStub)

    def create(
        self,
        name: str,
        *,
        purpose: str,
        owner: str = "",
        target_fmr: float = 0.0,
        default_membership_days: int = 0,
    ) -> gallery_pb2.Watchlist:
        """Create a list (``AlreadyExists`` when the name is taken). ``owner`` empty: the caller's principal;
        ``target_fmr`` 0: the decision policy's threshold; ``default_membership_days`` 0: memberships never end."""
        watchlist = gallery_pb2.Watchlist(
            name=name,
            purpose=purpose,
            owner=owner,
            target_fmr=target_fmr,
            default_membership_days=default_membership_days,
        )
        request = gallery_pb2.CreateWatchlistRequest(watchlist=watchlist)
        created: gallery_pb2.Watchlist = self._connection.call(self._stub(), "CreateWatchlist", request)
        return created

    def get(self, name: str) -> gallery_pb2.Watchlist:
        """One list with its current member count; ``NotFound`` when there is none of that name."""
        found: gallery_pb2.Watchlist = self._connection.call(
            self._stub(), "GetWatchlist", gallery_pb2.GetWatchlistRequest(name=name)
        )
        return found

    def list(self) -> list[gallery_pb2.Watchlist]:
        """Every list."""
        reply = self._connection.call(self._stub(), "ListWatchlists", gallery_pb2.ListWatchlistsRequest())
        return list(reply.watchlists)

    def update(
        self,
        name: str,
        *,
        purpose: str | None = None,
        owner: str | None = None,
        target_fmr: float | None = None,
        default_membership_days: int | None = None,
    ) -> gallery_pb2.Watchlist:
        """Change only the fields given (the list is read, changed and written back)."""
        watchlist = self.get(name)
        changes = {
            "purpose": purpose,
            "owner": owner,
            "target_fmr": target_fmr,
            "default_membership_days": default_membership_days,
        }
        for field, value in changes.items():
            if value is not None:
                setattr(watchlist, field, value)
        updated: gallery_pb2.Watchlist = self._connection.call(self._stub(), "UpdateWatchlist", watchlist)
        return updated

    def delete(self, name: str) -> gallery_pb2.DeleteWatchlistResponse:
        """Delete a list and its memberships (the subjects stay enrolled); ``reply.deleted`` False when none."""
        reply: gallery_pb2.DeleteWatchlistResponse = self._connection.call(
            self._stub(), "DeleteWatchlist", gallery_pb2.DeleteWatchlistRequest(name=name)
        )
        return reply

    def add_members(
        self, name: str, subject_ids: Iterable[str], *, expires_at: datetime | None = None
    ) -> builtins.list[gallery_pb2.Membership]:
        """Put enrolled subjects on a list, or renew their membership; ``expires_at`` None: the list's default."""
        request = gallery_pb2.AddMembersRequest(watchlist=name, subject_ids=list(subject_ids))
        if expires_at is not None:
            request.expires_at.CopyFrom(timestamp(expires_at))
        reply = self._connection.call(self._stub(), "AddMembers", request)
        return list(reply.memberships)

    def remove_members(self, name: str, subject_ids: Iterable[str]) -> int:
        """Take subjects off a list; how many were on it."""
        request = gallery_pb2.RemoveMembersRequest(watchlist=name, subject_ids=list(subject_ids))
        reply = self._connection.call(self._stub(), "RemoveMembers", request)
        return int(reply.removed)

    def members(self, name: str, *, include_expired: bool = False) -> Iterator[gallery_pb2.Membership]:
        """A list's memberships with their expiry, page after page."""
        page = ""
        while True:
            request = gallery_pb2.ListMembersRequest(
                watchlist=name, include_expired=include_expired, page_size=PAGE_SIZE, page_token=page
            )
            reply = self._connection.call(self._stub(), "ListMembers", request)
            yield from reply.memberships
            page = reply.next_page_token
            if not page:
                return
