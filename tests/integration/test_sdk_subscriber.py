"""The SDK's Subscriber on the real broker: typed events with their CloudEvents attributes, deduplication by ce_id,
offsets committed only after the handler returns, and a subscriber process killed with SIGKILL mid-stream that
resumes, after a restart, with no event lost and none handled twice.

Records are published with Sightline's own producer (``bus.make_producer``), so they carry the headers the services
write. The session broker is shared with other tests, so every test uses its own consumer group and id prefix and
looks only at its own events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sightline.common.bus import make_producer
from sightline.common.config import KafkaSettings
from sightline.common.topics import ALERTS, DECISIONS, FRAMES
from sightline.sdk import ConfigurationError, Event, Subscriber, SubscriberSettings
from sightline.sdk.seen import Handled, SeenStore
from sightline.v1 import events_pb2, types_pb2

FAST = SubscriberSettings(max_poll_records=20, poll_timeout_s=0.2)


def decision(decision_id: str, source: str) -> events_pb2.Decision:
    event = events_pb2.Decision(
        decision_id=decision_id,
        frame=types_pb2.FrameRef(frame_id=f"{source}:{decision_id}", source_id=source),
        outcome=events_pb2.OUTCOME_NO_MATCH,
        similarity=0.25,
    )
    event.decided_at.FromDatetime(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    return event


def publish_decisions(kafka: KafkaSettings, ids: Iterable[str], sources: int = 4) -> None:
    """Decisions keyed by source (so spread over the partitions), through Sightline's producer (CloudEvents headers)."""
    producer = make_producer(kafka)
    for index, decision_id in enumerate(ids):
        source = f"cam-{index % sources}"
        producer.send(DECISIONS.name, key=source.encode(), value=decision(decision_id, source).SerializeToString())
    producer.flush()
    producer.close()


def collect(subscriber: Subscriber, prefix: str, **run: float) -> list[Event]:
    """The events of this test (ids with ``prefix``) a run hands over; the others are handled and ignored."""
    mine: list[Event] = []
    subscriber.run(lambda event: mine.append(event) if event.id.startswith(prefix) else None, **run)
    return mine


def test_events_are_typed_with_their_attributes_and_render_as_cloudevents_json(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    prefix = f"typed-{uuid.uuid4().hex[:8]}-"
    publish_decisions(kafka, [f"{prefix}1"])
    frame = events_pb2.FrameCaptured(
        frame=types_pb2.FrameRef(frame_id=f"{prefix}frame", source_id="cam-typed", sequence=1),
        image=b"\xff\xd8" + bytes(3000),
        media_type="image/jpeg",
    )
    producer = make_producer(kafka)
    producer.send(FRAMES.name, key=b"cam-typed", value=frame.SerializeToString())
    producer.flush()
    producer.close()

    with Subscriber(["decisions", "frames"], f"g-{prefix}", kafka=kafka, store=tmp_path / "s.db", settings=FAST) as sub:
        events = {event.id: event for event in collect(sub, prefix, idle_timeout_s=3.0)}
    assert set(events) == {f"{prefix}1", f"{prefix}frame"}
    made = events[f"{prefix}1"]
    assert made.payload(events_pb2.Decision).similarity == pytest.approx(0.25)
    with pytest.raises(TypeError):
        made.payload(events_pb2.Alert)
    assert made.key == "cam-0" and made.topic == DECISIONS.name and not made.redelivered
    assert made.attributes.type == "sightline.v1.Decision"
    assert made.attributes.source == "/sightline/decision"
    assert made.attributes.time == datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert made.attributes.dataschema.endswith("sightline/v1/events.proto")

    rendered = json.loads(made.to_json())
    assert rendered["specversion"] == "1.0" and rendered["id"] == f"{prefix}1"
    assert rendered["type"] == "sightline.v1.Decision" and rendered["time"] == "2026-12-01T12:00:00Z"
    assert rendered["datacontenttype"] == "application/json" and rendered["partitionkey"] == "cam-0"
    assert rendered["data"]["outcome"] == "OUTCOME_NO_MATCH" and rendered["data"]["frame"]["source_id"] == "cam-0"
    # Frames are biometric data: the image is its size unless the receiver is entitled to it.
    assert events[f"{prefix}frame"].to_dict()["data"]["image"] == "<3002 bytes>"
    full = events[f"{prefix}frame"].to_dict(elide_biometrics=False)["data"]["image"]
    assert len(full) == 4004  # base64 of 3002 bytes


def test_republished_events_are_handled_once_and_a_restart_resumes(kafka: KafkaSettings, store_url: str) -> None:
    """With the handled ids in a SQLite file or in a PostgreSQL database (one store for a whole group)."""
    prefix = f"dedup-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{n}" for n in range(30)]
    publish_decisions(kafka, ids)
    publish_decisions(kafka, ids[:10])  # a stage's replay: the same events again, the same ce_id
    group, store = f"g-{prefix}", store_url
    with Subscriber([DECISIONS.name], group, kafka=kafka, store=store, settings=FAST) as sub:
        first = collect(sub, prefix, idle_timeout_s=3.0)
        assert sub.stats.duplicates >= 10
    assert sorted(event.id for event in first) == sorted(ids)

    publish_decisions(kafka, ids[:5] + [f"{prefix}late"])  # replayed again, and one new event
    with Subscriber([DECISIONS.name], group, kafka=kafka, store=store, settings=FAST) as sub:
        second = collect(sub, prefix, idle_timeout_s=3.0)
    assert [event.id for event in second] == [f"{prefix}late"]


def test_an_event_whose_handler_raised_is_not_committed_and_comes_again(kafka: KafkaSettings, tmp_path: Path) -> None:
    prefix = f"raise-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{n}" for n in range(6)]
    publish_decisions(kafka, ids, sources=1)  # one key: one partition, in order
    group, store = f"g-{prefix}", tmp_path / "seen.db"
    handled: list[str] = []

    def fail_on_third(event: Event) -> None:
        if event.id.startswith(prefix):
            if event.id == ids[3]:
                raise RuntimeError("the receiver is down")
            handled.append(event.id)

    with Subscriber([DECISIONS.name], group, kafka=kafka, store=store, settings=FAST) as sub:
        with pytest.raises(RuntimeError, match="receiver is down"):
            sub.run(fail_on_third, idle_timeout_s=3.0)
    assert handled == ids[:3]
    with Subscriber([DECISIONS.name], group, kafka=kafka, store=store, settings=FAST) as sub:
        again = collect(sub, prefix, idle_timeout_s=3.0)
    assert [event.id for event in again] == ids[3:]
    assert again[0].redelivered and not any(event.redelivered for event in again[1:])


def test_leaving_a_loop_hands_the_current_event_over_again(kafka: KafkaSettings, tmp_path: Path) -> None:
    prefix = f"loop-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{n}" for n in range(4)]
    publish_decisions(kafka, ids, sources=1)
    with Subscriber([DECISIONS.name], f"g-{prefix}", kafka=kafka, store=tmp_path / "s.db", settings=FAST) as sub:
        for event in sub.events(idle_timeout_s=3.0):
            if event.id.startswith(prefix):
                break  # the loop's body never finished with this event
        left = event
        rest = [event for event in sub.events(idle_timeout_s=3.0) if event.id.startswith(prefix)]
    assert left.id == ids[0] and not left.redelivered
    assert [event.id for event in rest] == ids and rest[0].redelivered


def test_a_malformed_record_is_skipped_and_counted(kafka: KafkaSettings, tmp_path: Path) -> None:
    prefix = f"bad-{uuid.uuid4().hex[:8]}-"
    producer = make_producer(kafka)
    producer.send(DECISIONS.name, key=b"cam-bad", value=b"\x0a\xff\xff not a decision")
    producer.flush()
    producer.close()
    publish_decisions(kafka, [f"{prefix}after"], sources=1)
    with Subscriber([DECISIONS.name], f"g-{prefix}", kafka=kafka, store=tmp_path / "s.db", settings=FAST) as sub:
        events = collect(sub, prefix, idle_timeout_s=3.0)
        assert sub.stats.malformed >= 1
    assert [event.id for event in events] == [f"{prefix}after"]


def test_handled_ids_are_kept_for_their_topics_retention(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    with SeenStore(tmp_path / "seen.db", "g") as store, SeenStore(tmp_path / "seen.db", "other-group") as other:
        assert store.begin("t", "a", now + timedelta(hours=1)) is Handled.NEW
        store.finish("t", "a", now + timedelta(hours=1))
        assert store.begin("t", "b", now + timedelta(hours=3)) is Handled.NEW
        assert store.begin("t", "b", now + timedelta(hours=3)) is Handled.STARTED  # the handler never returned
        other.finish("t", "a", now + timedelta(hours=1))
        assert (store.state("t", "a"), store.state("t", "b"), store.state("t", "c")) == (
            Handled.DONE,
            Handled.STARTED,
            Handled.NEW,
        )
        assert store.begin("t", "a", now + timedelta(hours=2)) is Handled.DONE  # a republished copy: kept longer
        assert store.purge(now + timedelta(minutes=90)) == 0
        assert store.purge(now + timedelta(hours=2, minutes=30)) == 1
        assert (store.state("t", "a"), store.count()) == (Handled.NEW, 1)
        assert other.state("t", "a") is Handled.DONE  # each group's ids are its own
    # A subscriber keeps each id for its topic's retention (decisions: 7 days by default).
    with Subscriber(["decisions", "alerts"], "retention", store=tmp_path / "r.db") as sub:
        assert sub.keep_ids_for == {DECISIONS.name: timedelta(days=7), ALERTS.name: timedelta(days=30)}
    with Subscriber(["decisions"], "retention", store=tmp_path / "r.db", keep_ids_for=timedelta(hours=2)) as sub:
        assert sub.keep_ids_for == {DECISIONS.name: timedelta(hours=2)}


def test_unknown_topics_and_empty_groups_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown topic"):
        Subscriber(["not-a-topic"], "g", store=tmp_path / "s.db")
    with pytest.raises(ConfigurationError, match="consumer group"):
        Subscriber(["alerts"], " ", store=tmp_path / "s.db")


# -- a subscriber process killed mid-stream -------------------------------------------------------------------------

TOTAL = 240
HANDLER_DELAY_S = 0.01


def subscriber_process(kafka: KafkaSettings, group: str, store: Path, out: Path) -> subprocess.Popen[str]:
    """This file run as a script: a subscriber whose handler appends each id of this test to ``out``."""
    command = [sys.executable, __file__, kafka.bootstrap_servers, group, str(store), str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_subscriber_killed_mid_stream_resumes_with_no_loss_and_no_duplicate(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{n:04d}" for n in range(TOTAL)]
    publish_decisions(kafka, ids)
    publish_decisions(kafka, ids[::4])  # replayed copies of a quarter of them, after the originals
    group, store, out = f"g-{prefix}", tmp_path / "seen.db", tmp_path / "handled.txt"

    first = subscriber_process(kafka, group, store, out)
    deadline = time.monotonic() + 60
    while len([i for i in lines(out) if i.startswith(prefix)]) < TOTAL // 3 and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    before = [i for i in lines(out) if i.startswith(prefix)]
    assert TOTAL // 3 <= len(before) < TOTAL, "the kill must land mid-stream"

    second = subscriber_process(kafka, group, store, out)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    stats = json.loads(stdout.splitlines()[-1])
    handled = [i for i in lines(out) if i.startswith(prefix)]
    assert sorted(handled) == ids  # every event, each once
    assert stats["redelivered"] <= 1  # at most the one whose handler the kill interrupted

    # A third run resumes from the committed offsets: nothing of this test is handed over again.
    third = subscriber_process(kafka, group, store, out)
    stdout, stderr = third.communicate(timeout=120)
    assert third.returncode == 0, stderr
    assert [i for i in lines(out) if i.startswith(prefix)] == handled
    assert json.loads(stdout.splitlines()[-1])["redelivered"] == 0


def _run_subscriber(bootstrap: str, group: str, store: str, out: str) -> None:
    """The child of the kill test. Its handler is what an integrator writes: the effect (a line in ``out``) made
    idempotent for a redelivered event, the one whose handler the kill may have interrupted after its effect."""
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap, session_timeout_ms=2000, heartbeat_interval_ms=500, fetch_max_wait_ms=25
    )
    output = Path(out)

    def handle(event: Event) -> None:
        time.sleep(HANDLER_DELAY_S / 2)
        if event.redelivered and event.id in lines(output):
            return
        with output.open("a") as file:
            file.write(event.id + "\n")
        time.sleep(HANDLER_DELAY_S / 2)

    with Subscriber([DECISIONS.name], group, kafka=kafka, store=store, settings=FAST) as subscriber:
        subscriber.run(handle, idle_timeout_s=3.0)
    print(json.dumps(asdict(subscriber.stats)))


if __name__ == "__main__":
    _run_subscriber(*sys.argv[1:5])
