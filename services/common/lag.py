"""Consumer-group lag of the services, per partition and per topic, computed so that it is right on Tansu too.

Each stream service consumes one input topic (``TopicSpec.consumers`` in topics.py) in the consumer group
``sightline-<service>`` (the faust app id, which faust uses as its group id). Its lag on a partition is the
partition's high watermark minus the group's committed offset; a partition where the group has committed nothing
counts whole (high watermark minus the log start offset), because faust starts such a partition from the earliest
record.

Why it is computed this way:

- The high watermark is read from a real Fetch, not from ListOffsets(LATEST): Tansu answers ListOffsets(LATEST) with
  the base offset of the last stored batch + 1, so ``end_offsets()`` under-counts as soon as a partition holds more
  than one batch (docs/broker.md). A consumer without a group is assigned the partitions, seeks to the committed
  offset (or the beginning) and polls until every partition's fetch response has reported its high watermark. It
  never joins, so it cannot disturb the services' groups. Fetch sizes are kept minimal: the records it happens to
  receive are discarded, and frames can be megabytes.
- Committed offsets come from OffsetFetch through ``KafkaAdminClient.list_group_offsets({group: partitions})``
  (kafka-python 3's name; 2.x called it ``list_consumer_group_offsets``). On Tansu 0.6 this works, with explicit
  partitions (offset -1 when the group committed nothing there) and for a whole group; it needs no DescribeGroups,
  which kafka-python cannot parse on Tansu. ``KafkaConsumer(group_id=...).committed(tp)`` gives the same numbers
  without joining, but asks per partition; the admin call reads all of a group's partitions in one request.
- Committed offsets are read before the high watermarks, so records produced in between can only raise the figure:
  lag is never under-reported and never negative.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from sightline.common.bus import client_options
from sightline.common.config import KafkaSettings
from sightline.common.topics import ALL_TOPICS


class LagError(RuntimeError):
    """The broker could not be reached, or a topic or group could not be read."""


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None  # None: the group has committed nothing on this partition
    highwater: int
    lag: int


@dataclass(frozen=True)
class GroupLag:
    """Lag of one consumer group on one topic; ``error`` says why it could not be read (partitions is then empty)."""

    group: str
    topic: str
    partitions: tuple[PartitionLag, ...] = ()
    error: str | None = None

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def partition_count(self) -> int:
        return len(self.partitions)


@dataclass
class _Plan:
    """What to read for one group: its topic's partitions, then the committed offsets found."""

    group: str
    topic: str
    partitions: list[TopicPartition] = field(default_factory=list)
    committed: dict[TopicPartition, int | None] = field(default_factory=dict)
    error: str | None = None


def consumer_group(service: str) -> str:
    """The consumer group of a stream service (its faust app id); KEDA's kafka trigger uses the same name."""
    return f"sightline-{service}"


def input_topic(service: str) -> str | None:
    """The stream topic a service consumes (the first in pipeline order), or None for one that consumes none."""
    for spec in ALL_TOPICS:
        if service in spec.consumers:
            return spec.name
    return None


def service_lags(settings: KafkaSettings, services: Iterable[str], timeout_s: float = 10.0) -> dict[str, GroupLag]:
    """Lag of each service that has an input topic, keyed by service. Raises LagError when the broker is unreachable."""
    targets = {s: (consumer_group(s), topic) for s in services if (topic := input_topic(s))}
    lags = group_lags(settings, list(targets.values()), timeout_s)
    return {service: lags[key] for service, key in targets.items()}


def group_lags(
    settings: KafkaSettings, pairs: list[tuple[str, str]], timeout_s: float = 10.0
) -> dict[tuple[str, str], GroupLag]:
    """Lag of each (group, topic) pair, read with one admin client and one group-less consumer."""
    consumer = _connect(
        KafkaConsumer,
        settings,
        timeout_s,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
        fetch_max_bytes=1,
        max_partition_fetch_bytes=1,
        allow_auto_create_topics=False,
    )
    try:
        plans = [_plan(consumer, group, topic) for group, topic in pairs]
        admin = _connect(KafkaAdminClient, settings, timeout_s)
        try:
            for plan in plans:
                _read_committed(admin, plan)
        finally:
            admin.close()
        readable = [p for p in plans if not p.error]
        log_starts = _log_starts(consumer, readable)
        highwaters = _high_watermarks(consumer, readable, timeout_s)
        return {(p.group, p.topic): _result(p, highwaters, log_starts) for p in plans}
    except KafkaError as exc:
        raise LagError(f"reading offsets from {settings.bootstrap_servers} failed: {exc}") from exc
    finally:
        consumer.close()


def _connect(cls: Any, settings: KafkaSettings, timeout_s: float, **options: Any) -> Any:
    timeout_ms = int(timeout_s * 1000)
    try:
        return cls(
            **client_options(settings), bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms + 1000, **options
        )
    except KafkaError as exc:
        raise LagError(f"cannot reach the Kafka brokers at {settings.bootstrap_servers}: {exc}") from exc


def _plan(consumer: KafkaConsumer, group: str, topic: str) -> _Plan:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        return _Plan(group, topic, error=f"topic {topic} does not exist")
    return _Plan(group, topic, [TopicPartition(topic, p) for p in sorted(partitions)])


def _read_committed(admin: KafkaAdminClient, plan: _Plan) -> None:
    if plan.error:
        return
    try:
        offsets = admin.list_group_offsets({plan.group: plan.partitions}).get(plan.group, {})
    except KafkaError as exc:
        plan.error = f"cannot read the committed offsets of group {plan.group}: {exc}"
        return
    for tp in plan.partitions:
        found = offsets.get(tp)
        # OffsetFetch answers -1 for a partition where the group has committed nothing.
        plan.committed[tp] = found.offset if found is not None and found.offset >= 0 else None


def _high_watermarks(consumer: KafkaConsumer, plans: list[_Plan], timeout_s: float) -> dict[TopicPartition, int]:
    """High watermark of every planned partition, from real fetch responses (see the module docstring for why)."""
    positions = _fetch_positions(plans)
    if not positions:
        return {}
    consumer.assign(list(positions))
    for tp, offset in positions.items():
        if offset is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, offset)  # with no lag the fetch then carries no records, only the watermark
    deadline = time.monotonic() + timeout_s
    while True:
        # Each poll parses only some of the completed fetches; the others report their watermark on later polls.
        consumer.poll(timeout_ms=100)
        marks = {tp: consumer.highwater(tp) for tp in positions}
        known = {tp: mark for tp, mark in marks.items() if mark is not None}
        if len(known) == len(marks):
            return known
        if time.monotonic() > deadline:
            missing = sorted(f"{tp.topic}[{tp.partition}]" for tp, mark in marks.items() if mark is None)
            raise LagError(f"no fetch response with a high watermark within {timeout_s:g} s for {', '.join(missing)}")


def _fetch_positions(plans: list[_Plan]) -> dict[TopicPartition, int | None]:
    """Where to fetch each partition from: the lowest committed offset of the groups reading it (None: beginning)."""
    positions: dict[TopicPartition, int | None] = {}
    for plan in plans:
        for tp, offset in plan.committed.items():
            if tp not in positions:
                positions[tp] = offset
            elif (lowest := positions[tp]) is not None:
                positions[tp] = None if offset is None else min(offset, lowest)
    return positions


def _log_starts(consumer: KafkaConsumer, plans: list[_Plan]) -> dict[TopicPartition, int]:
    """Log start offsets of the partitions where a group committed nothing (ListOffsets EARLIEST is right on Tansu)."""
    fresh = {tp for plan in plans for tp, offset in plan.committed.items() if offset is None}
    return dict(consumer.beginning_offsets(sorted(fresh))) if fresh else {}


def _result(plan: _Plan, highwaters: dict[TopicPartition, int], log_starts: dict[TopicPartition, int]) -> GroupLag:
    if plan.error:
        return GroupLag(plan.group, plan.topic, error=plan.error)
    rows = []
    for tp in plan.partitions:
        committed, highwater = plan.committed[tp], highwaters[tp]
        start = committed if committed is not None else log_starts[tp]
        rows.append(PartitionLag(tp.partition, committed, highwater, max(0, highwater - start)))
    return GroupLag(plan.group, plan.topic, tuple(rows))
