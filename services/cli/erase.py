"""``sightline erase SUBJECT --reference CASE``: the right to erasure, through the gallery's EraseSubject.

Deletes the subject, its templates and every watchlist membership; the other matching replicas drop it within their
refresh interval. The matching service publishes ``SubjectErased`` (with the reference) on ``sightline.erasures.v1``
for integrators holding copies of results, and audits the erasure. It cannot be undone, so the command asks for the
subject id again unless ``--yes`` is given (and refuses without ``--yes`` when it cannot ask). Erasing an id that is
not enrolled is not an error: it is audited and published all the same (exit status 0, "nothing was enrolled").
"""

from __future__ import annotations

import argparse
import sys

import grpc

from sightline.cli.endpoints import rpc_failed


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("erase", help="erase a subject everywhere (right to erasure), citing the request")
    parser.add_argument("subject_id")
    parser.add_argument("--reference", required=True, help="the erasure request's reference (case number); audited")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--matching", help="matching service gRPC address (default: the local stack)")
    from sightline.cli.endpoints import add_token_argument

    add_token_argument(parser)
    parser.set_defaults(func=cmd_erase)


def _confirmed(subject_id: str) -> bool:
    if not sys.stdin.isatty():
        print("error: erasure cannot be undone: pass --yes to erase without a prompt", file=sys.stderr)
        return False
    answer = input(
        f"Erase {subject_id!r} and everything enrolled about it? This cannot be undone.\n"
        "Type the subject id to confirm: "
    )
    return answer.strip() == subject_id


def cmd_erase(args: argparse.Namespace) -> int:
    from sightline.cli.endpoints import connect
    from sightline.v1 import gallery_pb2, gallery_pb2_grpc

    if not args.yes and not _confirmed(args.subject_id):
        print("not erased", file=sys.stderr)
        return 2
    stub = gallery_pb2_grpc.GalleryServiceStub(connect("matching", args.matching, args.token))
    try:
        reply = stub.EraseSubject(
            gallery_pb2.EraseSubjectRequest(subject_id=args.subject_id, reference=args.reference), timeout=60
        )
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    if reply.erased:
        lists = ", ".join(reply.watchlists) or "none"
        print(
            f"{args.subject_id}: erased ({reply.templates_removed} template(s); watchlists: {lists}); "
            f"reference {args.reference}; notice published on sightline.erasures.v1"
        )
    else:
        print(
            f"{args.subject_id}: nothing was enrolled under this id; the erasure request {args.reference} is "
            "audited and published all the same"
        )
    return 0
