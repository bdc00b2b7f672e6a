"""The audit log on real databases: appends chain and carry MACs, verify finds an edit by its sequence, triggers
refuse changes, and a real forger (database access, no key) who recomputes every hash is caught.

Every test runs on a SQLite file and, marked ``postgres``, on PostgreSQL (a schema of its own in the session's
throwaway database; skipped, saying so, when no server is reachable). Checkpoints are checked here against an
in-process sink; tests/integration/test_audit_checkpoints.py runs them through the real broker and the CLI.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sightline.common.audit import (
    GENESIS_HASH,
    Action,
    AuditError,
    AuditLog,
    AuditRecord,
    AuditSettings,
    chain_hash,
)
from sightline.common.audit_checkpoints import AuditCheckpointSettings, Checkpoint, check_against
from sightline.common.audit_keys import AuditKeyError, AuditKeyring, AuditKeySettings, new_entry
from sightline.v1 import audit_pb2

# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def opened() -> Iterator[list[AuditLog]]:
    logs: list[AuditLog] = []
    yield logs
    for log in logs:
        log.close()


@pytest.fixture()
def key_entry() -> str:
    """The services' audit key, 'k1:BASE64': a secret the database never holds (and the forger below never has)."""
    return new_entry("k1")


@pytest.fixture()
def keyring(key_entry: str) -> AuditKeyring:
    return AuditKeyring.parse(key_entry)


@pytest.fixture()
def open_log(opened: list[AuditLog], keyring: AuditKeyring) -> Callable[..., AuditLog]:
    def opener(url: str, **options: Any) -> AuditLog:
        log = AuditLog.open(url, keyring=options.pop("keyring", keyring), **options)
        opened.append(log)
        return log

    return opener


@pytest.fixture()
def audit(store_url: str, open_log: Callable[..., AuditLog]) -> AuditLog:
    return open_log(store_url)


def raw(store_url: str, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run SQL straight on the database, as someone with a database client would (``?`` placeholders)."""
    if store_url.startswith("sqlite:///"):
        conn = sqlite3.connect(store_url[len("sqlite:///") :], isolation_level=None)
        try:
            return conn.execute(statement, params).fetchall()
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(store_url, autocommit=True) as conn:
        cur = conn.execute(statement.replace("?", "%s"), params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def drop_append_only_triggers(store_url: str) -> None:
    if store_url.startswith("sqlite:///"):
        for name in (
            "audit_records_no_update",
            "audit_records_no_delete",
            "audit_chain_head_forward",
            "audit_chain_head_no_delete",
        ):
            raw(store_url, f"DROP TRIGGER {name}")
    else:
        raw(store_url, "DROP TRIGGER audit_records_append_only ON audit_records")
        raw(store_url, "DROP TRIGGER audit_chain_head_forward ON audit_chain_head")


_ROW = "sequence, at, principal, action, subject_id, purpose, result, details, prev_hash, hash, key_id, mac"


class Forger:
    """Someone who can write the audit database (a DBA, a stolen backup restored) but does not hold the audit key.

    They drop the triggers, rewrite rows as they please and recompute every SHA-256 hash exactly as the documented
    scheme says (docs/review-and-audit.md), with their own code, then move the chain head to match."""

    def __init__(self, store_url: str) -> None:
        self.url = store_url

    def rows(self) -> list[dict[str, Any]]:
        names = [n.strip() for n in _ROW.split(",")]
        return [
            dict(zip(names, row, strict=True))
            for row in raw(self.url, f"SELECT {_ROW} FROM audit_records ORDER BY sequence")
        ]

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Store ``rows`` as the whole chain: renumbered 1.., every hash recomputed, the head at the last one."""
        drop_append_only_triggers(self.url)
        prev = GENESIS_HASH
        raw(self.url, "DELETE FROM audit_records")
        for number, row in enumerate(rows, start=1):
            row = {**row, "sequence": number, "prev_hash": prev}
            row["hash"] = prev = self.sha256(row)
            raw(
                self.url,
                f"INSERT INTO audit_records ({_ROW}) VALUES ({', '.join('?' * 12)})",
                tuple(row[name.strip()] for name in _ROW.split(",")),
            )
        raw(self.url, "UPDATE audit_chain_head SET sequence = ?, hash = ? WHERE id = 1", (len(rows), prev))

    @staticmethod
    def sha256(row: dict[str, Any]) -> str:
        document = {
            key: row[key] for key in ("sequence", "at", "principal", "action", "subject_id", "purpose", "result")
        }
        document["details"] = json.loads(row["details"])
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(row["prev_hash"].encode("ascii") + b"\n" + canonical).hexdigest()

    def truncate(self, keep: int) -> None:
        """Cut the newest records off and move the head back: nothing to recompute, every MAC left is genuine."""
        drop_append_only_triggers(self.url)
        (digest,) = raw(self.url, "SELECT hash FROM audit_records WHERE sequence = ?", (keep,))[0]
        raw(self.url, "DELETE FROM audit_records WHERE sequence > ?", (keep,))
        raw(self.url, "UPDATE audit_chain_head SET sequence = ?, hash = ? WHERE id = 1", (keep, digest))


def hash_chain_is_perfect(audit: AuditLog) -> bool:
    """What the SHA-256 chain alone can tell (all the old `audit verify` could): every hash and link is right."""
    records, prev = audit.records(limit=10_000), GENESIS_HASH
    for number, record in enumerate(records, start=1):
        if (record.sequence, record.prev_hash) != (number, prev) or chain_hash(prev, record.canonical()) != record.hash:
            return False
        prev = record.hash
    return audit.head() == (len(records), prev)


class ListSink:
    """A checkpoint sink that keeps what it is given (the integration test uses the audit topic itself)."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self.checkpoints: list[tuple[Checkpoint, bool]] = []

    def __call__(self, record: AuditRecord) -> None:
        self.records.append(record)

    def checkpoint(self, checkpoint: Checkpoint, wait: bool) -> None:
        self.checkpoints.append((checkpoint, wait))


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def fill(audit: AuditLog, count: int) -> list[AuditRecord]:
    return [
        audit.append(
            f"officer-{i % 2}",
            Action.SEARCH,
            f"subject-{i}",
            "cctv-watchlist",
            "ok",
            {"candidates": i, "watchlist": "wl"},
        )
        for i in range(count)
    ]


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


def test_an_append_under_a_key_already_appended_appends_nothing(
    store_url: str, audit: AuditLog, open_log: Callable[..., AuditLog]
) -> None:
    """A writer that crashed after appending (an outbox relay, say) appends again under the same key: the record it
    appended the first time comes back, nothing is added or published, and other keys and keyless appends go on."""
    sink = ListSink()
    writer = open_log(store_url, publish=sink)
    first = writer.append("officer", Action.ENROL, "s1", "enrolment", "ok", {"templates": 1}, idempotency_key="k-1")
    fill(writer, 1)  # another writer's record in between
    again = writer.append("officer", Action.ENROL, "s1", "enrolment", "ok", {"templates": 1}, idempotency_key="k-1")
    assert again == first and writer.head()[0] == 2 and len(sink.records) == 2
    # Two connections at once (two relays on the same rows): the key is looked up under the chain head's lock.
    threads = [
        threading.Thread(target=log.append, args=("officer", Action.DELETE, "s1"), kwargs={"idempotency_key": "k-2"})
        for log in (audit, writer, audit, writer)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.action for r in writer.records()] == ["ENROL", "SEARCH", "DELETE"]
    assert writer.verify().intact
    with pytest.raises(ValueError, match="idempotency key"):
        writer.append("officer", Action.ENROL, idempotency_key="")


def test_an_edited_record_is_found_by_its_sequence(store_url: str, audit: AuditLog) -> None:
    fill(audit, 5)
    drop_append_only_triggers(store_url)
    raw(store_url, "UPDATE audit_records SET result = 'refused' WHERE sequence = 3")
    report = audit.verify()
    assert not report.intact and report.first_broken_sequence == 3 and report.records_checked == 2
    assert "record 3" in report.reason and "changed" in report.reason


def test_a_forger_who_recomputes_every_hash_is_caught_by_the_macs(
    store_url: str, audit: AuditLog, key_entry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reviewer's name changed and an ERASE record deleted, the rest renumbered, every hash recomputed: the
    SHA-256 chain is perfect again (the old verify said intact), but without the key the MACs cannot follow."""
    from sightline.cli.main import main

    fill(audit, 2)
    audit.append("reviewer-a", Action.REVIEW, "alert-1", "human-review", "CONFIRMED", {"alert_id": "alert-1"})
    audit.append("service:matching", Action.ERASE, "subject-7", "erasure-request", "ok", {"reference": "case-9"})
    fill(audit, 2)
    forger = Forger(store_url)
    rows = [row for row in forger.rows() if row["action"] != "ERASE"]
    rows[2]["principal"] = "reviewer-b"
    forger.rewrite(rows)
    assert hash_chain_is_perfect(audit) and audit.head()[0] == 5  # the forgery is complete as far as hashes go
    report = audit.verify()
    assert not report.intact and report.first_broken_sequence == 3 and report.records_checked == 2
    assert "MAC" in report.reason and "without the audit key" in report.reason
    (tmp_path / "ring").write_text(key_entry + "\n")  # the auditor's copy of the keyring
    assert main(["audit", "verify", "--database-url", store_url, "--keys-file", str(tmp_path / "ring")]) == 1
    assert "BROKEN at record 3" in capsys.readouterr().out


def test_a_forger_who_deletes_a_record_and_recomputes_is_caught_at_the_first_moved_one(
    store_url: str, audit: AuditLog
) -> None:
    fill(audit, 3)
    audit.append("service:matching", Action.ERASE, "subject-7", "erasure-request", "ok")
    fill(audit, 3)
    forger = Forger(store_url)
    forger.rewrite([row for row in forger.rows() if row["action"] != "ERASE"])
    assert hash_chain_is_perfect(audit)
    report = audit.verify()
    assert report.first_broken_sequence == 4 and "MAC" in report.reason  # record 5, renumbered 4, moved


def test_stripping_the_macs_is_caught(store_url: str, audit: AuditLog) -> None:
    """Blanking key id and MAC would make records look older than authentication: only --legacy-until allows that."""
    fill(audit, 3)
    forger = Forger(store_url)
    rows = forger.rows()
    for row in rows:
        row.update(key_id="", mac="", result="refused")
    forger.rewrite(rows)
    report = audit.verify()
    assert report.first_broken_sequence == 1 and "carries no MAC" in report.reason


def test_a_forged_mac_with_another_key_is_caught(store_url: str, audit: AuditLog) -> None:
    """A forger who makes up their own key (even under the real key id) signs nothing the keyring accepts."""
    fill(audit, 2)
    forger, theirs = Forger(store_url), AuditKeyring.parse(new_entry("k1"))
    rows = forger.rows()
    rows[1]["principal"] = "someone-else"
    forger.rewrite(rows)
    from sightline.common.audit import canonical_bytes, mac_bytes, parse_time

    row = forger.rows()[1]
    canonical = canonical_bytes(
        2,
        parse_time(row["at"]),
        row["principal"],
        row["action"],
        row["subject_id"],
        row["purpose"],
        row["result"],
        json.loads(row["details"]),
    )
    raw(
        store_url,
        "UPDATE audit_records SET mac = ? WHERE sequence = 2",
        (theirs.mac("k1", mac_bytes("k1", row["prev_hash"], canonical)),),
    )
    report = audit.verify()
    assert report.first_broken_sequence == 2 and "MAC" in report.reason


def test_an_edit_with_one_recomputed_hash_fails_its_mac_and_undoing_it_restores_the_chain(
    store_url: str, audit: AuditLog
) -> None:
    records = fill(audit, 4)
    forger = Forger(store_url)
    rows = forger.rows()
    rows[1]["principal"] = "someone-else"
    drop_append_only_triggers(store_url)
    raw(
        store_url,
        "UPDATE audit_records SET principal = ?, hash = ? WHERE sequence = 2",
        ("someone-else", forger.sha256(rows[1])),
    )
    report = audit.verify()  # its hash is right again; its MAC is not (and record 3 still links to the old hash)
    assert report.first_broken_sequence == 2 and "MAC" in report.reason
    raw(store_url, "UPDATE audit_records SET principal = 'officer-1', hash = ? WHERE sequence = 2", (records[1].hash,))
    assert audit.verify().intact
    raw(store_url, 'UPDATE audit_records SET details = \'{"candidates":"9","watchlist":"wl"}\' WHERE sequence = 4')
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
    for statement in (
        "UPDATE audit_records SET result = 'x' WHERE sequence = 1",
        "DELETE FROM audit_records WHERE sequence = 2",
        "UPDATE audit_chain_head SET sequence = 1 WHERE id = 1",
        "DELETE FROM audit_chain_head",
    ):
        with pytest.raises(Exception, match="append-only|only moves one record forward"):
            raw(store_url, statement)
    if not store_url.startswith("sqlite"):
        with pytest.raises(Exception, match="append-only"):
            raw(store_url, "TRUNCATE audit_records")
    assert audit.verify().intact and len(audit.records()) == 2


def test_concurrent_writers_share_one_chain(store_url: str, open_log: Callable[..., AuditLog]) -> None:
    """Threads of one process, and two logs on one database (as two replicas would be), append without a gap."""
    logs = [open_log(store_url), open_log(store_url)]
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


def test_verifying_a_live_log_while_another_replica_appends_is_intact(
    store_url: str, open_log: Callable[..., AuditLog]
) -> None:
    writer, reader = open_log(store_url), open_log(store_url)
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
    raw(
        store_url,
        "INSERT INTO audit_records (sequence, at, principal, action, subject_id, purpose, result, details,"
        f" prev_hash, hash) VALUES (4, '2026-01-01T00:00:00.000000Z', 'x', 'ERASE', '', '', 'ok', '{{}}',"
        f" '{records[-1].hash}', '{'b' * 64}')",
    )
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


def test_each_record_is_published_and_a_failing_publisher_loses_nothing(
    store_url: str, open_log: Callable[..., AuditLog]
) -> None:
    seen: list[AuditRecord] = []
    log = open_log(store_url, publish=seen.append)
    record = log.append("p", Action.ERASE, "s1", "erasure-request", "ok", {"templates": 3})
    assert seen == [record]
    message = record.to_proto()
    assert message.action == audit_pb2.AUDIT_ACTION_ERASE and message.sequence == 1
    assert message.hash == record.hash and dict(message.details) == {"templates": "3"}
    assert message.at.ToDatetime().replace(tzinfo=record.at.tzinfo) == record.at

    def broken(_: AuditRecord) -> None:
        raise ConnectionError("broker down")

    failing = open_log(store_url, publish=broken)
    failing.append("p", Action.DELETE, "s1")
    assert log.verify().intact and log.head()[0] == 2


def test_opening_without_create_needs_an_existing_log(tmp_path: Path, keyring: AuditKeyring) -> None:
    with pytest.raises(AuditError, match="no audit log"):
        AuditLog.open(f"sqlite:///{tmp_path / 'nothing.db'}", create=False, keyring=keyring)
    with pytest.raises(AuditError, match="unsupported audit URL"):
        AuditLog.open("mysql://host/db", keyring=keyring)


def test_every_action_has_its_number_on_the_audit_topic() -> None:
    from sightline.common.audit import Action
    from sightline.v1 import audit_pb2

    names = {name.removeprefix("AUDIT_ACTION_") for name in audit_pb2.AuditAction.keys()} - {"UNSPECIFIED"}
    assert names == {action.value for action in Action}


# -- keys: rotation, unknown ids, where they come from ------------------------------------------------------------


def test_rotation_signs_new_records_with_the_new_key_and_old_ones_verify_with_theirs(
    store_url: str, open_log: Callable[..., AuditLog]
) -> None:
    k1, k2 = new_entry("k1"), new_entry("k2")
    before = open_log(store_url, keyring=AuditKeyring.parse(k1))
    fill(before, 3)
    after = open_log(store_url, keyring=AuditKeyring.parse(f"{k1}\n{k2}"))  # k2 added last: the active one
    fill(after, 2)
    assert [r.key_id for r in after.records()] == ["k1", "k1", "k1", "k2", "k2"]
    assert after.verify().intact
    explicit = AuditKeyring.parse(f"{k2},{k1}", active_key_id="k2")
    assert open_log(store_url, keyring=explicit).verify().intact


def test_a_record_under_an_unknown_key_id_fails_naming_the_id(
    store_url: str, open_log: Callable[..., AuditLog]
) -> None:
    k1, k2 = new_entry("k1"), new_entry("k2")
    fill(open_log(store_url, keyring=AuditKeyring.parse(f"{k1}\n{k2}")), 2)
    fill(open_log(store_url, keyring=AuditKeyring.parse(f"{k1}\n{k2}", active_key_id="k1")), 1)
    report = open_log(store_url, keyring=AuditKeyring.parse(k1)).verify()  # k2 was dropped from the keyring too soon
    assert not report.intact and report.first_broken_sequence == 1
    assert "'k2' is not in the keyring" in report.reason and "k1" in report.reason


@pytest.fixture()
def no_key_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No audit keyring configured in the environment (as on a laptop, or a production pod missing its secret)."""
    for name in (
        "SIGHTLINE_AUDIT_KEYS",
        "SIGHTLINE_AUDIT_KEYS_FILE",
        "SIGHTLINE_AUDIT_KEY_ID",
        "SIGHTLINE_AUDIT_REQUIRE_KEYS",
        "SIGHTLINE_SECRETS_DIR",
        "SIGHTLINE_CONFIG_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_keyring_comes_from_a_secret_never_the_database(
    tmp_path: Path, no_key_settings: pytest.MonkeyPatch
) -> None:
    old, new = new_entry("old"), new_entry("new")
    (tmp_path / "keys").write_text(f"{old}\n# rotated 2026-01\n{new}\n")
    no_key_settings.setenv("SIGHTLINE_AUDIT_KEYS_FILE", str(tmp_path / "keys"))
    assert AuditKeyring.configured("postgresql://db/audit").active_key_id == "new"
    no_key_settings.setenv("SIGHTLINE_AUDIT_KEY_ID", "old")
    assert AuditKeyring.configured("postgresql://db/audit").active_key_id == "old"
    no_key_settings.setenv("SIGHTLINE_AUDIT_KEYS", f"{old},{new}")  # as the Helm chart passes it, from a Secret
    with pytest.raises(AuditKeyError, match="not both"):
        AuditKeyring.configured("postgresql://db/audit")
    no_key_settings.delenv("SIGHTLINE_AUDIT_KEYS_FILE")
    assert AuditKeyring.configured("postgresql://db/audit", AuditKeySettings()).key_ids == ("old", "new")
    no_key_settings.setenv("SIGHTLINE_AUDIT_KEY_ID", "gone")
    with pytest.raises(AuditKeyError, match="'gone' is not in the keyring"):
        AuditKeyring.configured("postgresql://db/audit")


def test_production_refuses_to_open_the_audit_log_without_a_keyring(
    tmp_path: Path, no_key_settings: pytest.MonkeyPatch
) -> None:
    """A shared (PostgreSQL) log never gets a made-up key: a replica with its own key would sign records no auditor
    can check. The refusal comes before any connection (there is no server at this address)."""
    settings = AuditSettings(database_url="postgresql://sightline@127.0.0.1:9/audit")
    with pytest.raises(AuditKeyError, match="no audit keyring configured for a shared .*SIGHTLINE_AUDIT_KEYS"):
        AuditLog.open_configured(settings=settings)  # what matching and decision call at start
    no_key_settings.setenv("SIGHTLINE_AUDIT_REQUIRE_KEYS", "true")  # the Helm chart sets it: SQLite too
    with pytest.raises(AuditKeyError, match="SIGHTLINE_AUDIT_REQUIRE_KEYS is set"):
        AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}")
    assert not (tmp_path / "audit.db").exists() and not (tmp_path / "audit.keys").exists()


def test_a_local_sqlite_log_makes_its_keyring_in_its_folder_once_and_says_so(
    tmp_path: Path, no_key_settings: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'audit.db'}"
    keys = tmp_path / "state" / "audit.keys"
    with pytest.raises(AuditKeyError, match="cannot read the audit keyring"):
        AuditKeyring.configured(url, create=False)  # an auditor never gets a fresh key where they expected the real one
    with caplog.at_level("WARNING", logger="sightline.common.audit_keys"):
        (tmp_path / "state").mkdir()
        with AuditLog.open(url) as writer:  # a service of the local stack: made once, 0600, then reused
            record = writer.append("p", Action.ENROL, "s1")
    assert keys.stat().st_mode & 0o777 == 0o600
    assert any(
        "created a local audit keyring" in r.getMessage() and "local runs only" in r.getMessage()
        for r in caplog.records
    )
    entry = keys.read_text().splitlines()[-1]
    assert entry.split(":", 1)[1] not in caplog.text  # the path is logged, never the key
    assert record.key_id == AuditKeyring.from_file(keys).active_key_id
    with AuditLog.open(url, create=False) as reader:  # the auditor of the local stack finds the same keyring
        assert reader.verify().intact
        again = AuditLog.open(url)
        again.append("p", Action.DELETE, "s1")
        again.close()
        assert reader.verify().intact and {r.key_id for r in reader.records()} == {record.key_id}


def test_new_key_prints_an_entry_for_a_rotation(capsys: pytest.CaptureFixture[str]) -> None:
    from sightline.cli.main import main

    assert main(["audit", "new-key", "--key-id", "2026-12"]) == 0
    entry = capsys.readouterr().out.strip()
    assert AuditKeyring.parse(f"{new_entry('k1')}\n{entry}").active_key_id == "2026-12"  # appended: the active one
    assert main(["audit", "new-key"]) == 0 and capsys.readouterr().out.startswith("a-")
    assert main(["audit", "new-key", "--key-id", "no spaces"]) == 2
    assert "must be 1-64 letters" in capsys.readouterr().err


def test_keyring_errors_never_show_key_material() -> None:
    entry = new_entry("k1")
    secret = entry.split(":", 1)[1]
    for text in (secret, f"k1:{secret[:-4]}", f"{entry},{entry}", "k1:not*base64"):
        with pytest.raises(AuditKeyError) as caught:
            AuditKeyring.parse(text)
        assert secret not in str(caught.value) and secret[:-4] not in str(caught.value)
    assert secret not in repr(AuditKeyring.parse(entry))


# -- checkpoints: truncation, the schedule -------------------------------------------------------------------------


def test_truncating_the_tail_is_invisible_to_the_chain_but_not_to_the_checkpoints(
    store_url: str, open_log: Callable[..., AuditLog], keyring: AuditKeyring
) -> None:
    sink = ListSink()
    writer = open_log(store_url, publish=sink, checkpoints=AuditCheckpointSettings(checkpoint_every=4))
    fill(writer, 10)
    writer.close()  # the last checkpoint: record 10
    checkpoints = [c for c, _ in sink.checkpoints]
    assert [c.sequence for c in checkpoints] == [4, 8, 10]
    auditor = open_log(store_url, create=False)
    assert check_against(auditor, keyring, checkpoints).intact
    Forger(store_url).truncate(keep=7)
    assert auditor.verify().intact  # every record left is genuine, MAC and all: only the checkpoints know
    report = check_against(auditor, keyring, checkpoints)
    assert not report.intact and report.first_broken_sequence == 8 and "removed from the end" in report.reason


def test_a_rewritten_chain_or_a_forged_checkpoint_does_not_match(
    store_url: str, open_log: Callable[..., AuditLog], keyring: AuditKeyring
) -> None:
    sink = ListSink()
    writer = open_log(store_url, publish=sink, checkpoints=AuditCheckpointSettings(checkpoint_every=3))
    fill(writer, 7)
    wait_for(lambda: len(sink.checkpoints) == 2)  # records 3 and 6, sent from the checkpointer's thread
    checkpoints = [c for c, _ in sink.checkpoints]
    auditor = open_log(store_url, create=False)
    report = check_against(auditor, keyring, checkpoints)  # record 7 is not checkpointed yet: said, not hidden
    assert report.intact and "records 7..7 are newer than the latest checkpoint" in report.reason
    forged = Checkpoint(checkpoints[-1].chain, 5, checkpoints[-1].head_hash, checkpoints[-1].at, "k1", "0" * 64)
    report = check_against(auditor, keyring, [*checkpoints, forged])
    assert not report.intact and "forged" in report.reason
    forger = Forger(store_url)
    rows = forger.rows()
    rows[4]["result"] = "refused"
    forger.rewrite(rows)
    report = check_against(auditor, keyring, checkpoints)
    assert not report.intact and report.first_broken_sequence == 6 and "rewritten" in report.reason
    other_chain = [Checkpoint("f" * 64, c.sequence, c.head_hash, c.at, c.key_id, c.mac) for c in checkpoints]
    assert "no checkpoint of this chain" in check_against(auditor, keyring, other_chain).reason


def test_checkpoints_follow_the_count_the_clock_and_close(
    store_url: str, open_log: Callable[..., AuditLog], keyring: AuditKeyring
) -> None:
    sink = ListSink()
    writer = open_log(
        store_url, publish=sink, checkpoints=AuditCheckpointSettings(checkpoint_every=1000, checkpoint_interval_s=0.2)
    )
    fill(writer, 2)
    deadline = time.monotonic() + 5
    while not sink.checkpoints and time.monotonic() < deadline:
        time.sleep(0.05)
    ((checkpoint, waited),) = sink.checkpoints  # the timer's, waiting for the broker (on its own thread)
    assert (checkpoint.sequence, checkpoint.head_hash, waited) == (2, writer.head()[1], True)
    assert checkpoint.chain == writer.records()[0].hash and checkpoint.key_id == "k1"
    assert keyring.matches(checkpoint.key_id, checkpoint.signed_bytes(), checkpoint.mac)
    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint
    writer.close()
    assert len(sink.checkpoints) == 1  # nothing new since: close publishes nothing
    assert len(sink.records) == 2


# -- upgrading a chain written before record authentication --------------------------------------------------------


def write_old_chain(store_url: str, count: int) -> None:
    """An audit log as the previous release left it: schema version 1 (no key id, no MAC), records it wrote."""
    from sightline.common.audit import MIGRATIONS
    from sightline.common.sqlstore import migrate, open_backend

    backend = open_backend(store_url)
    try:
        with backend.transaction(True) as cur:
            migrate(cur, backend.dialect, MIGRATIONS[:1], table="audit_schema_version", lock_key=1, what="audit")
    finally:
        backend.close()
    prev = GENESIS_HASH
    for sequence in range(1, count + 1):
        row = {
            "sequence": sequence,
            "at": "2026-01-01T00:00:00.000000Z",
            "principal": "officer",
            "action": "SEARCH",
            "subject_id": "",
            "purpose": "cctv-watchlist",
            "result": "ok",
            "details": "{}",
            "prev_hash": prev,
        }
        row["hash"] = prev = Forger.sha256(row)
        raw(
            store_url,
            f"INSERT INTO audit_records ({_ROW[: -len(', key_id, mac')]}) VALUES ({', '.join('?' * 10)})",
            tuple(row.values()),
        )
        raw(store_url, "UPDATE audit_chain_head SET sequence = ?, hash = ? WHERE id = 1", (sequence, prev))


def test_an_old_log_is_never_called_intact_in_silence(store_url: str, open_log: Callable[..., AuditLog]) -> None:
    """A log the previous release wrote, read as it is (an auditor never upgrades it): its records carry no MAC, so
    verify fails saying how many; with --legacy-until it passes, counting them, and says nothing vouches for them."""
    write_old_chain(store_url, 3)
    reader = open_log(store_url, create=False)
    assert reader.legacy_records() == (3, 3) and [r.mac for r in reader.records()] == ["", "", ""]
    report = reader.verify()
    assert not report.intact and report.first_broken_sequence == 1
    assert "older than record authentication: none of its 3 record(s) carries a MAC" in report.reason
    report = reader.verify(legacy_until=3)
    assert report.intact and (report.legacy_records, report.legacy_vouched) == (3, False)
    assert "3 legacy record(s) without MAC" in report.reason and "NOT vouched for by any MAC" in report.reason
    assert raw(store_url, "SELECT version FROM audit_schema_version") == [(1,)]  # not upgraded by reading


def test_verify_on_the_command_line_names_the_legacy_records(
    tmp_path: Path, keyring: AuditKeyring, capsys: pytest.CaptureFixture[str]
) -> None:
    from sightline.cli.main import main

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    write_old_chain(url, 4)
    keys = tmp_path / "ring"
    keys.write_text(new_entry("k1") + "\n")
    command = ["audit", "verify", "--database-url", url, "--keys-file", str(keys)]
    assert main(command) == 1
    out = capsys.readouterr().out
    assert "BROKEN at record 1" in out and "none of its 4 record(s) carries a MAC" in out
    assert main([*command, "--legacy-until", "4"]) == 0
    out = capsys.readouterr().out
    assert "intact: 4 record(s)" in out and "WARNING: 4 legacy record(s) without MAC" in out
    assert "NOT covered by any MAC" in out


def test_an_old_chain_is_migrated_and_its_records_are_vouched_for_by_the_first_signed_one(
    store_url: str, open_log: Callable[..., AuditLog]
) -> None:
    write_old_chain(store_url, 3)
    upgraded = open_log(store_url)  # a writer migrates: ADD COLUMN key_id, mac
    report = upgraded.verify()
    assert not report.intact and report.first_broken_sequence == 1 and not suggested_boundaries(report.reason)
    assert upgraded.verify(legacy_until=3).intact
    fill(upgraded, 2)
    assert [r.key_id for r in upgraded.records()] == ["", "", "", "k1", "k1"]
    assert upgraded.records()[3].details["legacy_until"] == "3"  # the first MAC'd record records the boundary
    assert "legacy_until" not in upgraded.records()[4].details
    report = upgraded.verify()  # now the hint names the recorded boundary, and no higher one
    assert not report.intact and "--legacy-until 3 " in report.reason
    report = upgraded.verify(legacy_until=4)
    assert not report.intact and report.first_broken_sequence == 4 and "higher than the boundary" in report.reason
    report = upgraded.verify(legacy_until=3)
    assert report.intact and (report.legacy_records, report.legacy_vouched) == (3, True)
    assert "vouched for by the MAC of the record after them" in report.reason
    forger = Forger(store_url)
    rows = forger.rows()
    rows[1]["principal"] = "someone-else"  # a legacy record: no MAC of its own, but record 4's covers its hash
    forger.rewrite(rows)
    report = upgraded.verify(legacy_until=3)
    assert not report.intact and report.first_broken_sequence == 4 and "MAC" in report.reason


def test_a_mac_stripped_inside_the_legacy_range_after_a_signed_record_is_caught(
    store_url: str, audit: AuditLog
) -> None:
    """Legacy records only ever come first: a generous --legacy-until does not let a forger strip later MACs."""
    fill(audit, 4)
    forger = Forger(store_url)
    rows = forger.rows()
    rows[2].update(key_id="", mac="", principal="someone-else")
    rows[3].update(key_id="", mac="")
    forger.rewrite(rows)
    report = audit.verify(legacy_until=100)
    assert not report.intact and report.first_broken_sequence == 3 and "records before it do" in report.reason


def suggested_boundaries(*messages: str) -> set[int]:
    """Every legacy_until a message suggests (--legacy-until N, SIGHTLINE_AUDIT_LEGACY_UNTIL=N)."""
    import re

    return {int(n) for m in messages for n in re.findall(r"(?:--legacy-until |LEGACY_UNTIL=)(\d+)", m)}


def test_a_chain_stripped_of_every_mac_and_rewritten_is_refused_and_never_suggested_a_way_through(
    store_url: str, open_log: Callable[..., AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    """A forger (database, no key) strips every MAC of an upgraded chain and rewrites it, boundary detail and all:
    the writers refuse to append, verify fails, and no message suggests a legacy_until above the recorded one."""
    write_old_chain(store_url, 3)
    fill(open_log(store_url), 3)  # the genuine upgrade: records 4..6 MAC'd, record 4 records legacy_until=3
    opened = open_log(store_url, create=False)
    assert opened.recorded_legacy_boundary() == (3, 4)
    forger = Forger(store_url)
    rows = forger.rows()
    for row in rows:
        row.update(key_id="", mac="", details="{}", result="refused")
    forger.rewrite(rows)
    for legacy_until in (0, 3):
        with pytest.raises(AuditError, match="refusing to append") as caught:
            AuditLog.open(store_url, keyring=AuditKeyring.parse(new_entry("k1")), legacy_until=legacy_until)
        assert "never a higher one" in str(caught.value)
        assert all(n <= 3 for n in suggested_boundaries(str(caught.value)))
    reader = open_log(store_url, create=False, legacy_until=3)
    report = reader.verify()
    assert not report.intact and report.first_broken_sequence == 4 and "carries no MAC" in report.reason
    suggested = suggested_boundaries(report.reason, reader.verify(legacy_until=0).reason, caplog.text)
    assert all(n <= 3 for n in suggested)
    for n in suggested | {3}:
        assert not reader.verify(legacy_until=n).intact
    assert not (caplog.text and "LEGACY_UNTIL=6" in caplog.text)


def test_a_chain_that_never_was_legacy_stripped_of_its_macs_is_refused(
    store_url: str, open_log: Callable[..., AuditLog]
) -> None:
    fill(open_log(store_url), 4)
    forger = Forger(store_url)
    rows = forger.rows()
    for row in rows:
        row.update(key_id="", mac="")
    forger.rewrite(rows)
    with pytest.raises(AuditError, match=r"newest record \(4\) carries no MAC") as caught:
        open_log(store_url)
    assert not suggested_boundaries(str(caught.value))
    report = open_log(store_url, create=False).verify()
    assert not report.intact and report.first_broken_sequence == 1 and not suggested_boundaries(report.reason)


def test_an_upgraded_chain_not_yet_appended_to_opens_only_within_the_configured_legacy_until(
    store_url: str, open_log: Callable[..., AuditLog]
) -> None:
    """The upgrading writer stopped before appending: a later writer is no longer upgrading, so only the operator's
    SIGHTLINE_AUDIT_LEGACY_UNTIL (the number the upgrade logged) lets it take over and record the boundary."""
    write_old_chain(store_url, 3)
    open_log(store_url).close()
    with pytest.raises(AuditError, match="refusing to append"):
        open_log(store_url)
    with pytest.raises(AuditError, match="refusing to append"):
        open_log(store_url, legacy_until=2)
    writer = open_log(store_url, legacy_until=3)
    fill(writer, 1)
    assert writer.records()[3].details["legacy_until"] == "3"
    assert writer.verify(legacy_until=3).intact
    open_log(store_url).append("p", Action.ENROL, "s1")  # the head is MAC'd now: every writer opens
    with pytest.raises(ValueError, match="reserved"):
        writer.append("p", Action.ENROL, "s1", details={"legacy_until": 99})


def test_a_keyring_entry_written_the_wrong_way_round_never_shows_the_key() -> None:
    """'BASE64:id' puts the key where the id goes: the error names the entry by its position, never quotes it."""
    secret = new_entry("k1").split(":", 1)[1]
    urlsafe = secret.replace("+", "-").replace("/", "_").rstrip("=")  # matches the id pattern once unpadded
    for text in (f"{secret}:k1", f"{secret.rstrip('=')}:k1", f"{urlsafe}:k1", f"{new_entry('k0')},{urlsafe}:k1"):
        with pytest.raises(AuditKeyError) as caught:
            AuditKeyring.parse(text)
        message = str(caught.value)
        assert secret.rstrip("=")[:12] not in message and urlsafe[:12] not in message and "entry" in message


class FlakySink(ListSink):
    """A broker that is down for the next ``failures`` checkpoint sends, then answers again."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures, self.attempts = failures, 0

    def checkpoint(self, checkpoint: Checkpoint, wait: bool) -> None:
        self.attempts += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("broker down")
        super().checkpoint(checkpoint, wait)


def test_a_checkpoint_that_fails_to_send_is_retried_until_the_broker_answers_and_on_close(
    store_url: str, open_log: Callable[..., AuditLog], keyring: AuditKeyring
) -> None:
    sink = FlakySink(failures=3)
    writer = open_log(
        store_url, publish=sink, checkpoints=AuditCheckpointSettings(checkpoint_every=2, checkpoint_interval_s=3600)
    )
    fill(writer, 4)  # checkpoints due at 2 and 4, while the broker is down
    wait_for(lambda: any(c.sequence == 4 for c, _ in sink.checkpoints))
    assert sink.attempts >= 4 and sink.failures == 0
    checkpoint, waited = sink.checkpoints[-1]
    assert (checkpoint.sequence, checkpoint.head_hash, waited) == (4, writer.head()[1], True)
    fill(writer, 1)  # record 5: not due yet
    sink.failures = 2
    writer.close()  # retries within its bound
    checkpoint, _ = sink.checkpoints[-1]
    assert checkpoint.sequence == 5
    auditor = open_log(store_url, create=False)
    assert checkpoint.head_hash == auditor.head()[1] and auditor.head()[0] == 5
    assert check_against(auditor, keyring, [c for c, _ in sink.checkpoints]).intact


def test_close_gives_up_on_a_broker_that_stays_down_within_its_bound_and_says_so(
    keyring: AuditKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    from sightline.common.audit_checkpoints import Checkpointer
    from sightline.common.transient import Backoff

    sink = FlakySink(failures=10**6)
    checkpointer = Checkpointer(
        keyring,
        sink,
        lambda: "c" * 64,
        AuditCheckpointSettings(checkpoint_every=1000),
        backoff=Backoff(0.01, 0.05),
        close_timeout_s=0.3,
    )
    checkpointer.appended(1, "a" * 64)
    started = time.monotonic()
    with caplog.at_level("ERROR", logger="sightline.common.audit_checkpoints"):
        checkpointer.close()
    assert time.monotonic() - started < 2 and sink.attempts >= 2 and not sink.checkpoints
    assert "gave up publishing the audit checkpoint of record 1" in caplog.text
