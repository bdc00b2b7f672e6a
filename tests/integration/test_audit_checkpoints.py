"""Signed audit checkpoints through the real broker: the writer publishes them to sightline.audit.v1 next to the
record copies, and ``sightline audit verify --against-topic`` finds a tail cut off the database behind them, which
the chain and its MACs alone cannot see."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sightline.cli.main import main
from sightline.common.audit import Action, AuditLog, TopicPublisher, audit_topic_publisher
from sightline.common.audit_checkpoints import AuditCheckpointSettings, Checkpoint, is_checkpoint
from sightline.common.audit_keys import AuditKeyring, new_entry
from sightline.common.bus import read_topics
from sightline.common.topics import AUDIT
from sightline.v1 import audit_pb2


def cut_tail(db: Path, keep: int) -> None:
    """A forger with the database and no key: drop the triggers, delete the newest records, move the head back."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for trigger in ("audit_records_no_delete", "audit_chain_head_forward"):
            conn.execute(f"DROP TRIGGER {trigger}")
        (digest,) = conn.execute("SELECT hash FROM audit_records WHERE sequence = ?", (keep,)).fetchone()
        conn.execute("DELETE FROM audit_records WHERE sequence > ?", (keep,))
        conn.execute("UPDATE audit_chain_head SET sequence = ?, hash = ? WHERE id = 1", (keep, digest))
    finally:
        conn.close()


def verify(url: str, keys: Path, kafka: Any, *extra: str) -> list[str]:
    return [
        "audit",
        "verify",
        "--database-url",
        url,
        "--keys-file",
        str(keys),
        "--bootstrap",
        kafka.bootstrap_servers,
        "--topic-timeout",
        "1.5",
        *extra,
    ]


def test_verify_against_topic_catches_a_cut_tail(
    kafka: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "audit.keys"
    keys.write_text(new_entry("k1") + "\n")
    db, publisher = tmp_path / "audit.db", TopicPublisher(kafka)
    url = f"sqlite:///{db}"
    log = AuditLog.open(
        url,
        publish=audit_topic_publisher(publisher),
        keyring=AuditKeyring.from_file(keys),
        checkpoints=AuditCheckpointSettings(checkpoint_every=5, checkpoint_interval_s=3600),
    )
    for i in range(12):
        log.append("reviewer-a", Action.REVIEW, f"alert-{i}", "human-review", "CONFIRMED")
    chain = log.chain_id()
    publisher.close()  # as matching and decision stop: the publisher first...
    log.close()  # ...then the log, whose last checkpoint still reaches the topic

    on_topic = list(read_topics(kafka, [AUDIT.name], idle_timeout_s=1.5))
    mine = [Checkpoint.from_json(r.value) for r in on_topic if is_checkpoint(r.headers)]
    assert [c.sequence for c in mine if c.chain == chain] == [5, 10, 12]
    copies = [audit_pb2.AuditRecord.FromString(r.value) for r in on_topic if not is_checkpoint(r.headers)]
    assert sum(1 for c in copies if c.subject_id.startswith("alert-")) >= 12  # record copies still parse as before

    assert main(verify(url, keys, kafka, "--against-topic")) == 0
    assert "3 checkpoint(s) match, the latest at record 12" in capsys.readouterr().out

    cut_tail(db, keep=8)
    assert main(verify(url, keys, kafka)) == 0  # what is left is genuine, MACs and all
    assert "intact: 8 record(s)" in capsys.readouterr().out
    assert main(verify(url, keys, kafka, "--against-topic")) == 1
    out = capsys.readouterr().out
    assert "do NOT match" in out and "records 9..10 were removed from the end" in out


def test_verify_without_the_keyring_cannot_check(
    tmp_path: Path, kafka: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "audit.keys"
    keys.write_text(new_entry("k1") + "\n")
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    with AuditLog.open(url, keyring=AuditKeyring.from_file(keys)) as log:
        log.append("p", Action.ENROL, "s1")
    assert main(verify(url, tmp_path / "missing.keys", kafka)) == 2
    assert "cannot read the audit keyring" in capsys.readouterr().err
    other = tmp_path / "other.keys"
    other.write_text(new_entry("k9") + "\n")
    assert main(verify(url, other, kafka)) == 1
    assert "'k1' is not in the keyring" in capsys.readouterr().out
