"""``sightline review``: list, show, confirm and reject alerts through the decision service's ReviewService.

The reviewer is the principal of the bearer token the command sends (``--token`` or ``$SIGHTLINE_TOKEN``), never a
field of the request: the server decides who is reviewing, and refuses a second confirmation by the same reviewer
(the two-person rule). So two reviewers use two tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from sightline.cli.endpoints import rpc_failed

STATUSES = {"pending": "PENDING_REVIEW", "confirmed": "CONFIRMED", "rejected": "REJECTED", "all": ""}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("review", help="review alerts: list, show, confirm, reject (two-person rule)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="alerts, oldest first")
    listing.add_argument("--status", choices=sorted(STATUSES), default="pending", help="which alerts (default pending)")
    listing.add_argument("--max", type=int, default=0, help="show at most this many")
    listing.set_defaults(func=cmd_list)
    show = actions.add_parser("show", help="one alert with its reviews")
    show.add_argument("alert_id", help="the alert id or a unique prefix (6+ characters)")
    show.set_defaults(func=cmd_show)
    for name, helptext in (
        ("confirm", "confirm an alert (a second, different reviewer makes it CONFIRMED)"),
        ("reject", "reject an alert"),
    ):
        command = actions.add_parser(name, help=helptext)
        command.add_argument("alert_id", help="the alert id or a unique prefix (6+ characters)")
        command.add_argument("--as", dest="reviewer", help=argparse.SUPPRESS)  # gone: the token names the reviewer
        command.add_argument("--comment", default="", help="why")
        if name == "reject":
            command.add_argument(
                "--not-this-person",
                action="store_true",
                help="the face is not this subject: suppresses further alerts of it on this source",
            )
        command.set_defaults(func=cmd_review, review_action=name)
    feedback = actions.add_parser("feedback", help='"not this person" rejections: false alerts per subject and source')
    feedback.add_argument("--days", type=float, default=0, help="only the last N days (default: all that is kept)")
    feedback.add_argument("--json", action="store_true", help="one JSON object")
    feedback.set_defaults(func=cmd_feedback)
    from sightline.cli.endpoints import add_token_argument

    for sub in actions.choices.values():
        sub.add_argument("--decision", help="decision service gRPC address (default: the local stack)")
        add_token_argument(sub)


def _stub(args: argparse.Namespace) -> Any:
    from sightline.cli.endpoints import connect
    from sightline.v1 import review_pb2_grpc

    return review_pb2_grpc.ReviewServiceStub(connect("decision", args.decision, args.token))


def describe(reviewed: Any) -> str:
    """A few readable lines: the alert, its status and each review (ids and scores only)."""
    from sightline.cli import render
    from sightline.v1 import review_pb2

    lines = [
        render.one_line(reviewed.alert),
        f"  confirmations {reviewed.confirmations}/{reviewed.confirmations_required}"
        f"  full id {reviewed.alert.alert_id}",
    ]
    for r in reviewed.reviews:
        action = review_pb2.ReviewAction.Name(r.action).removeprefix("REVIEW_ACTION_")
        extra = " not-this-person" if r.not_this_person else ""
        comment = f": {r.comment}" if r.comment else ""
        lines.append(
            f"  {r.at.ToDatetime().isoformat(timespec='seconds')}Z {action:<7} by {r.reviewer}{extra}{comment}"
        )
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    from sightline.v1 import events_pb2, review_pb2

    status = STATUSES[args.status]
    request = review_pb2.ListAlertsRequest(page_size=200)
    if status:
        request.status = events_pb2.AlertStatus.Value(f"ALERT_STATUS_{status}")
    shown = 0
    try:
        while True:
            reply = _stub(args).ListAlerts(request, timeout=30)
            for reviewed in reply.alerts:
                print(
                    f"{describe(reviewed).splitlines()[0]}  confirmations {reviewed.confirmations}"
                    f"/{reviewed.confirmations_required}"
                )
                shown += 1
                if args.max and shown >= args.max:
                    return 0
            if not reply.next_page_token:
                break
            request.page_token = reply.next_page_token
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    if not shown:
        print(f"no {args.status} alerts" if status else "no alerts")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from sightline.v1 import review_pb2

    try:
        reviewed = _stub(args).GetAlert(review_pb2.GetAlertRequest(alert_id=args.alert_id), timeout=30)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    print(describe(reviewed))
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from sightline.v1 import review_pb2

    if args.reviewer:
        print(
            "error: --as is gone: the reviewer is the principal of your token (--token or $SIGHTLINE_TOKEN); "
            "see docs/security.md",
            file=sys.stderr,
        )
        return 2
    action = review_pb2.REVIEW_ACTION_CONFIRM if args.review_action == "confirm" else review_pb2.REVIEW_ACTION_REJECT
    request = review_pb2.ReviewAlertRequest(
        alert_id=args.alert_id,
        action=action,
        comment=args.comment,
        not_this_person=getattr(args, "not_this_person", False),
    )
    try:
        reviewed = _stub(args).ReviewAlert(request, timeout=30)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    print(describe(reviewed))
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    """The false-alert report: per subject and source, how often a reviewer said "not this person", then each one."""
    from google.protobuf.json_format import MessageToDict

    from sightline.v1 import review_pb2

    request = review_pb2.ListFeedbackRequest()
    if args.days > 0:
        request.since.FromDatetime(datetime.now(UTC) - timedelta(days=args.days))
    try:
        reply = _stub(args).ListFeedback(request, timeout=30)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), sort_keys=True))
        return 0
    if not reply.feedback:
        print('no "not this person" feedback')
        return 0
    print(f"{'SUBJECT':<24} {'SOURCE':<24} FALSE ALERTS")
    for count in reply.counts:
        print(f"{count.subject_id:<24} {count.source_id:<24} {count.rejections}")
    print()
    for item in reply.feedback:
        until = (
            item.suppresses_until.ToDatetime(UTC).isoformat(timespec="seconds")
            if item.HasField("suppresses_until")
            else "for good"
        )
        track = f" track {item.track_id}" if item.track_id else ""
        print(
            f"{item.at.ToDatetime(UTC).isoformat(timespec='seconds')} {item.reviewer}: {item.subject_id} on "
            f"{item.source_id}{track} (alert {item.alert_id[:12]}; suppressed until {until}) {item.comment}"
        )
    return 0
