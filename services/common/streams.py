"""The faust app every stream service runs, configured from ``KafkaSettings``.

Values are raw bytes (we speak protobuf), there is no web server, and topics are never auto-declared (they are created
with explicit partitions and retention, see topics.py).

Delivery: the producer waits for every in-sync replica (``acks=all``). faust commits only the offsets of events the
agent has acked, and flushes the producer first (faust/transport/consumer.py, ``Consumer._commit_offsets``: ``await
self.app.producer.flush()`` before ``self._commit``) -- but that flush is aiokafka's ``MessageAccumulator.flush``,
an ``asyncio.wait`` on the batches' futures, which returns when a batch *failed* as well (too large for the broker,
expired after ``producer_request_timeout``): the offsets would then be committed past a record that never arrived.
So the flush is not what at-least-once rests on: a stage acks an event only after awaiting the broker's
acknowledgement of every record it sent for it (stage.py).

faust hard-codes the consumer's fetch wait at 1.5 s. A Kafka broker answers a fetch as soon as data arrives, but
Tansu (the local broker) holds every fetch for the whole wait, which would add up to 1.5 s per stage; so the wait is a
setting (``SIGHTLINE_KAFKA_FETCH_MAX_WAIT_MS``), applied through the small subclasses below.
"""

from __future__ import annotations

import ssl
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as driver

from sightline.common.config import KafkaSettings


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by aiokafka when the consumer starts and builds its fetcher, which happens after this returns.
        # Typed as faust's AppT, self.app is a SightlineApp: only SightlineApp's transport makes this thread.
        consumer._fetch_max_wait_ms = cast(SightlineApp, self.app).fetch_max_wait_ms
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(driver.Transport):
    Consumer = _Consumer


class SightlineApp(faust.App):
    """A faust App whose consumers wait at most ``fetch_max_wait_ms`` for data."""

    fetch_max_wait_ms: int = 500

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)


def faust_app(service: str, settings: KafkaSettings, **overrides: Any) -> SightlineApp:
    app = SightlineApp(
        f"sightline-{service}",
        broker=[f"kafka://{server}" for server in settings.servers],
        broker_credentials=_credentials(settings),
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.heartbeat_interval_ms / 1000,
        producer_acks=-1,  # all in-sync replicas (faust's default too; explicit because delivery relies on it)
        producer_max_request_size=settings.max_message_bytes,
        consumer_max_fetch_size=settings.max_message_bytes,
        producer_linger=0.0,
        stream_buffer_maxsize=64,
        # Do not wait, on shutdown or rebalance, for the events agents are working on: a stage retries a transient
        # failure without limit, so the wait could last as long as a database outage, holding up the whole group's
        # rebalance. Safe for delivery: an event is acked only once its records are acknowledged (stage.py), so an
        # event left in flight is never committed and is processed again by the partition's next owner.
        stream_wait_empty=False,
        **overrides,
    )
    app.fetch_max_wait_ms = settings.fetch_max_wait_ms
    return app


def _credentials(settings: KafkaSettings) -> Any:
    context = ssl.create_default_context(cafile=str(settings.ssl_cafile)) if settings.ssl_cafile else None
    if settings.sasl_mechanism:
        password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
        return faust.SASLCredentials(
            username=settings.sasl_username or "",
            password=password,
            ssl_context=context,
            mechanism=settings.sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
