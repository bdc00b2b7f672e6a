"""Kafka plumbing with kafka-python: client settings, topic creation, a producer (records with CloudEvents headers),
topic readers.

kafka-python serves where a plain client fits (capture's producer, topic administration, tailing topics from the CLI);
faust-streaming runs the stream processors (``streams.py``). Both take their connection from one ``KafkaSettings``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata

from sightline.common.cloudevents import with_event_headers
from sightline.common.config import KafkaSettings
from sightline.common.topics import TopicSpec

log = logging.getLogger(__name__)


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """kafka-python connection options (bootstrap, TLS, SASL)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.servers,
        "security_protocol": settings.security_protocol,
    }
    if settings.ssl_cafile:
        options["ssl_cafile"] = str(settings.ssl_cafile)
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return options


class EventProducer(KafkaProducer):
    """A KafkaProducer whose records on Sightline's topics carry their CloudEvents attributes (cloudevents.py)."""

    def send(
        self,
        topic: str,
        value: object = None,
        key: object = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> FutureRecordMetadata:
        if isinstance(value, bytes):  # Sightline publishes serialised events; anything else is passed on as it is
            headers = with_event_headers(topic, value, headers)
        return super().send(
            topic, value=value, key=key, headers=headers, partition=partition, timestamp_ms=timestamp_ms
        )


def make_producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer that waits for every in-sync replica's acknowledgement and can carry full frames; every record it
    sends on a Sightline topic carries the event's CloudEvents attributes (``EventProducer``).

    ``acks="all"``: a record acknowledged by the leader alone is lost if the leader fails before a follower has it;
    whoever sends must still wait for each record's future (or ``flush()`` and check them) before counting it sent.

    Not idempotent (kafka-python 3 makes a producer idempotent by default): an idempotent producer whose broker lost
    its producer state (the embedded broker after a restart; a cluster that expired the producer id) fails its
    InitProducerId for good and aborts every batch from then on, so capture would accept frames that never arrive
    (``sightline bench outage``). Delivery is at least once with stable ids, so a record a retry sends twice is
    deduplicated by its id downstream; one request in flight per connection keeps a retry from reordering a
    camera's frames, which the tracker reads in order.
    """
    options = {
        **client_options(settings),
        "acks": "all",
        "linger_ms": 2,
        "max_request_size": settings.max_message_bytes,
        "retries": 5,
        "enable_idempotence": False,
        "max_in_flight_requests_per_connection": 1,
        **overrides,
    }
    return EventProducer(**options)


def make_consumer(settings: KafkaSettings, *topics: str, **overrides: Any) -> KafkaConsumer:
    options = {
        **client_options(settings),
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "fetch_max_bytes": settings.max_message_bytes * 2,
        "max_partition_fetch_bytes": settings.max_message_bytes,
        **overrides,
    }
    return KafkaConsumer(*topics, **options)


# What a record batch holds beyond one record the producer may send: the batch header and the record's framing.
TOPIC_MESSAGE_HEADROOM = 64 * 1024


def topic_max_message_bytes(settings: KafkaSettings) -> int:
    """``max.message.bytes`` of every topic: the largest record a producer may send, plus the batch's framing.

    A broker's default (1 MB on Apache Kafka) is below what producers may send (``max_message_bytes``, 16 MiB by
    default): without this, the broker would refuse a large frame that the producer accepted.
    """
    return settings.max_message_bytes + TOPIC_MESSAGE_HEADROOM


def ensure_topics(settings: KafkaSettings, specs: Iterable[TopicSpec] | None = None) -> dict[str, str]:
    """Create the topics that are missing, with explicit partitions, retention and ``max.message.bytes`` (what the
    producers may send, ``topic_max_message_bytes``); report each topic's state.

    ``specs`` defaults to every topic, with the retention limits of ``SIGHTLINE_RETENTION_*`` (common/retention.py).

    An existing topic with fewer partitions than configured is reported, not changed: adding partitions moves keys
    between partitions and breaks per-source order, so that is an operator's decision. The configs of an existing
    topic are not changed either (docs/security.md says how to raise its ``max.message.bytes``).
    """
    from sightline.common.retention import topic_specs  # retention imports telemetry: not needed by every reader

    specs = list(specs) if specs is not None else topic_specs()
    admin = KafkaAdminClient(**client_options(settings), request_timeout_ms=15000)
    try:
        existing = set(admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        created = _create(admin, settings, missing)
        states = {spec.name: ("created" if spec.name in created else "exists") for spec in specs}
        for name, count in _partition_counts(admin, [s.name for s in specs if states[s.name] == "exists"]).items():
            if count < settings.default_partitions:
                states[name] = f"exists with {count} partitions (< {settings.default_partitions})"
        return states
    finally:
        admin.close()


def _create(admin: KafkaAdminClient, settings: KafkaSettings, specs: list[TopicSpec]) -> set[str]:
    created: set[str] = set()
    for spec in specs:
        configs = spec.configs(max_message_bytes=topic_max_message_bytes(settings))
        topic = NewTopic(spec.name, settings.default_partitions, settings.replication_factor, topic_configs=configs)
        try:
            admin.create_topics([topic])
            created.add(spec.name)
        except TopicAlreadyExistsError:
            pass
    return created


def _partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    if not names:
        return {}
    return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names)}


def read_topics(
    settings: KafkaSettings,
    topics: Iterable[str],
    since_ms: int | None = None,
    idle_timeout_s: float | None = None,
    stop: Any = None,
) -> Iterator[Any]:
    """Yield the records of every partition of the topics, from the start, or only those produced at/after ``since_ms``.

    Reads without a consumer group and filters by record timestamp instead of seeking to the end: Tansu's
    ListOffsets(LATEST) is wrong (see docs/broker.md), and a reader must not disturb the services' groups.
    Ends after ``idle_timeout_s`` without a record (forever when None) or when ``stop()`` returns true.
    """
    from kafka import TopicPartition

    consumer = make_consumer(settings, enable_auto_commit=False, group_id=None, auto_offset_reset="earliest")
    try:
        assignment = []
        for topic in topics:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                raise ValueError(f"topic {topic} does not exist on {settings.bootstrap_servers}")
            assignment += [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        consumer.seek_to_beginning()
        idle_since = time.monotonic()
        while not (stop and stop()):
            batches = consumer.poll(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    if since_ms is None or record.timestamp >= since_ms:
                        yield record
            if batches:
                idle_since = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                return
    finally:
        consumer.close()
