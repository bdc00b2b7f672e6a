"""``sightline audit verify``, ``list`` and ``new-key``: check and read the audit trail in its database.

``verify`` and ``list`` read the database directly (``--database-url``, default ``SIGHTLINE_AUDIT_DATABASE_URL``: the
chain matching and decision share), not through a service: an auditor can check the chain with nothing running,
against a backup, or against the live PostgreSQL database; neither ever upgrades or creates a log. ``verify`` needs
the audit keyring the services sign with (``--keys-file``, default ``SIGHTLINE_AUDIT_KEYS_FILE`` /
``SIGHTLINE_AUDIT_KEYS``, else a SQLite log's local ``audit.keys`` next to it); with ``--against-topic`` it also
checks the database against the signed checkpoints on ``sightline.audit.v1``, which catches records cut off the end.
Records without a MAC (a log from before record authentication) fail unless ``--legacy-until`` covers them, and are
then counted in the output, never passed over in silence; a ``--legacy-until`` above the boundary the upgrade recorded
(in the first authenticated record) fails too, and no message ever suggests one.
``verify`` exits 0 when everything is intact, 1, naming the first broken record, when it is not, and 2 when it cannot
check (no log, no keyring, no broker).
``new-key`` prints a new keyring entry (``id:BASE64``) for a rotation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("audit", help="audit trail: verify the hash chain and MACs, list records")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="recompute the hash chain and MACs; exit 1 at the first broken record")
    verify.add_argument(
        "--keys-file",
        type=Path,
        help="the audit keyring, 'id:BASE64' a line (default: SIGHTLINE_AUDIT_KEYS_FILE or "
        "SIGHTLINE_AUDIT_KEYS, else audit.keys next to a SQLite audit database)",
    )
    verify.add_argument(
        "--legacy-until",
        type=int,
        help="records up to this sequence may carry no MAC (written before record authentication: "
        "the number the upgrade logged and recorded, never higher; default "
        "SIGHTLINE_AUDIT_LEGACY_UNTIL, 0)",
    )
    verify.add_argument(
        "--against-topic",
        action="store_true",
        help="also check the database against the signed checkpoints on sightline.audit.v1",
    )
    verify.add_argument(
        "--bootstrap",
        help="Kafka bootstrap servers for --against-topic (default: the running "
        "local stack's, else SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS)",
    )
    verify.add_argument(
        "--topic-timeout",
        type=float,
        default=3.0,
        help="stop reading the topic after this many seconds without a message (default 3)",
    )
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
        sub.add_argument(
            "--database-url", help="the audit database (default: SIGHTLINE_AUDIT_DATABASE_URL, else <run dir>/audit.db)"
        )
    new_key = actions.add_parser(
        "new-key",
        help="print a new keyring entry 'id:BASE64' (append it to the keyring, "
        "then make it active with SIGHTLINE_AUDIT_KEY_ID)",
    )
    new_key.add_argument("--key-id", help="the new key's id (never reuse one; default: a random a-XXXXXXXX)")
    new_key.set_defaults(func=cmd_new_key)


def _url(url: str | None) -> str:
    from sightline.common.audit import AuditSettings

    return url or AuditSettings().database_url.get_secret_value()


def _open(url: str, keyring: Any = None) -> Any:
    from sightline.common.audit import AuditLog, AuditSettings

    # create=False: never create an empty log (or a keyring), nor upgrade one, where the auditor expected a log.
    return AuditLog.open(url, create=False, keyring=keyring, legacy_until=AuditSettings().legacy_until)


def _keyring(keys_file: Path | None, url: str) -> Any:
    from sightline.common.audit_keys import AuditKeyring, AuditKeySettings

    settings = AuditKeySettings()
    if keys_file is not None:
        return AuditKeyring.from_file(keys_file, settings.key_id)
    return AuditKeyring.configured(url, settings, create=False)


def _require_sqlite_file(url: str) -> None:
    from sightline.common.audit import AuditError

    prefix = "sqlite:///"
    if url.startswith(prefix) and url != prefix + ":memory:" and not Path(url[len(prefix) :]).expanduser().is_file():
        raise AuditError(f"no audit log at {url}: the file does not exist")


def cmd_verify(args: argparse.Namespace) -> int:
    from sightline.common.sqlstore import StoreError

    try:
        url = _url(args.database_url)
        _require_sqlite_file(url)  # "no audit log" says more than "no keyring" beside a log that is not there
        keyring = _keyring(args.keys_file, url)
        checkpoints = _read_checkpoints(args) if args.against_topic else None  # first: see check_against
        with _open(url, keyring) as audit:
            report = audit.verify(legacy_until=args.legacy_until)
            against = _check_against(audit, keyring, checkpoints) if checkpoints is not None else None
            where = audit.description
    except (StoreError, _TopicUnreadable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if report.intact:
        print(f"audit chain intact: {report.records_checked} record(s) in {where}, head {report.head_hash[:16]}")
        if report.legacy_records:
            print(_legacy_line(report))
    else:
        print(
            f"audit chain BROKEN at record {report.first_broken_sequence}: {report.reason} "
            f"({report.records_checked} record(s) before it verified) in {where}"
        )
    if against is not None:
        state = "match the database" if against.intact else "do NOT match the database"
        print(f"audit checkpoints {state}: {against.reason}")
    return 0 if report.intact and (against is None or against.intact) else 1


def _legacy_line(report: Any) -> str:
    """The legacy records an intact report accepted (``--legacy-until``): never passed over in silence."""
    line = (
        f"WARNING: {report.legacy_records} legacy record(s) without MAC (1..{report.legacy_records}, written "
        "before record authentication): "
    )
    if report.legacy_vouched:
        return line + "their hashes are covered by the MAC of the first authenticated record after them"
    return line + "NOT covered by any MAC yet (no authenticated record follows them): only their hash chain vouches"


class _TopicUnreadable(Exception):
    """The audit topic could not be read (no broker, no topic)."""


def _read_checkpoints(args: argparse.Namespace) -> Any:
    from sightline.cli.endpoints import kafka_settings
    from sightline.common.audit_checkpoints import read_checkpoints

    try:
        return read_checkpoints(kafka_settings(args.bootstrap), idle_timeout_s=args.topic_timeout)
    except Exception as exc:  # noqa: BLE001 - kafka-python raises many types; the auditor needs the message
        raise _TopicUnreadable(f"cannot read the audit topic: {exc}") from None


def _check_against(audit: Any, keyring: Any, checkpoints: Any) -> Any:
    from sightline.common.audit_checkpoints import check_against

    found, malformed = checkpoints
    return check_against(audit, keyring, found, malformed)


def cmd_new_key(args: argparse.Namespace) -> int:
    from sightline.common.audit_keys import AuditKeyError, new_entry

    try:
        print(new_entry(args.key_id))
    except AuditKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from sightline.common.audit import Action
    from sightline.common.sqlstore import StoreError

    action = args.action.upper() if args.action else None
    if action and action not in Action.__members__:
        print(f"error: unknown action {args.action!r}; one of {', '.join(Action.__members__)}", file=sys.stderr)
        return 2
    try:
        with _open(_url(args.database_url)) as audit:
            records = audit.records(args.after, args.max, action, args.principal, args.subject)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in records:
        if args.json:
            print(
                json.dumps(
                    {
                        "sequence": r.sequence,
                        "at": r.at.isoformat(),
                        "principal": r.principal,
                        "action": r.action,
                        "subject_id": r.subject_id,
                        "purpose": r.purpose,
                        "result": r.result,
                        "details": r.details,
                        "prev_hash": r.prev_hash,
                        "hash": r.hash,
                        "key_id": r.key_id,
                        "mac": r.mac,
                    },
                    sort_keys=True,
                )
            )
        else:
            details = " ".join(f"{k}={v}" for k, v in sorted(r.details.items()))
            print(
                f"{r.sequence:>6} {r.at.isoformat(timespec='seconds')} {r.action:<13} {r.principal:<20} "
                f"subject={r.subject_id or '-'} purpose={r.purpose or '-'} result={r.result} {details}"
            )
    return 0
