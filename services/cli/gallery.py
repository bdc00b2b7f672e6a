"""``sightline enroll``, ``sightline subjects`` and ``sightline delete``: manage the gallery through its gRPC API.

Enrolling with ``--watchlist`` puts the subject on the list as ``sightline watchlists add`` does (a list that does not
exist yet is created, with no purpose, owned by the caller); ``--expires``/``--days`` end those memberships. The
right to erasure is ``sightline erase`` (``erase.py``).
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

import grpc

from sightline.cli.endpoints import rpc_failed


def register(subparsers: argparse._SubParsersAction) -> None:
    enroll = subparsers.add_parser("enroll", help="enrol a subject from one or more photos (one face each)")
    enroll.add_argument("subject_id")
    enroll.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    enroll.add_argument(
        "--watchlist", action="append", default=[], help="add the subject to this watchlist (repeatable)"
    )
    enroll.add_argument("--name", default="", help="display name")
    enroll.add_argument("--purpose", default="", help="why the subject is enrolled, e.g. a case reference (audited)")
    from sightline.cli.watchlists import add_expiry_arguments

    add_expiry_arguments(enroll)
    enroll.add_argument("--matching", help="gallery gRPC address (default: the local stack)")
    enroll.set_defaults(func=cmd_enroll)
    subjects = subparsers.add_parser("subjects", help="list enrolled subjects")
    subjects.add_argument("--watchlist", default="")
    subjects.add_argument("--matching")
    subjects.set_defaults(func=cmd_subjects)
    delete = subparsers.add_parser("delete", help="delete a subject and all its templates")
    delete.add_argument("subject_id")
    delete.add_argument("--matching")
    delete.set_defaults(func=cmd_delete)
    from sightline.cli.endpoints import add_token_argument

    for command in (enroll, subjects, delete):
        add_token_argument(command)


def _stub(address: str | None, token: str | None = None):  # type: ignore[no-untyped-def]
    from sightline.cli.endpoints import connect
    from sightline.v1 import gallery_pb2_grpc

    return gallery_pb2_grpc.GalleryServiceStub(connect("matching", address, token))


def enroll(
    subject_id: str,
    images: list[Path],
    watchlists: list[str],
    name: str = "",
    address: str | None = None,
    token: str | None = None,
    purpose: str = "",
    expires_at: datetime | None = None,
) -> int:
    """Enrol and print one line per image; returns the number of templates added."""
    from sightline.v1 import gallery_pb2

    payloads = []
    for path in images:
        try:
            payloads.append(path.read_bytes())
        except OSError as exc:
            raise SystemExit(f"error: cannot read {path}: {exc.strerror}") from None
    request = gallery_pb2.EnrollRequest(
        subject_id=subject_id, images=payloads, watchlists=watchlists, display_name=name, purpose=purpose
    )
    if expires_at is not None:
        request.membership_expires_at.FromDatetime(expires_at)
    reply = _stub(address, token).Enroll(request, timeout=120)
    for result in reply.results:
        path = images[result.image_index]
        if result.accepted:
            print(f"  {path}: enrolled (quality {result.quality.score:.0f}, eyes {result.quality.inter_eye_px:.0f} px)")
        else:
            print(f"  {path}: rejected: {result.reason}")
    return reply.templates_added


def cmd_enroll(args: argparse.Namespace) -> int:
    try:
        from sightline.cli.watchlists import expiry_of

        added = enroll(
            args.subject_id,
            args.images,
            args.watchlist,
            args.name,
            args.matching,
            args.token,
            args.purpose,
            expiry_of(args),
        )
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    lists = f" on {', '.join(args.watchlist)}" if args.watchlist else ""
    print(f"{args.subject_id}: {added} template(s) added{lists}")
    return 0 if added else 1


def cmd_subjects(args: argparse.Namespace) -> int:
    from sightline.v1 import gallery_pb2

    page = ""
    while True:
        try:
            reply = _stub(args.matching, args.token).ListSubjects(
                gallery_pb2.ListSubjectsRequest(watchlist=args.watchlist, page_size=200, page_token=page), timeout=30
            )
        except grpc.RpcError as exc:
            return rpc_failed(exc)
        for s in reply.subjects:
            print(f"{s.subject_id:<32} templates={s.template_count:<3} watchlists={','.join(s.watchlists) or '-'}")
        page = reply.next_page_token
        if not page:
            return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from sightline.v1 import gallery_pb2

    request = gallery_pb2.DeleteSubjectRequest(subject_id=args.subject_id)
    try:
        reply = _stub(args.matching, args.token).DeleteSubject(request, timeout=30)
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    print(f"{args.subject_id}: {'deleted' if reply.deleted else 'not enrolled'} ({reply.templates_removed} templates)")
    return 0 if reply.deleted else 1
