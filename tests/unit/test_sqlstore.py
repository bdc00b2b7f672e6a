"""The SQLite backend recovers from a COMMIT the database refused, so a transient lock never wedges a store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sightline.common.sqlstore import SqliteBackend
from sightline.common.transient import is_transient


def test_a_commit_refused_by_a_reader_is_rolled_back_and_the_next_transaction_works(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    backend = SqliteBackend(str(path))
    with backend.transaction(write=True) as cursor:
        cursor.execute("CREATE TABLE t (v INTEGER)")
    backend._conn.execute("PRAGMA busy_timeout = 50")  # the test waits 50 ms for the lock, not the default 30 s
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()  # holds a shared lock: a writer cannot commit
    with pytest.raises(sqlite3.OperationalError) as refused:
        with backend.transaction(write=True) as cursor:
            cursor.execute("INSERT INTO t VALUES (1)")
    assert is_transient(refused.value)  # the stage retries it rather than dead-lettering the input
    reader.execute("COMMIT")
    reader.close()
    with backend.transaction(write=True) as cursor:  # the retry: before the fix, "cannot start a transaction ..."
        cursor.execute("INSERT INTO t VALUES (2)")
    with backend.transaction(write=False) as cursor:
        cursor.execute("SELECT v FROM t")
        assert [row[0] for row in cursor.fetchall()] == [2]  # the refused insert was rolled back, the retry landed
    backend.close()
