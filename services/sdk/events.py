"""Events as a subscriber hands them over: the payload decoded by its ``ce_type``, with its CloudEvents attributes.

Every record Sightline publishes carries CloudEvents attributes as Kafka headers (binary content mode,
``common/cloudevents.py``, docs/integrators.md). ``decode`` reads them and parses the payload as the protobuf
message ``ce_type`` names (``sightline.v1.Decision`` ...), so a handler gets ``event.message`` already typed;
``event.payload(Decision)`` narrows it for a type checker. The audit topic's signed checkpoints are JSON
(``ce_type`` ``sightline.v1.AuditCheckpoint``): their ``message`` is None and ``json_data()`` reads them. A record
without attributes (written by something other than Sightline) is read as its topic's event, with an id made of its
partition and offset, which identifies a redelivery but not a republication.
"""

from __future__ import annotations

import builtins
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

from google.protobuf.message import Message

from sightline.common import codec
from sightline.common.cloudevents import CHECKPOINT_TYPE, JSON, attributes_of
from sightline.common.topics import ALL_TOPICS, by_name
from sightline.sdk.errors import MalformedRecord

M = TypeVar("M", bound=Message)
TRACE_HEADERS = ("traceparent", "tracestate")  # the CloudEvents distributed-tracing extension


class KafkaRecord(Protocol):
    """What ``decode`` reads of a consumed record (kafka-python's ``ConsumerRecord`` has it)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Any  # a list of (name, bytes) pairs


@dataclass(frozen=True)
class CloudEventAttributes:
    """The CloudEvents 1.0 attributes of a record; strings are "" when the record carries none."""

    id: str
    source: str
    type: str
    specversion: str
    time: datetime | None
    datacontenttype: str
    dataschema: str
    extensions: Mapping[str, str] = field(default_factory=dict)  # traceparent, tracestate


@dataclass(frozen=True)
class Event:
    """One event read from a topic.

    ``id`` is what deduplication keys on (``ce_id``, unique within the topic). ``redelivered`` is True when a
    handler was already given this event and did not return (the subscriber stopped or the handler raised): its
    effects may have happened, so a handler with effects outside Sightline makes them idempotent for such events.
    """

    topic: str
    partition: int
    offset: int
    key: str | None
    timestamp_ms: int  # the record's Kafka timestamp (when it was published)
    attributes: CloudEventAttributes
    message: Message | None  # the decoded payload; None for JSON payloads and types this SDK does not know
    data: bytes = field(repr=False)
    redelivered: bool = False

    @property
    def id(self) -> str:
        return self.attributes.id or f"{self.partition}:{self.offset}"

    @property
    def type(self) -> str:
        return self.attributes.type

    def payload(self, kind: builtins.type[M]) -> M:
        """The message as ``kind`` (``event.payload(Alert)``); TypeError when the event is of another type."""
        if not isinstance(self.message, kind):
            raise TypeError(f"event {self.id} on {self.topic} is a {self.type or 'record'}, not a {kind.__name__}")
        return self.message

    def json_data(self) -> Any:
        """The payload of a JSON event (an audit checkpoint); ValueError for a protobuf one."""
        if self.attributes.datacontenttype != JSON:
            raise ValueError(f"event {self.id} is {self.attributes.datacontenttype or 'binary'}, not JSON")
        return json.loads(self.data)

    def as_redelivered(self) -> Event:
        return replace(self, redelivered=True)

    def to_dict(self, *, elide_biometrics: bool = True) -> dict[str, Any]:
        """The event in the CloudEvents JSON format (``jsonformat.py``)."""
        from sightline.sdk.jsonformat import event_to_dict

        return event_to_dict(self, elide_biometrics=elide_biometrics)

    def to_json(self, *, elide_biometrics: bool = True) -> str:
        from sightline.sdk.jsonformat import event_to_json

        return event_to_json(self, elide_biometrics=elide_biometrics)


@functools.cache
def message_types() -> dict[str, type[Message]]:
    """Every event type on Sightline's topics by its protobuf full name (the ``ce_type`` values)."""
    return {cls.DESCRIPTOR.full_name: cls for cls in (codec.event_class(spec) for spec in ALL_TOPICS)}


def decode(record: KafkaRecord) -> Event:
    """The event a consumed record carries; MalformedRecord when its payload is not the type it claims."""
    found = attributes_of(record.headers)
    attributes = _attributes(found, record.headers)
    data = record.value or b""
    key = record.key.decode("utf-8", errors="replace") if record.key is not None else None
    event = Event(record.topic, record.partition, record.offset, key, record.timestamp, attributes, None, data)
    if attributes.datacontenttype == JSON or attributes.type == CHECKPOINT_TYPE:
        return event
    kind = message_types().get(attributes.type) if attributes.type else _topic_type(record.topic)
    if kind is None:
        return event  # a type newer than this SDK: handed over with its raw payload
    try:
        return replace(event, message=codec.parse(kind, data))
    except codec.MalformedEvent as error:
        raise MalformedRecord(f"{record.topic}[{record.partition}]@{record.offset}: {error}") from None


def _attributes(found: dict[str, str], headers: Any) -> CloudEventAttributes:
    extensions = {}
    for name, raw in headers or ():
        if name in TRACE_HEADERS:
            extensions[name] = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return CloudEventAttributes(
        id=found.get("id", ""),
        source=found.get("source", ""),
        type=found.get("type", ""),
        specversion=found.get("specversion", ""),
        time=_time(found.get("time", "")),
        datacontenttype=found.get("datacontenttype", ""),
        dataschema=found.get("dataschema", ""),
        extensions=extensions,
    )


def _time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _topic_type(topic: str) -> type[Message] | None:
    try:
        return codec.event_class(by_name(topic))
    except KeyError:
        return None
