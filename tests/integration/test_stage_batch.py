"""A real stage (``Stage`` on the faust app of ``streams.py``, in its own worker process: test_delivery.py's probe)
against the session's real broker: what one batch of inputs becomes on the topics.

One bad input of a batch is dead-lettered and the others are delivered, in their order; an input whose output is
too large is dead-lettered whole; every record sent for an input, outputs and dead letters alike, carries a child of
the input's trace context and the input's capture-time header; the stage observes its end-to-end latency from that
header once per delivered input, and never for an input without it.
"""

from __future__ import annotations

import hashlib
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from test_delivery import INPUT, OUTPUT, Probe, probe_factory  # noqa: F401 - probe_factory: a fixture, shared

from sightline.common.bus import read_topics
from sightline.common.config import KafkaSettings
from sightline.common.stage import CAPTURED_AT_HEADER
from sightline.common.topics import DEADLETTER
from sightline.tooling.broker import free_port
from sightline.v1 import events_pb2

TRACE_ID, PARENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
CAPTURED_MS = str(int((time.time() - 5) * 1000)).encode()  # five seconds before the test: the latency is at least that


def headers(value: str) -> list[tuple[str, bytes]]:
    """The input's headers: a trace context always; the capture time unless the value says "plain" or "odd"."""
    sent = [("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01".encode())]
    if value.startswith("odd"):
        sent.append((CAPTURED_AT_HEADER, b"soon"))  # not epoch milliseconds: neither copied on nor observed
    elif not value.startswith("plain"):
        sent.append((CAPTURED_AT_HEADER, CAPTURED_MS))
    return sent


def records(kafka: KafkaSettings, topic: str, since_ms: int) -> list[Any]:
    return list(read_topics(kafka, [topic], since_ms, idle_timeout_s=0.5))


def metric(port: int, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("service") == "probe"
    )


def test_a_batch_through_a_real_stage(kafka: KafkaSettings, probe_factory: Callable[..., Probe]) -> None:
    port = free_port()
    probe = probe_factory(
        kafka,
        "stage",
        PROBE_METRICS_PORT=str(port),
        PROBE_MAX_BATCH="16",
        PROBE_BATCH_WAIT_S="0.5",
        SIGHTLINE_TRACING_EXPORTER="none",
    )
    since_ms = int(time.time() * 1000)
    values = ["one", "bad-two", "pair-three", "big-four", "plain-five", "odd-six", "last-seven"]
    futures = {v: probe.producer.send(INPUT.name, key=b"k", value=v.encode(), headers=headers(v)) for v in values}
    probe.producer.flush(timeout=10)
    sent = {value: future.get(timeout=10) for value, future in futures.items()}  # partition and offset of each

    # Delivered, in their order (one key, one partition), the failed and the oversize input leaving nothing here.
    expected = ["one", "pair-three/1", "pair-three/2", "plain-five", "odd-six", "last-seven"]
    deadline = time.monotonic() + 30
    while len(outputs := records(kafka, OUTPUT.name, since_ms)) < len(expected) and time.monotonic() < deadline:
        assert probe.process.poll() is None, "the probe stage exited"
    assert [r.value.decode() for r in outputs] == expected
    letters = [
        r
        for r in records(kafka, DEADLETTER.name, since_ms)
        if events_pb2.DeadLetter.FromString(r.value).stage == "probe"
    ]
    by_reason = {events_pb2.DeadLetter.FromString(r.value).reason: r for r in letters}
    assert sorted(by_reason) == ["output_too_large", "probe_refused"] and len(letters) == 2

    refused = events_pb2.DeadLetter.FromString(by_reason["probe_refused"].value)
    assert (refused.error, refused.frame_id, refused.input_topic, refused.input_key) == (
        "the probe refuses bad-two",
        "bad-two",
        INPUT.name,
        b"k",
    )
    assert (refused.input_partition, refused.input_offset) == (sent["bad-two"].partition, sent["bad-two"].offset)
    assert refused.payload_sha256 == hashlib.sha256(b"bad-two").digest() and refused.payload_size == len(b"bad-two")
    assert refused.payload_withheld and not refused.payload, "not one of Sightline's events: never copied"
    too_large = events_pb2.DeadLetter.FromString(by_reason["output_too_large"].value)
    assert too_large.input_offset == sent["big-four"].offset and "SIGHTLINE_KAFKA_MAX_MESSAGE_BYTES" in too_large.error

    # Every record carries a child of its input's trace context, and its input's capture time when it had one.
    by_offset = {metadata.offset: value for value, metadata in sent.items()}
    for record in [*outputs, *letters]:
        carried = dict(record.headers or [])
        version, trace_id, span_id, flags = carried["traceparent"].decode().split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01") and span_id != PARENT_SPAN, carried
        if record.topic == DEADLETTER.name:  # its input, by the reference it carries
            source = by_offset[events_pb2.DeadLetter.FromString(record.value).input_offset]
        else:  # an output is named after its input
            source = record.value.decode().split("/")[0]
        plain = source.startswith(("plain", "odd"))
        assert carried.get(CAPTURED_AT_HEADER) == (None if plain else CAPTURED_MS), (source, carried)

    # Latency: once per delivered input with the header (one, pair-three, last-seven), never for the others.
    until = time.monotonic() + 10
    while metric(port, "sightline_capture_to_stage_seconds_count") < 3 and time.monotonic() < until:
        time.sleep(0.1)
    assert metric(port, "sightline_capture_to_stage_seconds_count") == 3
    assert metric(port, "sightline_capture_to_stage_seconds_sum") >= 3 * 5.0
    # The inputs went through in batches, not one by one: the failures were isolated within a batch.
    batches = metric(port, "sightline_stage_latency_seconds_count") - 1  # the warm-up came alone
    assert 1 <= batches < len(values), batches
