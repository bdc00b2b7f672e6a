"""At-least-once delivery when the producer fails, not only when a process is killed.

A real stage (``Stage`` on the faust app of ``streams.py``, in its own worker process) consumes a real Tansu broker
through a small Kafka-aware TCP proxy. The proxy can make the broker go away for produce requests only: the
connection carrying a Produce request is dropped, while fetches, heartbeats and offset commits still go through.
That is the case where committing before the broker acknowledged the outputs loses them for good (Tansu's memory
storage loses everything when the broker process itself dies, so killing it could not show the difference).

Also here: an output larger than the producer may send dead-letters its input (none of its outputs go out) and the
stage goes on; ``ensure_topics`` creates every topic with a ``max.message.bytes`` that fits what producers may send.

This file is also the worker process the tests start: ``python test_delivery.py MODE`` runs one probe stage.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sightline.common.config import KafkaSettings
from sightline.common.topics import DEADLETTER, DataClass, TopicSpec
from sightline.tooling.broker import LocalBroker, free_port, tansu_binary

if TYPE_CHECKING:
    from sightline.common.stage import EventProcessor

INPUT = TopicSpec("probe.delivery.in", "Probe", DataClass.OPERATIONAL, 3_600_000, "test", ("probe",))
OUTPUT = TopicSpec("probe.delivery.out", "Probe", DataClass.OPERATIONAL, 3_600_000, "probe", ())
PRODUCE, CREATE_TOPICS = 0, 19  # Kafka API keys
GROUP = "sightline-probe"  # faust's group id: the app id, "sightline-" + the service name
STAGE_CLIENT = b"faust"  # faust's client id (broker_client_id) starts so; kafka-python's does not


# -- a Kafka-aware proxy: the broker as the stage sees it ------------------------------------------------------


class KafkaProxy:
    """Forwards 127.0.0.1:port to the broker; can drop every connection on which one client (told apart by the
    client id in its request headers) sends a Produce request; records the CreateTopics requests it forwards."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self._upstream = upstream_port
        self._blocked_client: bytes | None = None
        self.create_topics_requests: list[bytes] = []
        self.produce_refused = 0
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def block_produce(self, client_id_prefix: bytes) -> None:
        self._blocked_client = client_id_prefix

    def allow_produce(self) -> None:
        self._blocked_client = None

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client to broker, one request at a time: 4-byte size, then api_key (int16), version, correlation id..."""
        try:
            while (header := _read(client, 4)) is not None and (body := _read(client, struct.unpack(">i", header)[0])):
                api_key = struct.unpack(">h", body[:2])[0]
                if api_key == PRODUCE and self._blocks(body):
                    self.produce_refused += 1
                    break  # the broker is gone, as far as this producer can tell
                if api_key == CREATE_TOPICS:
                    self.create_topics_requests.append(body)
                upstream.sendall(header + body)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def _blocks(self, body: bytes) -> bool:
        """Whether the request comes from the blocked client: header = api key, version, correlation id (8 bytes),
        then the client id as an int16-length string."""
        blocked = self._blocked_client
        (length,) = struct.unpack(">h", body[8:10])
        return blocked is not None and body[10 : 10 + max(length, 0)].startswith(blocked)

    @staticmethod
    def _responses(upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)


def _read(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


class ProxiedBroker(LocalBroker):
    """A private Tansu that tells its clients to reach it through the proxy (its advertised listener)."""

    def __init__(self) -> None:
        super().__init__()
        self.proxy = KafkaProxy(self.port)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def command(self) -> list[str]:
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.proxy.port}",
            "--storage-engine",
            "memory://tansu/",
        ]

    def stop(self) -> None:
        super().stop()
        self.proxy.close()


# -- the probe stage, run in its own worker process -------------------------------------------------------------


def probe_processor(mode: str) -> EventProcessor:
    """The probe stage's processor: the input's value back on the output topic, after a little work. In "stage" mode
    (tests/integration/test_stage_batch.py) an input starting "bad" fails, "pair" gives two outputs, "big" one too
    large."""
    from sightline.common.stage import EventProcessor, InputEvent, Output, StageError

    limit = KafkaSettings().max_message_bytes
    database = os.environ.get("PROBE_DATABASE", "")

    class ProbeProcessor(EventProcessor):
        def process_event(self, event: InputEvent) -> list[Output]:
            time.sleep(float(os.environ.get("PROBE_DELAY_S", "0")))
            value = event.value or b""
            if mode in ("oversize", "stage") and value.startswith(b"big"):
                return [Output(OUTPUT, b"k", value), Output(OUTPUT, b"k", b"x" * (limit + 1))]
            if mode == "stage" and value.startswith(b"bad"):
                raise StageError("probe_refused", f"the probe refuses {value.decode()}", frame_id=value.decode())
            if mode == "stage" and value.startswith(b"pair"):
                return [
                    Output(OUTPUT, event.key or b"", value + b"/1"),
                    Output(OUTPUT, event.key or b"", value + b"/2"),
                ]
            if mode == "sqlite":
                with sqlite3.connect(database, timeout=0) as conn:  # no busy wait: a held lock fails at once
                    conn.execute("INSERT INTO seen VALUES (?)", (value.decode(),))
            return [Output(OUTPUT, event.key or b"", value)]

    return ProbeProcessor()


def run_probe(mode: str) -> None:
    """A stage worker as run_service runs one (minus the gRPC server): faust app, the Stage, a faust Worker."""
    import logging
    import tempfile

    import faust

    from sightline.common import telemetry, tracing
    from sightline.common.stage import Stage
    from sightline.common.streams import faust_app

    telemetry.configure_logging("probe", "INFO")
    if port := os.environ.get("PROBE_METRICS_PORT"):  # what run_service starts too: the stage's metrics
        telemetry.start_metrics(int(port))
        tracing.setup_tracing("probe")  # and spans of its own, children of the inputs' contexts
    timeout = float(os.environ.get("PROBE_PRODUCER_TIMEOUT_S", "30"))
    app = faust_app(
        "probe", KafkaSettings(), datadir=tempfile.mkdtemp(prefix="probe-faust-"), producer_request_timeout=timeout
    )
    stage = Stage(
        "probe",
        INPUT,
        [OUTPUT],
        probe_processor(mode),
        max_batch=int(os.environ.get("PROBE_MAX_BATCH", "1")),
        batch_wait_s=float(os.environ.get("PROBE_BATCH_WAIT_S", "0")),
    )  # the default backoff
    stage.attach(app)
    worker = faust.Worker(app, loglevel=logging.INFO, override_logging=False, redirect_stdouts=False, quiet=True)
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit:
        pass


# -- fixtures and helpers -----------------------------------------------------------------------------------------


@pytest.fixture()
def proxied() -> Iterator[ProxiedBroker]:
    broker = ProxiedBroker()
    broker.start()
    yield broker
    broker.stop()


def settings_for(broker: ProxiedBroker, **overrides: object) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        fetch_max_wait_ms=25,
        default_partitions=1,
        **overrides,
    )  # type: ignore[arg-type]


class Probe:
    """The probe stage's worker process, its input producer and a reader of what it published."""

    def __init__(self, kafka: KafkaSettings, mode: str, log: Path, **env: str) -> None:
        from sightline.common.bus import ensure_topics, make_producer

        ensure_topics(kafka, [INPUT, OUTPUT, DEADLETTER])
        self.kafka = kafka
        self.producer = make_producer(kafka)
        variables = {
            **os.environ,
            "SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "SIGHTLINE_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "SIGHTLINE_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
            "SIGHTLINE_KAFKA_FETCH_MAX_WAIT_MS": "25",
            "SIGHTLINE_KAFKA_MAX_MESSAGE_BYTES": str(kafka.max_message_bytes),
            **env,
        }
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, __file__, mode], env=variables, stdout=self._log, stderr=subprocess.STDOUT
        )

    def send(self, *values: str) -> None:
        for value in values:
            self.producer.send(INPUT.name, key=b"k", value=value.encode()).get(timeout=10)

    def published(self, topic: str) -> list[bytes]:
        from sightline.common.bus import read_topics

        return [record.value for record in read_topics(self.kafka, [topic], idle_timeout_s=0.5)]

    def wait_for(self, values: set[str], timeout_s: float) -> set[str]:
        """The values seen on the output topic once all of ``values`` are there or the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {value.decode() for value in self.published(OUTPUT.name) if len(value) < 100}
            if values <= seen or time.monotonic() > deadline:
                return seen
            assert self.process.poll() is None, "the probe stage exited"
            time.sleep(0.3)

    def committed(self) -> int:
        """The group's committed offset on the input topic (0 when none yet)."""
        from kafka import KafkaAdminClient, TopicPartition

        from sightline.common.bus import client_options

        admin = KafkaAdminClient(**client_options(self.kafka))
        try:
            offsets = admin.list_group_offsets({GROUP: [TopicPartition(INPUT.name, 0)]}).get(GROUP, {})
        finally:
            admin.close()
        return max([meta.offset for meta in offsets.values()] + [0])  # -1: nothing committed yet

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.producer.close()
        self._log.close()


@pytest.fixture()
def probe_factory(tmp_path: Path) -> Iterator[Callable[..., Probe]]:
    started: list[Probe] = []

    def start(kafka: KafkaSettings, mode: str, **env: str) -> Probe:
        log = tmp_path / f"probe-{len(started)}.log"
        probe = Probe(kafka, mode, log, **env)
        started.append(probe)
        probe.send("warm-up")  # the worker has joined its group and processes once this comes out
        assert "warm-up" in probe.wait_for({"warm-up"}, 60), log.read_text()[-3000:]
        return probe

    yield start
    for probe in started:
        probe.close()


# -- tests ----------------------------------------------------------------------------------------------------------


def test_outputs_the_broker_could_not_take_are_sent_again_and_nothing_is_committed_before(
    proxied: ProxiedBroker, probe_factory: Callable[..., Probe]
) -> None:
    # Produce requests expire after 2 s: with the broker unreachable for longer, every record in flight fails.
    probe = probe_factory(settings_for(proxied), "echo", PROBE_DELAY_S="0.05", PROBE_PRODUCER_TIMEOUT_S="2")
    values = [f"event-{i:03d}" for i in range(40)]
    probe.send(*values[:10])
    assert set(values[:10]) <= probe.wait_for(set(values[:10]), 20)

    proxied.proxy.block_produce(STAGE_CLIENT)  # the stage's producer only: the test's own still gets through
    probe.send(*values[10:])
    time.sleep(6)  # three producer timeouts: the stage has processed all 30 and none could be delivered
    blocked_commit, delivered = probe.committed(), len(probe.published(OUTPUT.name))
    proxied.proxy.allow_produce()

    seen = probe.wait_for(set(values), 30)
    assert proxied.proxy.produce_refused > 0, "the broker was never unreachable for the stage's producer"
    assert set(values) <= seen, f"outputs lost: {sorted(set(values) - seen)}"
    # The warm-up and the first ten were delivered and may be committed; nothing after them while nothing arrived.
    assert blocked_commit <= delivered == 11, (blocked_commit, delivered)
    assert probe.published(DEADLETTER.name) == [], "a broker outage is not the input's fault"


def test_a_stage_stopped_while_its_outputs_cannot_be_delivered_commits_none_and_its_successor_replays_them(
    proxied: ProxiedBroker, probe_factory: Callable[..., Probe]
) -> None:
    kafka = settings_for(proxied)
    probe = probe_factory(kafka, "echo", PROBE_PRODUCER_TIMEOUT_S="2")
    values = [f"event-{i:03d}" for i in range(10)]
    proxied.proxy.block_produce(STAGE_CLIENT)
    probe.send(*values)
    time.sleep(3)  # the first delivery has failed and is being retried
    probe.close()  # SIGTERM in the middle of the retries
    assert probe.process.returncode == 0, "a stage waiting for the broker still stops cleanly, and soon"
    assert probe.committed() <= 1, "only the warm-up, whose output was delivered, may be committed"
    proxied.proxy.allow_produce()

    successor = probe_factory(kafka, "echo")  # the same group: it starts from the committed offset
    seen = successor.wait_for(set(values), 30)
    assert set(values) <= seen, f"outputs lost: {sorted(set(values) - seen)}"


def test_an_output_too_large_to_send_dead_letters_its_input_and_the_stage_goes_on(
    proxied: ProxiedBroker, probe_factory: Callable[..., Probe]
) -> None:
    from sightline.v1 import events_pb2

    probe = probe_factory(settings_for(proxied, max_message_bytes=1024 * 1024), "oversize")
    probe.send("before", "big-one", "after")
    seen = probe.wait_for({"before", "after"}, 20)
    assert {"before", "after"} <= seen and "big-one" not in seen, "none of an oversize input's outputs is sent"
    (letter,) = [events_pb2.DeadLetter.FromString(v) for v in probe.published(DEADLETTER.name)]
    assert letter.reason == "output_too_large" and letter.stage == "probe" and letter.input_offset == 2
    assert "SIGHTLINE_KAFKA_MAX_MESSAGE_BYTES" in letter.error
    # Not one of Sightline's events: no copy, only what identifies it.
    assert letter.payload_withheld and not letter.payload and letter.payload_size == len(b"big-one")


def test_topics_are_created_with_a_max_message_bytes_that_fits_what_producers_send(proxied: ProxiedBroker) -> None:
    from sightline.common.bus import TOPIC_MESSAGE_HEADROOM, ensure_topics
    from sightline.common.retention import topic_specs

    kafka = settings_for(proxied, max_message_bytes=8 * 1024 * 1024)
    ensure_topics(kafka)
    # Tansu accepts and ignores topic configs (and describes none), so the request on the wire is what is checked.
    requests = proxied.proxy.create_topics_requests
    expected = str(8 * 1024 * 1024 + TOPIC_MESSAGE_HEADROOM).encode()
    for spec in topic_specs():
        (request,) = [r for r in requests if spec.name.encode() in r]
        assert _config_value(request, b"max.message.bytes") == expected, spec.name
        assert _config_value(request, b"retention.ms") == str(spec.retention_ms).encode(), spec.name


def _config_value(request: bytes, name: bytes) -> bytes:
    """The value of a topic config in a CreateTopics request: the string (int16 length, or unsigned varint length
    + 1 in the compact form of v5+) right after the config's name."""
    at = request.index(name) + len(name)
    if request[at - len(name) - 2 : at - len(name)] == struct.pack(">h", len(name)):
        (length,) = struct.unpack(">h", request[at : at + 2])
        return request[at + 2 : at + 2 + length]
    return request[at + 1 : at + request[at]]


if __name__ == "__main__":
    run_probe(sys.argv[1])
