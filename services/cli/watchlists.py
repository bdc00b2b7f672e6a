"""``sightline watchlists``: create, inspect, change and delete watchlists and their expiring memberships.

Talks to the WatchlistService on the matching service (``--matching``, default the local stack). Every change is
audited there under the caller's principal (the token's). Times are UTC; ``--expires 2027-01-01`` ends a membership
at the start of that day.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from sightline.cli.endpoints import rpc_failed


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("watchlists", help="watchlists: purpose, owner, threshold and expiring members")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a watchlist (a purpose is required)")
    create.add_argument("name")
    _add_settings(create, required=True)
    create.set_defaults(func=cmd_create)
    listing = actions.add_parser("list", help="every watchlist, with its member count")
    listing.set_defaults(func=cmd_list)
    show = actions.add_parser("show", help="one watchlist")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)
    update = actions.add_parser("update", help="change a watchlist's purpose, owner, threshold or default duration")
    update.add_argument("name")
    _add_settings(update, required=False)
    update.set_defaults(func=cmd_update)
    delete = actions.add_parser("delete", help="delete a watchlist and its memberships (the subjects stay enrolled)")
    delete.add_argument("name")
    delete.set_defaults(func=cmd_delete)
    add = actions.add_parser("add", help="put enrolled subjects on a list, or renew their membership")
    add.add_argument("name")
    add.add_argument("subject_ids", nargs="+", metavar="SUBJECT")
    add_expiry_arguments(add)
    add.set_defaults(func=cmd_add)
    remove = actions.add_parser("remove", help="take subjects off a list")
    remove.add_argument("name")
    remove.add_argument("subject_ids", nargs="+", metavar="SUBJECT")
    remove.set_defaults(func=cmd_remove)
    members = actions.add_parser("members", help="a list's members and when their membership ends")
    members.add_argument("name")
    members.add_argument("--expired", action="store_true", help="include expired memberships")
    members.set_defaults(func=cmd_members)
    from sightline.cli.endpoints import add_token_argument

    for sub in actions.choices.values():
        sub.add_argument("--matching", help="matching service gRPC address (default: the local stack)")
        add_token_argument(sub)


def _add_settings(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--purpose", required=required, help="why the list exists (audited, shown to reviewers)")
    parser.add_argument("--owner", help="who answers for the list (default on create: you, the token's principal)")
    parser.add_argument(
        "--target-fmr",
        type=float,
        metavar="FMR",
        help="the list's own threshold as a target false match rate, e.g. 1e-4 (0: none)",
    )
    parser.add_argument(
        "--default-days", type=int, metavar="N", help="memberships added without an expiry end after N days (0: never)"
    )


def add_expiry_arguments(parser: argparse.ArgumentParser) -> None:
    """``--expires DATE`` or ``--days N``: when the memberships a command adds end."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--expires",
        type=parse_time,
        metavar="WHEN",
        help="the membership ends then: 2027-01-01 (start of the day, UTC) or an ISO date-time",
    )
    group.add_argument("--days", type=int, metavar="N", help="the membership ends N days from now")


def parse_time(text: str) -> datetime:
    """An ISO date or date-time; naive values are UTC."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date (2027-01-01) or date-time") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def expiry_of(args: argparse.Namespace) -> datetime | None:
    if getattr(args, "days", None) is not None:
        if args.days < 1:
            raise SystemExit("error: --days must be at least 1")
        return datetime.now(UTC) + timedelta(days=args.days)
    return getattr(args, "expires", None)


def _stub(args: argparse.Namespace) -> Any:
    return watchlist_stub(args.matching, args.token)


def watchlist_stub(address: str | None = None, token: str | None = None) -> Any:
    from sightline.cli.endpoints import connect
    from sightline.v1 import gallery_pb2_grpc

    return gallery_pb2_grpc.WatchlistServiceStub(connect("matching", address, token))


def _when(timestamp: Any, unset: str = "never") -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return unset
    return timestamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


def describe(watchlist: Any) -> str:
    """One line per field of a watchlist."""
    threshold = (
        f"target FMR {watchlist.target_fmr:g} (distance {watchlist.threshold_distance:.3f})"
        if watchlist.target_fmr
        else "the decision policy's"
    )
    days = f"{watchlist.default_membership_days} days" if watchlist.default_membership_days else "none (no expiry)"
    return "\n".join(
        [
            f"watchlist  {watchlist.name}",
            f"purpose    {watchlist.purpose or '(none yet: set one with `sightline watchlists update`)'}",
            f"owner      {watchlist.owner or '-'}",
            f"threshold  {threshold}",
            f"default membership  {days}",
            f"members    {watchlist.member_count} current",
            f"created    {_when(watchlist.created_at)}",
        ]
    )


def cmd_create(args: argparse.Namespace) -> int:
    from sightline.v1 import gallery_pb2

    watchlist = gallery_pb2.Watchlist(
        name=args.name,
        purpose=args.purpose,
        owner=args.owner or "",
        target_fmr=args.target_fmr or 0.0,
        default_membership_days=args.default_days or 0,
    )
    try:
        created = _stub(args).CreateWatchlist(gallery_pb2.CreateWatchlistRequest(watchlist=watchlist), timeout=30)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    print(describe(created))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from sightline.v1 import gallery_pb2

    try:
        reply = _stub(args).ListWatchlists(gallery_pb2.ListWatchlistsRequest(), timeout=30)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    print(f"{'NAME':<24} {'MEMBERS':>7} {'TARGET FMR':>10} {'DAYS':>5}  {'OWNER':<20} PURPOSE")
    for w in reply.watchlists:
        fmr = f"{w.target_fmr:.0e}" if w.target_fmr else "-"
        days = str(w.default_membership_days) if w.default_membership_days else "-"
        print(
            f"{w.name:<24} {w.member_count:>7} {fmr:>10} {days:>5}  {w.owner or '-':<20} "
            f"{w.purpose or '(NO PURPOSE: set one)'}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from sightline.v1 import gallery_pb2

    try:
        print(describe(_stub(args).GetWatchlist(gallery_pb2.GetWatchlistRequest(name=args.name), timeout=30)))
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    """Reads the list and changes only the fields given."""
    from sightline.v1 import gallery_pb2

    stub = _stub(args)
    try:
        watchlist = stub.GetWatchlist(gallery_pb2.GetWatchlistRequest(name=args.name), timeout=30)
        for field, value in (
            ("purpose", args.purpose),
            ("owner", args.owner),
            ("target_fmr", args.target_fmr),
            ("default_membership_days", args.default_days),
        ):
            if value is not None:
                setattr(watchlist, field, value)
        updated = stub.UpdateWatchlist(watchlist, timeout=30)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    print(describe(updated))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from sightline.v1 import gallery_pb2

    try:
        reply = _stub(args).DeleteWatchlist(gallery_pb2.DeleteWatchlistRequest(name=args.name), timeout=30)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    if not reply.deleted:
        print(f"error: watchlist {args.name!r} does not exist", file=sys.stderr)
        return 1
    print(f"{args.name}: deleted ({reply.memberships_removed} membership(s) removed; the subjects stay enrolled)")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from sightline.v1 import gallery_pb2

    request = gallery_pb2.AddMembersRequest(watchlist=args.name, subject_ids=args.subject_ids)
    expires_at = expiry_of(args)
    if expires_at is not None:
        request.expires_at.FromDatetime(expires_at)
    try:
        reply = _stub(args).AddMembers(request, timeout=60)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    for m in reply.memberships:
        print(f"{m.subject_id:<32} on {m.watchlist} until {_when(m.expires_at)}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from sightline.v1 import gallery_pb2

    request = gallery_pb2.RemoveMembersRequest(watchlist=args.name, subject_ids=args.subject_ids)
    try:
        reply = _stub(args).RemoveMembers(request, timeout=60)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    print(f"{args.name}: {reply.removed} of {len(set(args.subject_ids))} subject(s) removed")
    return 0 if reply.removed else 1


def cmd_members(args: argparse.Namespace) -> int:
    from sightline.v1 import gallery_pb2

    page = ""
    print(f"{'SUBJECT':<32} {'ADDED':<25} {'EXPIRES':<25} STATE")
    while True:
        request = gallery_pb2.ListMembersRequest(
            watchlist=args.name, include_expired=args.expired, page_size=500, page_token=page
        )
        try:
            reply = _stub(args).ListMembers(request, timeout=30)
        except grpc.RpcError as exc:
            return rpc_failed(exc)
        for m in reply.memberships:
            print(
                f"{m.subject_id:<32} {_when(m.added_at):<25} {_when(m.expires_at):<25} "
                f"{'expired' if m.expired else 'current'}"
            )
        page = reply.next_page_token
        if not page:
            return 0
