"""The sightline command as a user runs it: faces (in-process models), topics and watch (against a real broker)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from sightline.common.bus import make_producer
from sightline.common.topics import ALL_TOPICS, DECISIONS
from sightline.v1 import events_pb2, types_pb2


def sightline(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sightline.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )


def test_faces_json_has_boxes_landmarks_embeddings_and_quality(
    face_photos: Path, tmp_path: Path, models_dir: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 nope")
    result = sightline("faces", "--json", str(face_photos / "obama.jpg"), str(face_photos / "32bit.png"), str(broken))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["obama.jpg", "32bit.png", "broken.jpg"]
    face = lines[0]["faces"][0]
    x1, y1, x2, y2 = face["box"]
    assert 0 <= x1 < x2 <= lines[0]["width"] and 0 <= y1 < y2 <= lines[0]["height"]
    assert len(face["landmarks"]) == 5 and all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face["landmarks"])
    assert len(face["embedding"]) == 128 and 0 < face["score"] <= 1
    assert {"inter_eye_px", "yaw", "pitch", "roll", "sharpness", "score"} <= set(face["quality"])
    assert "error" in lines[2] and "faces" not in lines[2]


def test_faces_exit_code_is_non_zero_only_when_nothing_was_readable(tmp_path: Path, models_dir: Path) -> None:
    missing = sightline("faces", str(tmp_path / "missing.jpg"))
    assert missing.returncode == 1 and "cannot read file" in missing.stdout


def test_topics_ensure_is_idempotent_and_reads_overrides(kafka, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = sightline("topics", "ensure", "--bootstrap", kafka.bootstrap_servers)
    assert first.returncode == 0 and all(t.name in first.stdout for t in ALL_TOPICS)
    overrides = tmp_path / "topics.yaml"
    overrides.write_text("- {name: sightline.extra-check.v1, partitions: 2}\n")
    bad = sightline("topics", "ensure", "--bootstrap", kafka.bootstrap_servers, "--from-file", str(overrides))
    assert bad.returncode == 1 and "unknown topic" in bad.stderr
    overrides.write_text("- {name: decisions, partitions: 2, retention_ms: 3600000}\n")
    again = sightline("topics", "ensure", "--bootstrap", kafka.bootstrap_servers, "--from-file", str(overrides))
    assert again.returncode == 0 and "sightline.decisions.v1" in again.stdout and "exists" in again.stdout


def test_watch_prints_new_decisions_readably_and_as_json(kafka) -> None:  # type: ignore[no-untyped-def]
    decision = events_pb2.Decision(
        decision_id="d-1",
        outcome=events_pb2.OUTCOME_MATCH,
        subject_id="alice",
        similarity=0.8,
        distance=0.24,
        reasons=["because"],
        frame=types_pb2.FrameRef(frame_id="cam:1", source_id="cam", sequence=1),
    )
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sightline.cli.main",
            "watch",
            "decisions",
            "--json",
            "--max",
            "1",
            "--bootstrap",
            kafka.bootstrap_servers,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)  # the watcher shows only records produced after it started
    producer = make_producer(kafka)
    producer.send(DECISIONS.name, key=b"cam", value=decision.SerializeToString())
    producer.flush()
    out, _ = watcher.communicate(timeout=60)
    shown = json.loads(out.strip())
    assert shown["subject_id"] == "alice" and shown["outcome"] == "OUTCOME_MATCH"
    readable = sightline("watch", "decisions", "--from-beginning", "--max", "1", "--bootstrap", kafka.bootstrap_servers)
    assert "MATCH" in readable.stdout and "subject=alice" in readable.stdout


def test_watch_unknown_topic_is_a_clear_error(kafka) -> None:  # type: ignore[no-untyped-def]
    result = sightline("watch", "nope", "--bootstrap", kafka.bootstrap_servers)
    assert result.returncode == 2 and "known topics" in result.stderr
