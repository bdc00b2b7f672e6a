"""Does Tansu's memory storage get slower to fetch from as its log grows? (docs/reliability.md, "Soak").

`.venv/bin/python tools/tansu_growth.py` starts a fresh embedded broker, produces 40 KB records (a frame's size) in
steps of 200 MB with Sightline's producer settings, and after each step times fetching the newest 400 records with
Sightline's consumer settings. One partition, so "the newest 400" is one contiguous run of the log.
"""

from __future__ import annotations

import time

from kafka import TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from sightline.common.bus import client_options, make_consumer, make_producer
from sightline.common.config import KafkaSettings
from sightline.tooling.broker import LocalBroker

TOPIC = "tansu-growth"  # not a Sightline topic: raw bytes, no CloudEvents attributes
PAYLOAD = b"x" * 40_000
STEP_RECORDS = 5_000  # 200 MB
STEPS = 8
NEWEST = 400
FETCH_TIMEOUT_S = 60.0


def produce_step(producer: object, partition: int) -> float:
    """Records per second for one step, counted once the broker has acknowledged them all."""
    started = time.monotonic()
    for _ in range(STEP_RECORDS):
        producer.send(TOPIC, PAYLOAD, partition=partition)  # type: ignore[attr-defined]
    producer.flush()  # type: ignore[attr-defined]
    return STEP_RECORDS / (time.monotonic() - started)


def fetch_newest(consumer: object, partition: TopicPartition, end: int) -> float:
    """Milliseconds to fetch the NEWEST records before offset ``end``."""
    consumer.seek(partition, end - NEWEST)  # type: ignore[attr-defined]
    started, got = time.monotonic(), 0
    while got < NEWEST:
        if time.monotonic() - started > FETCH_TIMEOUT_S:
            raise TimeoutError(f"fetched {got} of {NEWEST} records in {FETCH_TIMEOUT_S:g} s")
        for records in consumer.poll(timeout_ms=1000).values():  # type: ignore[attr-defined]
            got += len(records)
    return (time.monotonic() - started) * 1000


def main() -> None:
    broker = LocalBroker()
    broker.start()
    try:
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        KafkaAdminClient(**client_options(settings)).create_topics([NewTopic(TOPIC, 1, 1)])
        producer, consumer = make_producer(settings), make_consumer(settings, enable_auto_commit=False)
        partition = TopicPartition(TOPIC, 0)
        consumer.assign([partition])
        for step in range(1, STEPS + 1):
            rate = produce_step(producer, partition.partition)
            records = step * STEP_RECORDS
            fetch_ms = fetch_newest(consumer, partition, records)
            megabytes = records * len(PAYLOAD) / 1e6
            print(
                f"log {records:6d} records ({megabytes:5.0f} MB): produce {rate:6.0f} rec/s, "
                f"fetch newest {NEWEST} in {fetch_ms:6.0f} ms",
                flush=True,
            )
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
