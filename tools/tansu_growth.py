"""Does Tansu's memory storage get slower to fetch from as its log grows? (docs/reliability.md, "Soak"). Run with
`.venv/bin/python tools/tansu_growth.py`: it produces 40 KB records (a frame's size) in steps of 200 MB and times
fetching the newest 400 after each step.
"""

import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from sightline.tooling.broker import LocalBroker

PAYLOAD = b"x" * 40_000
STEP = 5_000  # records per step (200 MB)
STEPS = 8

broker = LocalBroker()
broker.start()
try:
    servers = broker.bootstrap_servers
    KafkaAdminClient(bootstrap_servers=servers).create_topics([NewTopic("growth", 1, 1)])
    producer = KafkaProducer(bootstrap_servers=servers, linger_ms=5, max_request_size=2_000_000, acks=1)
    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, fetch_max_bytes=8_000_000)
    partition = TopicPartition("growth", 0)
    consumer.assign([partition])
    total = 0
    for _step in range(STEPS):
        started = time.monotonic()
        for _ in range(STEP):
            producer.send("growth", PAYLOAD)
        producer.flush()
        produce_s = time.monotonic() - started
        total += STEP
        consumer.seek(partition, total - 400)
        started, got = time.monotonic(), 0
        while got < 400:
            for records in consumer.poll(timeout_ms=1000).values():
                got += len(records)
        fetch_s = time.monotonic() - started
        print(
            f"log {total:6d} records ({total * 40 / 1000:5.0f} MB): produce {STEP / produce_s:6.0f} rec/s, "
            f"fetch newest 400 in {fetch_s * 1000:6.0f} ms",
            flush=True,
        )
finally:
    broker.stop()
