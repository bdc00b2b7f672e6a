"""CloudEvents attributes on every record Sightline publishes (binary content mode of the Kafka protocol binding).

Each record on a Sightline topic carries, beside its trace context (``traceparent``, ``tracestate``) and capture time:

- ``ce_specversion``: ``1.0``
- ``ce_id``: the event's own stable identity, derived from the event (``EventRule.identity``): the same event
  published again, by a replay or a retry, has the same id, so a reader deduplicates on it. Unique within its topic
  (and within its ``ce_type``); ``EventRule.id_doc`` says how each type's id is made.
- ``ce_source``: ``<source_prefix>/<service>``, the Sightline service that produced the event (``/sightline/audit``
  for the audit trail, whose writers are several).
- ``ce_type``: the protobuf full name of the payload (``sightline.v1.Decision``).
- ``ce_time``: when the event happened (its own timestamp: a frame's capture, a decision's ``decided_at``...), else
  when it was published.
- ``content-type``: ``application/protobuf`` (``application/json`` for the audit topic's signed checkpoints).
- ``ce_dataschema``: ``<dataschema_base><proto file>``, e.g. ``urn:sightline:protos:sightline/v1/events.proto``.

The headers are made here only, by ``with_event_headers``, which both publishing paths call: the kafka-python
producer of ``bus.make_producer`` (capture, the publishers of alerts, sessions, erasures and audit records) and the
stream stages (``stage.py``). They are built with the ``cloudevents`` package's Kafka binding. A record that already
carries ``ce_`` attributes (one forwarded as it was) keeps them; a value that is not its topic's event (a test's
garbage record), or an event without an id of its own, gets none: there is no event to describe.
protos/asyncapi.yaml documents the same attributes, generated from ``RULES`` (``sightline.tooling.asyncapi``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from cloudevents.core.bindings import kafka as kafka_binding
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common import codec
from sightline.common.config import SightlineSettings
from sightline.common.topics import ALL_TOPICS, AUDIT, TopicSpec
from sightline.v1 import audit_pb2, events_pb2, session_pb2

log = logging.getLogger(__name__)

SPECVERSION = "1.0"
PROTOBUF = "application/protobuf"
JSON = "application/json"
PACKAGE = "sightline.v1"
CHECKPOINT_TYPE = f"{PACKAGE}.AuditCheckpoint"  # the audit topic's signed checkpoints: JSON, not a protobuf message
AUDIT_SOURCE = "audit"  # ce_source of the audit topic: its records come from every service that audits
# Header names as the binding writes them, for readers and tests.
SPEC_HEADER = "ce_specversion"
CONTENT_TYPE_HEADER = "content-type"

# The binding writes data bytes as they are; the JSON format is only its way to the payload (never used on it).
_FORMAT = JSONFormat()


class CloudEventsSettings(SightlineSettings):
    """The deployment-specific parts of the CloudEvents attributes (``SIGHTLINE_CLOUDEVENTS_*``); every service."""

    config_section: ClassVar[str] = "cloudevents"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_CLOUDEVENTS_", extra="ignore")

    source_prefix: str = Field(
        "/sightline",
        min_length=1,
        description="Start of ce_source (a URI reference), followed by /<service>; set one per installation, e.g. "
        "//border.example.org/sightline, when integrators read several. Changing it changes the events' identity "
        "for readers that deduplicate on (ce_source, ce_id).",
    )
    dataschema_base: str = Field(
        "urn:sightline:protos:",
        min_length=1,
        description="Start of ce_dataschema (a URI), followed by the payload's proto file (sightline/v1/events.proto): "
        "e.g. the address where this release's protos/ folder is published.",
    )


@functools.cache
def _settings() -> CloudEventsSettings:
    return CloudEventsSettings()


# Each takes the event as its concrete message class (Alert, SessionEvent...): the rule is looked up by its type.
Identity = Callable[[Any], str]
When = Callable[[Any], Timestamp | None]
Producer = Callable[[Any], str]


@dataclass(frozen=True)
class EventRule:
    """How one event type's attributes are derived from the event itself."""

    identity: Identity  # ce_id; "" when the event has no identity (then no attributes are attached)
    id_doc: str  # how ce_id is made, for the AsyncAPI document and the integrator guide
    time: When  # the event's own time, None when unset (ce_time is then the publishing time)
    source: Producer | None = None  # the producing service, when the topic has several; else the topic's producer
    source_doc: str = ""  # which services ``source`` names, for the AsyncAPI document (with ``source``)


def _stamp(field: str) -> When:
    def read(event: Message) -> Timestamp | None:
        stamp: Timestamp = getattr(event, field)
        return stamp if event.HasField(field) else None

    return read


def _frame_id(event: events_pb2.FacesDetected) -> str:  # any event with a FrameRef `frame`
    return event.frame.frame_id


def _frame_time(event: events_pb2.FrameCaptured) -> Timestamp | None:
    return event.frame.captured_at if event.frame.HasField("captured_at") else None


def _alert_id(event: events_pb2.Alert) -> str:
    status = codec.enum_label(events_pb2.AlertStatus, event.status, "ALERT_STATUS_")
    return f"{event.alert_id}:{status}" if event.alert_id else ""


def _alert_time(event: events_pb2.Alert) -> Timestamp | None:
    # A status change (a review) happens when it is published: raised_at is the time of the raise only.
    pending = event.status == events_pb2.ALERT_STATUS_PENDING_REVIEW
    return event.raised_at if pending and event.HasField("raised_at") else None


def _session_kind(event: session_pb2.SessionEvent) -> str:
    return codec.enum_label(session_pb2.SessionEvent.Kind, event.kind, "KIND_")


def _session_id(event: session_pb2.SessionEvent) -> str:
    if not event.session_id:
        return ""
    kind = _session_kind(event)
    if kind == "PROGRESS":  # published once per change of the frames seen: the count tells one from the next
        return f"{event.session_id}:{kind}:{event.update.frames_seen}"
    return f"{event.session_id}:{kind}"


def _session_source(event: session_pb2.SessionEvent) -> str:
    return "decision" if _session_kind(event) in ("PROGRESS", "DECIDED") else "capture"  # desk.OWN_KINDS


def _erasure_id(event: events_pb2.SubjectErased) -> str:
    return f"{event.subject_id}:{event.erased_at.ToJsonString()}" if event.subject_id else ""


def _dead_letter_id(event: events_pb2.DeadLetter) -> str:
    if event.input_partition < 0:  # capture's inputs are files and streams, referenced by source and sequence
        return f"{event.stage}:{event.frame_id or f'{event.input_topic}:{event.input_offset}'}"
    return f"{event.stage}:{event.input_topic}:{event.input_partition}:{event.input_offset}"


def _dead_letter_source(event: events_pb2.DeadLetter) -> str:
    return event.stage


def _decision_id(event: events_pb2.Decision) -> str:
    return event.decision_id


def _audit_id(event: audit_pb2.AuditRecord) -> str:
    return event.hash


def _audit_source(_event: audit_pb2.AuditRecord) -> str:
    return AUDIT_SOURCE


FRAME_ID_DOC = "the frame id (FrameRef.frame_id: source, ingest run and sequence)"

# Keyed by protobuf full name; tests/unit/test_event_headers.py checks that every topic's event has one.
RULES: dict[str, EventRule] = {
    f"{PACKAGE}.FrameCaptured": EventRule(_frame_id, FRAME_ID_DOC, _frame_time),
    f"{PACKAGE}.FacesDetected": EventRule(_frame_id, FRAME_ID_DOC, _stamp("detected_at")),
    f"{PACKAGE}.FacesEmbedded": EventRule(_frame_id, FRAME_ID_DOC, _stamp("embedded_at")),
    f"{PACKAGE}.MatchResult": EventRule(_frame_id, FRAME_ID_DOC, _stamp("matched_at")),
    f"{PACKAGE}.Decision": EventRule(
        _decision_id, "the decision id (derived from the frame id, face index and policy version)", _stamp("decided_at")
    ),
    f"{PACKAGE}.Alert": EventRule(
        _alert_id, "<alert id>:<status>: PENDING_REVIEW when raised, CONFIRMED or REJECTED after review", _alert_time
    ),
    f"{PACKAGE}.SessionEvent": EventRule(
        _session_id,
        "<session id>:<kind> (OPENED, CLOSED, CANCELLED, DECIDED); <session id>:PROGRESS:<frames seen> for progress",
        _stamp("at"),
        _session_source,
        "capture for OPENED, CLOSED and CANCELLED; decision for PROGRESS and DECIDED",
    ),
    f"{PACKAGE}.SubjectErased": EventRule(_erasure_id, "<subject id>:<erased_at, RFC 3339>", _stamp("erased_at")),
    f"{PACKAGE}.DeadLetter": EventRule(
        _dead_letter_id,
        "<stage>:<input topic>:<partition>:<offset> of the failed input; <stage>:<frame id> for capture's own inputs",
        _stamp("failed_at"),
        _dead_letter_source,
        "the stage that failed (DeadLetter.stage: capture, detection, embedding, matching or decision)",
    ),
    f"{PACKAGE}.AuditRecord": EventRule(
        _audit_id,
        "the record's hash (hex SHA-256 of the previous record's hash and this record: unique in every chain)",
        _stamp("at"),
        _audit_source,
        "audit, whichever service wrote the record",
    ),
}
CHECKPOINT_ID_DOC = "<chain>:<sequence> of the chain head the checkpoint signs"


def with_event_headers(
    topic: str,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
    settings: CloudEventsSettings | None = None,
) -> list[tuple[str, bytes]]:
    """``headers`` followed by the CloudEvents attributes of the record ``value`` on ``topic``.

    Returns a new list (the caller's is left as it is). Unchanged when the topic is not Sightline's, when the
    headers already carry the attributes, or when the value is not the topic's event. ``settings``: the process's
    (``SIGHTLINE_CLOUDEVENTS_*``) when None.
    """
    kept = list(headers or ())
    if not value or any(key == SPEC_HEADER for key, _ in kept):
        return kept
    spec = next((spec for spec in ALL_TOPICS if spec.name == topic), None)
    if spec is None:
        return kept
    attributes = _attributes(spec, value, kept, settings or _settings())
    if attributes is None:
        return kept
    return kept + list(kafka_binding.to_binary(CloudEvent(attributes, data=value), _FORMAT).headers.items())


def _attributes(
    spec: TopicSpec, value: bytes, headers: Iterable[tuple[str, bytes]], settings: CloudEventsSettings
) -> dict[str, object] | None:
    if spec.name == AUDIT.name and _is_checkpoint(headers):
        return _checkpoint_attributes(value, settings)
    try:
        event = codec.parse(codec.event_class(spec), value)
    except codec.MalformedEvent:
        log.debug(
            "record is not its topic's event: published without CloudEvents attributes", extra={"topic": spec.name}
        )
        return None
    full_name = event.DESCRIPTOR.full_name
    rule = RULES.get(full_name)
    identity = rule.identity(event) if rule is not None else ""
    if rule is None or not identity:
        return None
    service = rule.source(event) if rule.source is not None else spec.producer
    stamp = rule.time(event)
    return {
        "id": identity,
        "source": f"{settings.source_prefix}/{service}",
        "type": full_name,
        "specversion": SPECVERSION,
        "time": stamp.ToDatetime(UTC) if stamp is not None and (stamp.seconds or stamp.nanos) else datetime.now(UTC),
        "datacontenttype": PROTOBUF,
        "dataschema": f"{settings.dataschema_base}{event.DESCRIPTOR.file.name}",
    }


def _is_checkpoint(headers: Iterable[tuple[str, bytes]]) -> bool:
    from sightline.common.audit_checkpoints import is_checkpoint  # only the audit topic has checkpoints

    return is_checkpoint(headers)


def _checkpoint_attributes(value: bytes, settings: CloudEventsSettings) -> dict[str, object] | None:
    """A signed checkpoint (JSON, audit_checkpoints.Checkpoint): its chain and sequence, its time."""
    from sightline.common.audit_checkpoints import TIME_FORMAT

    try:
        document = json.loads(value)
        identity = f"{document['chain']}:{int(document['sequence'])}"
        at = datetime.strptime(str(document["at"]), TIME_FORMAT).replace(tzinfo=UTC)
    except (ValueError, TypeError, KeyError):
        return None
    return {
        "id": identity,
        "source": f"{settings.source_prefix}/{AUDIT_SOURCE}",
        "type": CHECKPOINT_TYPE,
        "specversion": SPECVERSION,
        "time": at,
        "datacontenttype": JSON,
    }


def attributes_of(headers: Iterable[tuple[str, bytes | str]] | None) -> dict[str, str]:
    """The CloudEvents attributes a record's headers carry, by attribute name (``id``, ``type``, ...,
    ``datacontenttype``); empty when they carry none. For readers of the topics (tests, the SDK)."""
    found: dict[str, str] = {}
    for key, raw in headers or ():
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if key.startswith("ce_"):
            found[key.removeprefix("ce_")] = text
        elif key == CONTENT_TYPE_HEADER:
            found["datacontenttype"] = text
    return found
