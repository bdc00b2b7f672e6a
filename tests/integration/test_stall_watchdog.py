"""The stream services' stall watchdog (common/stall.py) against the real broker: a group that commits nothing while
records wait is stalled; one that keeps committing, or has nothing to do, is not; an unreadable lag restarts the
clock."""

from __future__ import annotations

import threading
import time
from typing import Any

from kafka import TopicPartition

from sightline.common.bus import make_consumer, make_producer
from sightline.common.lag import GroupLag, PartitionLag, group_lags
from sightline.common.stall import StallJudge, StallWatchdog
from sightline.common.topics import FACES

WINDOW_S = 2.0
WORKING_WINDOW_S = 6.0


def _reader(kafka: Any, group: str):  # type: ignore[no-untyped-def]
    return lambda: group_lags(kafka, [(group, FACES.name)], timeout_s=5.0)[(group, FACES.name)]


def _produce(kafka: Any, count: int) -> None:
    producer = make_producer(kafka)
    for i in range(count):
        producer.send(FACES.name, key=f"stall-{i}".encode(), value=b"x", partition=i % 4)
    producer.flush()
    producer.close()


def _watch(kafka: Any, group: str, for_s: float, window_s: float = WINDOW_S) -> float | None:
    """Seconds until the watchdog called stall on the group, None if it did not within ``for_s``."""
    stalled = threading.Event()
    started = time.monotonic()
    watchdog = StallWatchdog("embedding", kafka, window_s, on_stall=stalled.set, read_lag=_reader(kafka, group))
    watchdog.start()
    try:
        return time.monotonic() - started if stalled.wait(for_s) else None
    finally:
        watchdog.stop()


def test_a_group_that_commits_nothing_while_records_wait_is_stalled(kafka: Any) -> None:
    _produce(kafka, 8)
    took = _watch(kafka, "stall-test-idle", for_s=4 * WINDOW_S)
    assert took is not None and took >= WINDOW_S


def test_a_group_that_keeps_committing_is_not_stalled(kafka: Any) -> None:
    _produce(kafka, 200)  # more than it takes in the test: records wait throughout
    group, stop = "stall-test-working", threading.Event()

    def work() -> None:  # a slow consumer: two records, a commit, a pause
        # Assigned, not subscribed: it commits for the group without joining it, which on Tansu can take longer
        # than the test (the watchdog reads only the group's committed offsets, however they were committed).
        consumer = make_consumer(kafka, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest")
        consumer.assign([TopicPartition(FACES.name, p) for p in consumer.partitions_for_topic(FACES.name)])
        while not stop.is_set():
            consumer.poll(timeout_ms=200, max_records=2)
            consumer.commit()
            stop.wait(WINDOW_S / 4)
        consumer.close()

    worker = threading.Thread(target=work)
    worker.start()
    try:
        joined = time.monotonic() + 30  # watched from the consumer's first commit, not from its start
        while all(p.committed is None for p in _reader(kafka, group)().partitions) and time.monotonic() < joined:
            time.sleep(0.2)
        # A window well above the consumer's pace (a commit every 0.5 s), for a loaded machine's slow polls.
        assert _watch(kafka, group, for_s=2 * WORKING_WINDOW_S, window_s=WORKING_WINDOW_S) is None
    finally:
        stop.set()
        worker.join()


def test_lag_that_cannot_be_read_restarts_the_clock_and_no_lag_is_never_a_stall() -> None:
    waiting = GroupLag("g", FACES.name, (PartitionLag(0, 5, 9, 4),))
    judge = StallJudge(exit_after_s=10.0)
    assert not judge.observe(waiting, now=0.0)
    assert not judge.observe(waiting, now=9.0)
    assert not judge.observe(None, now=11.0)  # the broker away: not a stall, and the wait starts again
    assert not judge.observe(waiting, now=12.0)
    assert not judge.observe(waiting, now=21.0)
    assert judge.observe(waiting, now=22.5)  # 10 s without a commit since the broker was back

    caught_up = GroupLag("g", FACES.name, (PartitionLag(0, 9, 9, 0),))
    idle = StallJudge(exit_after_s=10.0)
    assert not any(idle.observe(caught_up, now=t) for t in (0.0, 20.0, 40.0))
