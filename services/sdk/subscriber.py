"""``Subscriber``: Sightline's topics as typed events, each handled once, surviving restarts.

    from sightline.sdk import Subscriber
    from sightline.v1 import events_pb2

    def forward(event):
        alert = event.payload(events_pb2.Alert)
        ...

    with Subscriber(["alerts"], group="my-forwarder") as subscriber:
        subscriber.run(forward)

What it guarantees, with the broker's consumer group and the handled-id store (``seen.py``) together:

- **No loss.** Offsets are committed only for records whose handler has returned (or that were duplicates), once
  every record of a fetch is through; a subscriber killed at any point resumes from the last commit.
- **No duplicate.** Each event's ``ce_id`` is recorded before its handler runs and when it returns; an id already
  done is skipped, whether it comes again because the subscriber restarted or because Sightline republished it
  (a stage's replay). The one case the store cannot settle is an event whose handler was running when the process
  died: it is handed over again with ``event.redelivered`` True, so a handler with outside effects makes those
  idempotent for such events (the examples use the id as an idempotency key or a primary key).
- **A handler that raises** stops the subscriber with that exception; the event is not committed and comes again
  (``redelivered``) on the next run.

``run(handler)`` is the usual form. Iterating (``for event in subscriber``) works too: an event counts as handled
when the loop asks for the next one, so leaving the loop (``break``, an exception) hands the current event over
again. ``stop()`` (from a signal handler or another thread) ends either after the current event; otherwise a
subscriber is used from one thread (kafka-python's consumer is not thread-safe).

Reading uses kafka-python with Sightline's consumer settings (``bus.make_consumer``: the ``SIGHTLINE_KAFKA_*``
connection, TLS and SASL); the subscriber's own settings are ``SubscriberSettings`` (``SIGHTLINE_SUBSCRIBER_*``).
Handled ids are kept for their topic's retention (``SIGHTLINE_RETENTION_*``), the longest a record can come back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from sightline.common.bus import make_consumer
from sightline.common.config import KafkaSettings
from sightline.common.topics import by_name
from sightline.sdk.errors import ConfigurationError, MalformedRecord
from sightline.sdk.events import Event, decode
from sightline.sdk.seen import Handled, SeenStore
from sightline.sdk.settings import SubscriberSettings

log = logging.getLogger(__name__)

Handler = Callable[[Event], object]


@dataclass
class SubscriberStats:
    """What a subscriber has done since it was made."""

    handled: int = 0  # handler calls that returned
    duplicates: int = 0  # records skipped: their id was already handled
    redelivered: int = 0  # events handed over again after a handler that had not returned
    malformed: int = 0  # records skipped: not the event they claim to be (logged)
    purged: int = 0  # ids dropped from the store past their topic's retention


class Subscriber:
    """A consumer group member on Sightline topics that hands each event to the caller once (see the module)."""

    def __init__(
        self,
        topics: Iterable[str],
        group: str,
        *,
        kafka: KafkaSettings | None = None,
        store: str | Path | None = None,
        settings: SubscriberSettings | None = None,
        keep_ids_for: timedelta | None = None,
    ) -> None:
        """``topics``: full or short names (``"alerts"``). ``group``: the consumer group, which is what resumes.
        ``store``: the handled-id store, a file or database URL (default ``<store_dir>/<group>.sqlite``).
        ``keep_ids_for``: how long handled ids are kept (default: each topic's retention)."""
        try:
            self.topics = tuple(dict.fromkeys(by_name(topic).name for topic in topics))
        except KeyError as error:
            raise ConfigurationError(str(error.args[0])) from None
        if not self.topics or not group.strip():
            raise ConfigurationError("a subscriber needs at least one topic and a consumer group name")
        self.group = group
        self.settings = settings or SubscriberSettings()
        self.stats = SubscriberStats()
        self._kafka = kafka or KafkaSettings()
        self.keep_ids_for = _keep_times(self.topics, keep_ids_for)  # per topic
        default_store = self.settings.store_dir / f"{group.replace('/', '_')}.sqlite"  # a group name is free text
        self._seen = SeenStore(store if store is not None else default_store, group)
        self._consumer: KafkaConsumer | None = None
        self._stopping = threading.Event()
        self._queue: deque[Any] = deque()  # fetched records not yet handed over, in partition order
        self._inflight: Any = None  # the record whose event the caller holds
        self._committable: dict[TopicPartition, int] = {}  # next offset per partition, all before it through
        self._purged_at = 0.0

    # The caller's side -------------------------------------------------------------------------------------------

    def run(self, handler: Handler, *, max_events: int | None = None, idle_timeout_s: float | None = None) -> int:
        """Hand every event to ``handler`` until ``stop()``, ``max_events`` handled, or ``idle_timeout_s`` without a
        record; how many were handled. An exception from the handler propagates (the event is not committed)."""
        handled = 0
        try:
            while max_events is None or handled < max_events:
                event = self._next_event(idle_timeout_s)
                if event is None:
                    break
                handler(event)
                self._finish(event)
                handled += 1
        finally:
            self._release()
        return handled

    def events(self, *, idle_timeout_s: float | None = None) -> Iterator[Event]:
        """The events, one at a time; each counts as handled when the next is asked for (see the module)."""
        try:
            while (event := self._next_event(idle_timeout_s)) is not None:
                yield event
                self._finish(event)
        finally:
            self._release()

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def stop(self) -> None:
        """End ``run`` or the iteration after the current event (safe from a signal handler or another thread)."""
        self._stopping.set()

    def close(self) -> None:
        """Commit what was handled, leave the group and close the store."""
        self._release()
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        self._seen.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # Delivery ------------------------------------------------------------------------------------------------------

    def _next_event(self, idle_timeout_s: float | None) -> Event | None:
        """The next event to hand over, duplicates and malformed records skipped; None when stopping or idle."""
        while (record := self._next_record(idle_timeout_s)) is not None:
            try:
                event = decode(record)
            except MalformedRecord as error:
                log.warning("skipping a malformed record: %s", error)
                self.stats.malformed += 1
                self._through(record)
                continue
            state = self._seen.begin(event.topic, event.id, self._keep_until(event.topic))
            if state is Handled.DONE:
                self.stats.duplicates += 1
                self._through(record)
                continue
            self._inflight = record
            if state is Handled.STARTED:
                self.stats.redelivered += 1
                return event.as_redelivered()
            return event
        return None

    def _finish(self, event: Event) -> None:
        """The caller is through with the event: recorded as done, its offset committable."""
        self._seen.finish(event.topic, event.id, self._keep_until(event.topic))
        self.stats.handled += 1
        self._through(self._inflight)
        self._inflight = None

    def _through(self, record: Any) -> None:
        self._committable[TopicPartition(record.topic, record.partition)] = record.offset + 1

    def _next_record(self, idle_timeout_s: float | None) -> Any:
        """The next fetched record, fetching (after committing what is through) when none is left."""
        idle_since = time.monotonic()
        while not self._queue:
            if self._stopping.is_set():
                return None
            self._commit()  # every record fetched so far is through
            self._purge_if_due()
            consumer = self._open()
            fetched = consumer.poll(
                timeout_ms=int(self.settings.poll_timeout_s * 1000), max_records=self.settings.max_poll_records
            )
            for records in fetched.values():
                self._queue.extend(records)
            if fetched:
                break
            if not consumer.assignment():  # still joining the group (or between owners): not idle yet
                idle_since = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - idle_since >= idle_timeout_s:
                return None
        if self._stopping.is_set():
            return None
        return self._queue.popleft()

    def _release(self) -> None:
        """Leaving a run or an iteration: commit what is through; records fetched but not through (the one the caller
        held, those after it) are fetched again next time."""
        if self._consumer is None:
            return
        unfinished = ([self._inflight] if self._inflight is not None else []) + list(self._queue)
        rewind: dict[TopicPartition, int] = {}
        for record in unfinished:
            partition = TopicPartition(record.topic, record.partition)
            rewind[partition] = min(rewind.get(partition, record.offset), record.offset)
        for partition, offset in rewind.items():
            self._consumer.seek(partition, offset)
        self._queue.clear()
        self._inflight = None
        self._commit()

    def _commit(self) -> None:
        if not self._committable or self._consumer is None:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._committable.items()}
        try:
            self._consumer.commit(offsets)
        except KafkaError as error:
            # A rebalance took the partitions away: their next owner reads these records again, and skips those
            # this store knows are done when it shares the store; otherwise redelivery is at least once.
            log.warning("could not commit offsets (%s); the records will be read again", error)
        self._committable.clear()

    # Set-up ----------------------------------------------------------------------------------------------------------

    def _open(self) -> KafkaConsumer:
        if self._consumer is None:
            self._consumer = make_consumer(
                self._kafka,
                group_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset=self.settings.start_from,
                max_poll_records=self.settings.max_poll_records,
            )
            self._consumer.subscribe(list(self.topics))
            log.info(
                "subscribed to %s as group %s (handled ids in %s)",
                ", ".join(self.topics),
                self.group,
                self._seen.description,
            )
        return self._consumer

    def _keep_until(self, topic: str) -> datetime:
        return datetime.now(UTC) + self.keep_ids_for[topic]

    def _purge_if_due(self) -> None:
        if self._purged_at and time.monotonic() - self._purged_at < self.settings.purge_interval_s:
            return
        self._purged_at = time.monotonic()
        self.stats.purged += self._seen.purge(datetime.now(UTC))


def _keep_times(topics: Iterable[str], keep_ids_for: timedelta | None) -> Mapping[str, timedelta]:
    """How long handled ids are kept per topic: ``keep_ids_for``, else the topic's retention (as configured)."""
    if keep_ids_for is not None:
        return dict.fromkeys(topics, keep_ids_for)
    from sightline.common.retention import topic_specs

    retention = {spec.name: spec.retention_ms for spec in topic_specs()}
    return {topic: timedelta(milliseconds=retention[topic]) for topic in topics}
