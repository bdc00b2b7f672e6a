"""``sightline audit verify`` and ``sightline audit list``: check and read the audit trail in its database.

Both read the database directly (``--database-url``, default ``SIGHTLINE_AUDIT_DATABASE_URL``: the chain matching and
decision share), not through a service: an auditor can check the chain with nothing running, against a backup, or
against the live PostgreSQL database.
``verify`` exits 0 when the chain is intact and 1, naming the first broken record, when it is not.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("audit", help="audit trail: verify the hash chain, list records")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="recompute the hash chain; exit 1 at the first broken record")
    verify.set_defaults(func=cmd_verify)
    listing = actions.add_parser("list", help="records in sequence order")
    listing.add_argument("--after", type=int, default=0, help="only records after this sequence number")
    listing.add_argument("--max", type=int, default=100, help="at most this many records (default 100)")
    listing.add_argument("--action", help="only this action (ENROL, SEARCH, ALERT, REVIEW, ...)")
    listing.add_argument("--principal", help="only records of this principal")
    listing.add_argument("--subject", help="only records about this subject")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=cmd_list)
    for sub in (verify, listing):
        sub.add_argument("--database-url", help="the audit database (default: SIGHTLINE_AUDIT_DATABASE_URL, else <run dir>/audit.db)")


def _open(url: str | None) -> Any:
    from sightline.common.audit import AuditLog

    if not url:
        from sightline.common.audit import AuditSettings

        url = AuditSettings().database_url.get_secret_value()
    return AuditLog.open(url, create=False)  # never create an empty log where the auditor expected one


def cmd_verify(args: argparse.Namespace) -> int:
    from sightline.common.sqlstore import StoreError

    try:
        with _open(args.database_url) as audit:
            report = audit.verify()
            where = audit.description
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if report.intact:
        print(f"audit chain intact: {report.records_checked} record(s) in {where}, head {report.head_hash[:16]}")
        return 0
    print(f"audit chain BROKEN at record {report.first_broken_sequence}: {report.reason} "
          f"({report.records_checked} record(s) before it verified) in {where}")  # fmt: skip
    return 1


def cmd_list(args: argparse.Namespace) -> int:
    from sightline.common.audit import Action
    from sightline.common.sqlstore import StoreError

    action = args.action.upper() if args.action else None
    if action and action not in Action.__members__:
        print(f"error: unknown action {args.action!r}; one of {', '.join(Action.__members__)}", file=sys.stderr)
        return 2
    try:
        with _open(args.database_url) as audit:
            records = audit.records(args.after, args.max, action, args.principal, args.subject)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in records:
        if args.json:
            print(json.dumps({"sequence": r.sequence, "at": r.at.isoformat(), "principal": r.principal,
                              "action": r.action, "subject_id": r.subject_id, "purpose": r.purpose,
                              "result": r.result, "details": r.details, "prev_hash": r.prev_hash, "hash": r.hash},
                             sort_keys=True))  # fmt: skip
        else:
            details = " ".join(f"{k}={v}" for k, v in sorted(r.details.items()))
            print(f"{r.sequence:>6} {r.at.isoformat(timespec='seconds')} {r.action:<13} {r.principal:<20} "
                  f"subject={r.subject_id or '-'} purpose={r.purpose or '-'} result={r.result} {details}")  # fmt: skip
    return 0
