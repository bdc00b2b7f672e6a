"""Transient failures are retried, never dead-lettered as bad input.

A real stage worker (the probe stage of test_delivery.py) writes each input to a real SQLite database before
publishing it; while the test holds the database's exclusive lock, every write fails with "database is locked". Each
input must come out once the lock is released, none may reach the dead-letter topic, and every retry is logged with
its attempt count. The classification itself is checked on real errors from real SQLite, PostgreSQL's driver and
the Kafka clients.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_delivery import OUTPUT, Probe, ProxiedBroker, probe_factory, proxied, settings_for  # noqa: F401 - fixtures

from sightline.common.stage import StageError
from sightline.common.topics import DEADLETTER
from sightline.common.transient import Backoff, TransientError, is_transient, transient_cause


@pytest.fixture()
def database(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "probe.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE seen (value TEXT)")
    yield path


def locked_error(path: Path) -> sqlite3.OperationalError:
    """The error SQLite gives a writer while another connection holds the database's exclusive lock."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with sqlite3.connect(path, timeout=0) as writer:
            writer.execute("INSERT INTO seen VALUES ('x')")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    raise AssertionError("the write went through a held exclusive lock")


def test_a_locked_database_is_waited_out_and_no_input_is_dead_lettered(
    proxied: ProxiedBroker,
    probe_factory: Callable[..., Probe],
    database: Path,
    tmp_path: Path,
) -> None:
    probe = probe_factory(settings_for(proxied), "sqlite", PROBE_DATABASE=str(database))
    values = [f"row-{i:02d}" for i in range(8)]
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the database is "down" for every writer until the rollback below
    try:
        probe.send(*values)
        time.sleep(3)
        assert not set(values) & probe.wait_for(set(), 0), "an input went through while its write could not"
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    seen = probe.wait_for(set(values), 30)
    assert set(values) <= seen, f"inputs lost: {sorted(set(values) - seen)}"
    assert probe.published(DEADLETTER.name) == [], "a locked database is not the input's fault"
    with sqlite3.connect(database) as conn:
        rows = [row[0] for row in conn.execute("SELECT value FROM seen WHERE value != 'warm-up' ORDER BY rowid")]
    assert rows == values, "each input written once, in order"
    retries = [
        json.loads(line)
        for line in (tmp_path / "probe-0.log").read_text().splitlines()
        if '"transient failure; retrying"' in line
    ]
    assert retries and retries[0]["error_type"] == "OperationalError" and retries[0]["during"] == "processing"
    assert [r["attempt"] for r in retries][:3] == [1, 2, 3] and all("row-" not in json.dumps(r) for r in retries)


def test_real_transient_errors_are_recognised_through_their_chains(database: Path) -> None:
    locked = locked_error(database)
    assert is_transient(locked)
    try:
        try:
            raise locked
        except sqlite3.OperationalError as exc:
            raise RuntimeError("the store could not write") from exc
    except RuntimeError as wrapped:
        assert transient_cause(wrapped) is locked  # a store's own error, raised from the driver's
    with sqlite3.connect(database) as conn:
        with pytest.raises(sqlite3.OperationalError) as missing:
            conn.execute("SELECT * FROM no_such_table")
    assert not is_transient(missing.value), "a missing table will not come back by waiting"
    # A stage's verdict on the input stays one, even when raised while handling a transient error.
    try:
        try:
            raise locked
        except sqlite3.OperationalError:
            raise StageError("undecodable_image", "not an image") from None
    except StageError as verdict:
        assert not is_transient(verdict)
    assert is_transient(TransientError("peer unavailable"))


def test_kafka_and_postgres_client_errors_are_classified() -> None:
    psycopg = pytest.importorskip("psycopg")
    from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
    from faust.exceptions import ProducerSendError

    with socket.socket() as sock:  # a port nobody listens on: connection refused, a real OperationalError
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=2)
    assert is_transient(refused.value)
    for error, transient in ((KafkaTimeoutError(), True), (MessageSizeTooLargeError(), False)):
        try:
            raise ProducerSendError(f"Error while sending: {error!r}") from error  # how faust's producer raises
        except ProducerSendError as wrapped:
            assert is_transient(wrapped) is transient, error
    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError())


def test_backoff_doubles_up_to_its_ceiling() -> None:
    backoff = Backoff(initial_s=0.1, max_s=1.0)
    assert [backoff.delay(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
