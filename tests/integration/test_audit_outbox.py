"""The audit outbox: a gallery write and its audit record cannot come apart.

Against a real matching gRPC server on 127.0.0.1 (in this process, so its gallery and outbox can be inspected) that
calls real detection and embedding services on real photos, with the audit log made unwritable for real:

- SQLite: a directory takes the place of the audit database's rollback journal, so every transaction on it fails
  with "disk I/O error" (as on a failing disk; permissions would not do, the tests may run as root);
- PostgreSQL (when the test server is reachable): another session holds the chain head's table locked, and the audit
  log's connection gives up after ``lock_timeout``.

While the audit log is down, writes succeed, their records wait in the outbox, and nothing is answered unaudited;
once it is back the relay appends them in order, once each, even after a relay crash between append and delete. A
failure forced inside a write's transaction leaves neither the write nor its records.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from test_watchlists import Replica, face_services, photo, records, refused, start_replica, wait_until

from sightline.common.audit import Action, AuditLog, AuditSettings, parse_time
from sightline.common.audit_keys import AuditKeyring, new_entry
from sightline.matching.audit_outbox import WRITTEN_AT, AuditEntry, AuditOutboxRelay, OutboxPolicy, append_row
from sightline.matching.store import GalleryStore
from sightline.matching.templates import TemplateCipher, generate_key
from sightline.tooling.localstack import LocalStack
from sightline.v1 import events_pb2, gallery_pb2

__all__ = ["face_services"]  # a fixture, imported for this module's replicas

OFFICER = "officer-1"
REFERENCE = "DSAR-2026-0203"
# Quick retries and a short wait, so that a test sees the outage end within a second.
POLICY = OutboxPolicy(poll_s=0.2, retry_first_s=0.05, retry_max_s=0.3, wait_s=3.0)


# -- an audit log that can be taken down ----------------------------------------------------------------------------


class SqliteOutage:
    """Every transaction on the audit file fails while a directory stands where SQLite writes its journal."""

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}"
        self._journal = Path(f"{path}-journal")

    def down(self) -> None:
        self._journal.mkdir()

    def up(self) -> None:
        self._journal.rmdir()

    def close(self) -> None:
        if self._journal.is_dir():
            self.up()


class PostgresOutage:
    """Another session holds the audit chain's head locked; the audit log's statements time out after 300 ms."""

    def __init__(self, schema_url: str) -> None:
        self.url = f"{schema_url}%20-clock_timeout%3D300"
        self._schema_url = schema_url
        self._locker: Any = None

    def down(self) -> None:
        import psycopg

        self._locker = psycopg.connect(self._schema_url)  # a transaction, open until up()
        self._locker.execute("LOCK TABLE audit_chain_head IN ACCESS EXCLUSIVE MODE")

    def up(self) -> None:
        self._locker.rollback()
        self._locker.close()
        self._locker = None

    def close(self) -> None:
        if self._locker is not None:
            self.up()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteOutage | PostgresOutage]:
    made = (
        SqliteOutage(tmp_path / "audit.db")
        if request.param == "sqlite"
        else PostgresOutage(str(request.getfixturevalue("pg_schema_url")))
    )
    yield made
    made.close()


@pytest.fixture()
def audit(outage: SqliteOutage | PostgresOutage) -> Iterator[AuditLog]:
    log = AuditLog.open(outage.url, keyring=AuditKeyring.parse(new_entry("k1")))  # a shared log needs a keyring
    yield log
    log.close()


@pytest.fixture()
def gallery_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gallery.db'}"


@pytest.fixture()
def notices() -> list[events_pb2.SubjectErased]:
    return []  # where the replica's erasure notices go (the broker is not what these tests are about)


@pytest.fixture()
def replica(
    face_services: LocalStack, gallery_url: str, audit: AuditLog, notices: list[events_pb2.SubjectErased]
) -> Iterator[Replica]:
    running = start_replica(face_services, gallery_url, generate_key(), audit, 30.0, notices.append, POLICY)
    yield running
    running.stop()


def outbox(replica: Replica) -> list[tuple[str, str, str]]:
    return [
        (r.entry.action.value, r.entry.subject_id, r.entry.result) for r in replica.gallery.store.audit_outbox().rows
    ]


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"service": "matching"}) or 0.0


def trail(audit: AuditLog, after: int) -> list[tuple[str, str, str]]:
    return [(r.action, r.subject_id, r.result) for r in records(audit, after)]


# -- the audit log down -------------------------------------------------------------------------------------------


def test_writes_go_on_while_the_audit_log_is_down_and_reach_it_in_order_once_it_is_back(
    replica: Replica,
    audit: AuditLog,
    outage: SqliteOutage | PostgresOutage,
    face_photos: Path,
    notices: list[events_pb2.SubjectErased],
) -> None:
    galleries, lists = replica.gallery_stub(), replica.watchlist_stub()
    start = audit.head()[0]
    galleries.Enroll(gallery_pb2.EnrollRequest(subject_id="o-biden", images=[photo(face_photos, "biden.jpg")]))
    assert trail(audit, start) == [("ENROL", "o-biden", "ok")]  # in the chain when the call returns
    assert outbox(replica) == [] and gauge("sightline_audit_outbox_records") == 0
    before = audit.head()[0]

    outage.down()
    enrolled = galleries.Enroll(
        gallery_pb2.EnrollRequest(
            subject_id="o-obama", images=[photo(face_photos, "obama.jpg")], watchlists=["outbox-a"]
        )
    )
    assert enrolled.templates_added == 1
    erased = galleries.EraseSubject(gallery_pb2.EraseSubjectRequest(subject_id="o-biden", reference=REFERENCE))
    assert erased.erased and erased.templates_removed == 1
    lists.CreateWatchlist(
        gallery_pb2.CreateWatchlistRequest(watchlist=gallery_pb2.Watchlist(name="outbox-b", purpose="case 12"))
    )
    lists.AddMembers(gallery_pb2.AddMembersRequest(watchlist="outbox-b", subject_ids=["o-obama"]))

    # The gallery changed; every write's records wait in the outbox, in order, and nothing else does.
    subject = replica.gallery.store.get_subject("o-obama")
    assert subject is not None and subject.template_count == 1 and subject.watchlists == ("outbox-a", "outbox-b")
    assert replica.gallery.store.get_subject("o-biden") is None and [n.subject_id for n in notices] == ["o-biden"]
    expected = [
        ("ENROL", "o-obama", "ok"),
        ("ERASE", "o-biden", "erased"),
        ("ERASE", "o-biden", "notice published"),
        ("WATCHLIST", "", "list created"),
        ("WATCHLIST", "o-obama", "member added"),
    ]
    assert outbox(replica) == expected
    assert {row.entry.principal for row in replica.gallery.store.audit_outbox().rows} == {OFFICER}
    assert replica.gallery.audit_outbox(audit).failing  # the relay the servicers started
    assert wait_until(lambda: gauge("sightline_audit_outbox_records") == len(expected), timeout=3)
    # Matching stays ready (stream matching goes on); a search, which must be audited before it is answered, is not.
    assert replica.gallery.readiness.why_not_ready() == ""
    probe = photo(face_photos, "obama2.jpg")
    error = refused(lambda: galleries.Search(gallery_pb2.SearchRequest(probe_image=probe)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "audit log" in error.details()

    outage.up()
    assert wait_until(lambda: outbox(replica) == [], timeout=5)
    relayed = records(audit, before)
    assert [(r.action, r.subject_id, r.result) for r in relayed] == expected
    assert {r.principal for r in relayed} == {OFFICER}
    assert all(parse_time(r.details[WRITTEN_AT]) <= r.at for r in relayed)  # when the write was, then when appended
    assert relayed[1].details["reference"] == REFERENCE and relayed[1].details["templates_removed"] == "1"
    assert audit.verify().intact
    assert wait_until(lambda: gauge("sightline_audit_outbox_records") == 0, timeout=3)
    assert gauge("sightline_audit_outbox_oldest_seconds") == 0
    assert not replica.gallery.audit_outbox(audit).failing


def test_a_relay_that_died_between_append_and_delete_appends_nothing_twice(
    audit: AuditLog, outage: SqliteOutage | PostgresOutage, face_services: LocalStack, gallery_url: str
) -> None:
    key = generate_key()
    replica = start_replica(face_services, gallery_url, key, audit, 30.0, outbox=POLICY)
    before = audit.head()[0]
    outage.down()
    for subject_id in ("ghost-1", "ghost-2", "ghost-3"):
        replica.gallery_stub().DeleteSubject(gallery_pb2.DeleteSubjectRequest(subject_id=subject_id))
    replica.stop()  # the process goes away with its records in the outbox (its relay could not append them)
    store = GalleryStore.open(gallery_url, TemplateCipher.from_base64(key, "k1"))
    try:
        rows = store.audit_outbox().rows
    finally:
        store.close()
    assert [(r.entry.subject_id, r.entry.result) for r in rows] == [(f"ghost-{n}", "not enrolled") for n in (1, 2, 3)]

    # The audit log is back; a relay appends the first two rows and dies before deleting them.
    outage.up()
    for row in rows[:2]:
        append_row(audit, row)
    assert trail(audit, before) == [("DELETE", "ghost-1", "not enrolled"), ("DELETE", "ghost-2", "not enrolled")]

    # The replica starts again: its relay drains the outbox at once, appending only what the chain lacks.
    again = start_replica(face_services, gallery_url, key, audit, 30.0, outbox=POLICY)
    try:
        assert wait_until(lambda: outbox(again) == [], timeout=5)
        assert trail(audit, before) == [("DELETE", f"ghost-{n}", "not enrolled") for n in (1, 2, 3)]
        assert audit.verify().intact
    finally:
        again.stop()


# -- by construction: one transaction ------------------------------------------------------------------------------


def _raw(gallery_url: str, statement: str) -> list[Any]:
    with closing(sqlite3.connect(gallery_url.removeprefix("sqlite:///"))) as conn, conn:
        return conn.execute(statement).fetchall()


def test_a_write_and_its_audit_records_commit_or_roll_back_together(
    replica: Replica, audit: AuditLog, gallery_url: str, face_photos: Path
) -> None:
    galleries = replica.gallery_stub()
    galleries.Enroll(gallery_pb2.EnrollRequest(subject_id="t-biden", images=[photo(face_photos, "biden.jpg")]))
    start, version = audit.head()[0], replica.gallery.store.version()

    # The outbox refuses the records (a failure after the write's own statements ran): the write rolls back.
    _raw(gallery_url, "CREATE TRIGGER refuse BEFORE INSERT ON audit_outbox BEGIN SELECT RAISE(ABORT, 'forced'); END")
    obama = photo(face_photos, "obama.jpg")
    error = refused(lambda: galleries.Enroll(gallery_pb2.EnrollRequest(subject_id="t-obama", images=[obama])))
    assert error.code() == grpc.StatusCode.UNKNOWN
    error = refused(
        lambda: galleries.EraseSubject(gallery_pb2.EraseSubjectRequest(subject_id="t-biden", reference=REFERENCE))
    )
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert replica.gallery.store.get_subject("t-obama") is None
    assert _raw(gallery_url, "SELECT COUNT(*) FROM templates WHERE subject_id = 't-obama'") == [(0,)]
    kept = replica.gallery.store.get_subject("t-biden")
    assert kept is not None and kept.template_count == 1  # not erased: its record could not be kept
    assert replica.gallery.store.version() == version
    _raw(gallery_url, "DROP TRIGGER refuse")

    # The write fails half way (its second statement): no subject without templates, and no record of it.
    _raw(gallery_url, "CREATE TRIGGER refuse BEFORE INSERT ON templates BEGIN SELECT RAISE(ABORT, 'forced'); END")
    error = refused(lambda: galleries.Enroll(gallery_pb2.EnrollRequest(subject_id="t-obama", images=[obama])))
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert replica.gallery.store.get_subject("t-obama") is None
    _raw(gallery_url, "DROP TRIGGER refuse")

    assert outbox(replica) == [] and trail(audit, start) == [] and replica.gallery.store.version() == version
    galleries.Enroll(gallery_pb2.EnrollRequest(subject_id="t-obama", images=[obama]))  # and now it goes through
    assert trail(audit, start) == [("ENROL", "t-obama", "ok")] and audit.verify().intact


# -- several relays on one outbox (replicas sharing a gallery) ----------------------------------------------------


def test_two_relays_draining_one_outbox_append_each_record_once_in_commit_order(store_url: str, tmp_path: Path) -> None:
    """Two replicas' relays (each with its own connections) on one gallery, SQLite and PostgreSQL as replicas share it
    in production, drain the rows a writer commits while they run: the chain holds each once, in commit order."""
    cipher = TemplateCipher.from_base64(generate_key(), "k1")
    audit_url = f"sqlite:///{tmp_path / 'audit.db'}"
    writer, first, second = (GalleryStore.open(store_url, cipher) for _ in range(3))
    logs = [AuditLog.open_configured(settings=AuditSettings(database_url=audit_url)) for _ in range(2)]
    relays = [AuditOutboxRelay(store, log, POLICY).start() for store, log in zip((first, second), logs, strict=True)]
    count = 120
    try:
        for n in range(count):
            writer.record_audit([AuditEntry("service:test", Action.DELETE, f"s-{n}", "test", "ok", {"n": n})])
            relays[n % 2].wait(0)  # a nudge, as a write on that replica gives it
        assert wait_until(lambda: writer.audit_outbox().depth == 0, timeout=20)
        assert [int(r.details["n"]) for r in logs[0].records(limit=10_000)] == list(range(count))
        assert logs[0].verify().intact
    finally:
        for relay in relays:
            relay.close()
        for closable in (writer, first, second, *logs):
            closable.close()
