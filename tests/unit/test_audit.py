"""The audit log on real databases: appends chain, verify finds an edit by its sequence, triggers refuse changes.

Every test runs on a SQLite file and, marked ``postgres``, on PostgreSQL (a schema of its own in the session's
throwaway database; skipped, saying so, when no server is reachable).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sightline.common.audit import GENESIS_HASH, Action, AuditError, AuditLog, AuditRecord
from sightline.v1 import audit_pb2

# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def opened() -> Iterator[list[AuditLog]]:
    logs: list[AuditLog] = []
    yield logs
    for log in logs:
        log.close()


@pytest.fixture()
def audit(store_url: str, opened: list[AuditLog]) -> AuditLog:
    log = AuditLog.open(store_url)
    opened.append(log)
    return log


def raw(store_url: str, statement: str) -> list[Any]:
    """Run SQL straight on the database, as someone with a database client would."""
    if store_url.startswith("sqlite:///"):
        conn = sqlite3.connect(store_url[len("sqlite:///") :], isolation_level=None)
        try:
            return conn.execute(statement).fetchall()
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(store_url, autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def drop_append_only_triggers(store_url: str) -> None:
    if store_url.startswith("sqlite:///"):
        for name in ("audit_records_no_update", "audit_records_no_delete", "audit_chain_head_forward",
                     "audit_chain_head_no_delete"):  # fmt: skip
            raw(store_url, f"DROP TRIGGER {name}")
    else:
        raw(store_url, "DROP TRIGGER audit_records_append_only ON audit_records")
        raw(store_url, "DROP TRIGGER audit_chain_head_forward ON audit_chain_head")


def fill(audit: AuditLog, count: int) -> list[AuditRecord]:
    return [audit.append(f"officer-{i % 2}", Action.SEARCH, f"subject-{i}", "cctv-watchlist", "ok",
                         {"candidates": i, "watchlist": "wl"}) for i in range(count)]  # fmt: skip


# -- appending and verifying -------------------------------------------------------------------------------------


def test_appends_are_chained_and_verify_intact(audit: AuditLog) -> None:
    assert audit.verify().intact and audit.head() == (0, GENESIS_HASH)
    records = fill(audit, 5)
    assert [r.sequence for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(records, records[1:], strict=False))
    assert audit.head() == (5, records[-1].hash)
    assert audit.records() == records  # what is read back is exactly what was chained
    report = audit.verify()
    assert report.intact and report.records_checked == 5 and report.first_broken_sequence is None


def test_records_are_filtered_and_paged(audit: AuditLog) -> None:
    fill(audit, 6)
    audit.append("reviewer-a", Action.REVIEW, "subject-9", "human-review", "CONFIRMED", {"alert_id": "a1"})
    assert [r.sequence for r in audit.records(after=2, limit=3)] == [3, 4, 5]
    assert [r.sequence for r in audit.records(principal="officer-1")] == [2, 4, 6]
    (review,) = audit.records(action="REVIEW")
    assert review.subject_id == "subject-9" and review.details == {"alert_id": "a1"}


def test_an_edited_record_is_found_by_its_sequence(store_url: str, audit: AuditLog) -> None:
    fill(audit, 5)
    drop_append_only_triggers(store_url)
    raw(store_url, "UPDATE audit_records SET result = 'refused' WHERE sequence = 3")
    report = audit.verify()
    assert not report.intact and report.first_broken_sequence == 3 and report.records_checked == 2
    assert "record 3" in report.reason and "changed" in report.reason


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(store_url: str, audit: AuditLog) -> None:
    records = fill(audit, 4)
    drop_append_only_triggers(store_url)
    # A forger who recomputes record 2's hash still cannot make record 3 point at it.
    raw(store_url, f"UPDATE audit_records SET principal = 'someone-else', hash = '{'a' * 64}' WHERE sequence = 2")
    report = audit.verify()
    assert report.first_broken_sequence == 2  # its own hash no longer matches its content
    raw(store_url, f"UPDATE audit_records SET principal = 'officer-1', hash = '{records[1].hash}' WHERE sequence = 2")
    assert audit.verify().intact
    raw(store_url, "UPDATE audit_records SET details = '{\"candidates\":\"9\",\"watchlist\":\"wl\"}' WHERE sequence = 4")
    assert audit.verify().first_broken_sequence == 4


def test_removed_records_are_found(store_url: str, audit: AuditLog) -> None:
    fill(audit, 5)
    drop_append_only_triggers(store_url)
    raw(store_url, "DELETE FROM audit_records WHERE sequence = 2")
    report = audit.verify()
    assert report.first_broken_sequence == 2 and "missing" in report.reason
    raw(store_url, "DELETE FROM audit_records WHERE sequence > 2")  # the tail too: only the chain head remembers it
    report = audit.verify()
    assert not report.intact and report.first_broken_sequence == 2


def test_truncating_the_tail_is_found_through_the_chain_head(store_url: str, audit: AuditLog) -> None:
    fill(audit, 3)
    drop_append_only_triggers(store_url)
    raw(store_url, "DELETE FROM audit_records WHERE sequence = 3")
    report = audit.verify()
    assert not report.intact and report.first_broken_sequence == 3 and "head" in report.reason


def test_the_database_refuses_update_and_delete(store_url: str, audit: AuditLog) -> None:
    fill(audit, 2)
    for statement in ("UPDATE audit_records SET result = 'x' WHERE sequence = 1",
                      "DELETE FROM audit_records WHERE sequence = 2",
                      "UPDATE audit_chain_head SET sequence = 1 WHERE id = 1",
                      "DELETE FROM audit_chain_head"):  # fmt: skip
        with pytest.raises(Exception, match="append-only|only moves one record forward"):
            raw(store_url, statement)
    if not store_url.startswith("sqlite"):
        with pytest.raises(Exception, match="append-only"):
            raw(store_url, "TRUNCATE audit_records")
    assert audit.verify().intact and len(audit.records()) == 2


def test_concurrent_writers_share_one_chain(store_url: str, opened: list[AuditLog]) -> None:
    """Threads of one process, and two logs on one database (as two replicas would be), append without a gap."""
    logs = [AuditLog.open(store_url), AuditLog.open(store_url)]
    opened.extend(logs)
    errors: list[BaseException] = []

    def work(log: AuditLog, worker: int) -> None:
        try:
            for i in range(15):
                log.append(f"worker-{worker}", Action.STREAM_SEARCH, f"s{i}", "cctv-watchlist", "ok")
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(logs[w % 2], w)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert [r.sequence for r in logs[0].records(limit=1000)] == list(range(1, 61))
    report = logs[1].verify(batch=7)  # small pages: verification crosses page boundaries
    assert report.intact and report.records_checked == 60


def test_verifying_a_live_log_while_another_replica_appends_is_intact(store_url: str, opened: list[AuditLog]) -> None:
    writer, reader = AuditLog.open(store_url), AuditLog.open(store_url)
    opened.extend([writer, reader])
    fill(writer, 20)
    stop, reports = threading.Event(), []

    def keep_appending() -> None:
        # A steady writer, not a tight loop: SQLite's busy handler would let a writer that never pauses starve the
        # reader (a live service appends a few records a second, not thousands).
        for _ in range(2000):
            if stop.is_set():
                return
            writer.append("service:matching", Action.STREAM_SEARCH, "", "cctv-watchlist", "ok")
            time.sleep(0.002)

    appender = threading.Thread(target=keep_appending)
    appender.start()
    try:
        for _ in range(5):
            reports.append(reader.verify(batch=3))  # small pages: appends land between them
    finally:
        stop.set()
        appender.join()
    assert all(r.intact for r in reports), [r.reason for r in reports if not r.intact]
    assert reports[-1].records_checked >= 20 and reader.verify().records_checked == reader.head()[0]


def test_a_record_planted_beyond_the_chain_head_is_found(store_url: str, audit: AuditLog) -> None:
    records = fill(audit, 3)
    drop_append_only_triggers(store_url)
    raw(store_url, "INSERT INTO audit_records (sequence, at, principal, action, subject_id, purpose, result, details,"
                   f" prev_hash, hash) VALUES (4, '2026-01-01T00:00:00.000000Z', 'x', 'ERASE', '', '', 'ok', '{{}}',"
                   f" '{records[-1].hash}', '{'b' * 64}')")  # fmt: skip
    report = audit.verify()
    assert not report.intact and report.first_broken_sequence == 4 and "beyond the chain head" in report.reason


# -- what a record may hold, publishing, reading without creating -------------------------------------------------


def test_face_data_and_unknown_actions_are_refused(audit: AuditLog) -> None:
    for details in ({"image": b"\xff\xd8"}, {"vector": [0.1, 0.2]}, {"note": "x" * 5000}):
        with pytest.raises(ValueError):
            audit.append("p", Action.ENROL, "s", details=details)
    with pytest.raises(ValueError):
        audit.append("p", "LOOK_AT_FACES")
    with pytest.raises(ValueError):
        audit.append("", Action.ENROL)
    assert audit.head()[0] == 0  # nothing refused was written


def test_each_record_is_published_and_a_failing_publisher_loses_nothing(store_url: str, opened: list[AuditLog]) -> None:
    seen: list[AuditRecord] = []
    log = AuditLog.open(store_url, publish=seen.append)
    opened.append(log)
    record = log.append("p", Action.ERASE, "s1", "erasure-request", "ok", {"templates": 3})
    assert seen == [record]
    message = record.to_proto()
    assert message.action == audit_pb2.AUDIT_ACTION_ERASE and message.sequence == 1
    assert message.hash == record.hash and dict(message.details) == {"templates": "3"}
    assert message.at.ToDatetime().replace(tzinfo=record.at.tzinfo) == record.at

    def broken(_: AuditRecord) -> None:
        raise ConnectionError("broker down")

    failing = AuditLog.open(store_url, publish=broken)
    opened.append(failing)
    failing.append("p", Action.DELETE, "s1")
    assert log.verify().intact and log.head()[0] == 2


def test_opening_without_create_needs_an_existing_log(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit log"):
        AuditLog.open(f"sqlite:///{tmp_path / 'nothing.db'}", create=False)
    with pytest.raises(AuditError, match="unsupported audit URL"):
        AuditLog.open("mysql://host/db")


def test_every_action_has_its_number_on_the_audit_topic() -> None:
    from sightline.common.audit import Action
    from sightline.v1 import audit_pb2

    names = {name.removeprefix("AUDIT_ACTION_") for name in audit_pb2.AuditAction.keys()} - {"UNSPECIFIED"}
    assert names == {action.value for action in Action}
