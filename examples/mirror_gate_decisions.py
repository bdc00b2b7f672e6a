"""Mirror gate decisions into a SQL table: one row per e-channel session outcome, erased with the traveller.

Subscribes to ``sightline.sessions.v1`` and ``sightline.erasures.v1`` as the consumer group ``--group``. Each
session's DECIDED event (ACCEPT, REFER_TO_OFFICER or CANCELLED, with its reasons, figures and evidence frame ids)
becomes a row of ``gate_decisions`` in DATABASE_URL, keyed by the event's ``ce_id``; the other session events
(opened, progress, closed) are skipped. A right-to-erasure notice deletes the rows whose claim was that subject, as
the integrator guide requires of anyone who keeps copies of results. Rows are written with ``ON CONFLICT DO
NOTHING``, so an event handed over again after a crash (``redelivered``) changes nothing.

    python examples/mirror_gate_decisions.py postgresql://app@db.example.org/border --local-stack
    python examples/mirror_gate_decisions.py sqlite:///gate-decisions.db --bootstrap kafka-1:9092

DATABASE_URL is ``postgresql://...`` or, for a trial, ``sqlite:///path.db``; the table is created when missing. It
reads the broker only (``--bootstrap`` or ``$SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS``). Rows hold ids, outcomes and
scores, no face data.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from datetime import UTC
from pathlib import Path

from sightline.common.codec import outcome_name
from sightline.common.sqlstore import BackendStore, Migration, StoreError, open_backend
from sightline.common.topics import ERASURES, SESSIONS
from sightline.sdk import Event, Subscriber
from sightline.sdk.options import add_connection_options, kafka_from
from sightline.v1 import events_pb2, session_pb2

log = logging.getLogger("mirror_gate_decisions")

SCHEMA = (
    Migration(
        1,
        "gate decisions mirrored from sightline.sessions.v1",
        (
            "CREATE TABLE gate_decisions (ce_id {key} PRIMARY KEY, session_id {key} NOT NULL, "
            "gate_id TEXT NOT NULL, claim_kind TEXT NOT NULL, claim_subject_id {key} NOT NULL, "
            "outcome TEXT NOT NULL, reasons TEXT NOT NULL, frames_seen INTEGER NOT NULL, "
            "frames_verified INTEGER NOT NULL, best_similarity DOUBLE PRECISION NOT NULL, "
            "liveness_score DOUBLE PRECISION NOT NULL, evidence_frame_ids TEXT NOT NULL, alert_id TEXT NOT NULL, "
            "policy_version TEXT NOT NULL, model_version TEXT NOT NULL, decided_at {timestamp} NOT NULL, "
            "mirrored_at {timestamp} NOT NULL)",
            "CREATE INDEX gate_decisions_claim ON gate_decisions (claim_subject_id)",
        ),
    ),
)
COLUMNS = (
    "ce_id, session_id, gate_id, claim_kind, claim_subject_id, outcome, reasons, frames_seen, frames_verified, "
    "best_similarity, liveness_score, evidence_frame_ids, alert_id, policy_version, model_version, decided_at, "
    "mirrored_at"
)


class GateDecisionTable(BackendStore):
    """The ``gate_decisions`` table in a PostgreSQL or SQLite database (Sightline's SQL layer, common/sqlstore.py)."""

    what = "gate decision mirror"

    def __init__(self, url: str) -> None:
        super().__init__(open_backend(url, what=self.what, application_name="sightline-gate-mirror"))
        self._migrated(SCHEMA, "gate_decisions_schema", 0x6A7E_D5, self.what)

    def add(self, ce_id: str, event: session_pb2.SessionEvent) -> bool:
        """One decided session; False when its row was already there."""
        update, dialect = event.update, self._backend.dialect
        row = (
            ce_id,
            event.session_id,
            event.gate_id,
            session_pb2.ClaimKind.Name(event.claim_kind).removeprefix("CLAIM_KIND_"),
            event.claim_subject_id,
            outcome_name(update.outcome),
            json.dumps(list(update.reasons)),
            update.frames_seen,
            update.frames_verified,
            update.best_similarity,
            update.liveness_score,
            json.dumps(list(update.evidence_frame_ids)),
            update.alert_id,
            update.policy_version,
            update.model_version,
            dialect.to_db_time(event.at.ToDatetime(UTC)),
            self._now(),
        )
        placeholders = ", ".join("?" * len(row))
        with self._tx(write=True) as cur:
            inserted = cur.execute(
                f"INSERT INTO gate_decisions ({COLUMNS}) VALUES ({placeholders}) ON CONFLICT (ce_id) DO NOTHING", row
            ).rowcount
        return inserted == 1

    def erase(self, subject_id: str) -> int:
        """Delete every row whose claim was the subject; how many."""
        with self._tx(write=True) as cur:
            return cur.execute("DELETE FROM gate_decisions WHERE claim_subject_id = ?", (subject_id,)).rowcount


def mirror(table: GateDecisionTable, counts: dict[str, int]) -> Callable[[Event], None]:
    """The handler: decided sessions in, erased subjects out."""

    def handle(event: Event) -> None:
        if event.topic == ERASURES.name:
            erased = event.payload(events_pb2.SubjectErased)
            counts["erased"] += table.erase(erased.subject_id)
            return
        session = event.payload(session_pb2.SessionEvent)
        if session.kind != session_pb2.SessionEvent.KIND_DECIDED:
            return
        if table.add(event.id, session):
            counts["mirrored"] += 1
            log.info("mirrored %s at %s: %s", session.session_id, session.gate_id, outcome_name(session.update.outcome))

    return handle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("database_url", metavar="DATABASE_URL", help="postgresql://... or sqlite:///path.db")
    parser.add_argument(
        "--group", default="gate-decisions-mirror", help="consumer group (default gate-decisions-mirror)"
    )
    parser.add_argument("--store", type=Path, help="handled-id store (default <home>/subscribers/<group>.sqlite)")
    parser.add_argument("--idle-exit", type=float, metavar="SECONDS", help="exit after this long without an event")
    add_connection_options(parser, grpc=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # the client's connection chatter
    args = parse_args(argv)
    try:
        table = GateDecisionTable(args.database_url)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts = {"mirrored": 0, "erased": 0}
    subscriber = Subscriber([SESSIONS.name, ERASURES.name], args.group, kafka=kafka_from(args), store=args.store)
    signal.signal(signal.SIGTERM, lambda *_: subscriber.stop())  # finish the current event, commit, leave
    try:
        with table, subscriber:
            subscriber.run(mirror(table, counts), idle_timeout_s=args.idle_exit)
    except KeyboardInterrupt:
        pass
    print(f"{counts['mirrored']} gate decision(s) mirrored, {counts['erased']} row(s) erased")
    return 0


if __name__ == "__main__":
    sys.exit(main())
