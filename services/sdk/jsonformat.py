"""JSON for integrators without protobuf: any Sightline message in the protobuf JSON mapping, any event in the
CloudEvents JSON format (structured content mode).

``event_to_dict`` gives the event's CloudEvents attributes at the top level (``specversion``, ``id``, ``source``,
``type``, ``time``, ``dataschema``), ``datacontenttype: application/json``, the Kafka key as the partitioning
extension's ``partitionkey``, the trace context as the distributed-tracing extension's ``traceparent`` and
``tracestate``, and the payload as ``data``: the message through ``google.protobuf.json_format`` (field names as in
the protos, enums by name, 64-bit integers as strings, timestamps in RFC 3339), or the JSON payload itself (audit
checkpoints). That is what an HTTP receiver of CloudEvents (``application/cloudevents+json``) expects.

Images, face chips, failed payloads and descriptors are biometric data: by default (``elide_biometrics``) they are
replaced by their size, as ``sightline watch --json`` shows them. Pass ``elide_biometrics=False`` only where the
receiver is entitled to them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

if TYPE_CHECKING:
    from sightline.sdk.events import CloudEventAttributes, Event

BIOMETRIC_FIELDS = frozenset({"image", "chip", "payload", "vector"})  # frames, chips, dead-lettered inputs, descriptors
CLOUDEVENTS_JSON = "application/cloudevents+json"  # the media type of one event in the JSON format


def message_to_dict(message: Message, *, elide_biometrics: bool = True) -> dict[str, Any]:
    """A message in the protobuf JSON mapping, proto field names kept; biometric fields as their size when elided."""
    data = MessageToDict(message, preserving_proto_field_name=True)
    return _elided(data) if elide_biometrics else data


def event_to_dict(event: Event, *, elide_biometrics: bool = True) -> dict[str, Any]:
    """The event in the CloudEvents JSON format (see the module docstring); attributes the record lacks are left
    out, except the required ones, which are derived from the record."""
    # Here, not at the top: rendering messages alone (the CLI) need not load the CloudEvents machinery.
    from sightline.common.cloudevents import JSON, SPECVERSION

    attributes = event.attributes
    if event.message is not None:
        data: Any = message_to_dict(event.message, elide_biometrics=elide_biometrics)
    elif attributes.datacontenttype == JSON:
        data = event.json_data()
    else:
        data = None  # a type this SDK does not know: its bytes go as `data_base64`, only when not eliding
    document: dict[str, Any] = {
        "specversion": attributes.specversion or SPECVERSION,
        "id": event.id,
        "source": attributes.source or f"/kafka/{event.topic}",
        "type": attributes.type or (event.message.DESCRIPTOR.full_name if event.message is not None else ""),
        "time": _rfc3339(attributes),
        "datacontenttype": JSON if data is not None else attributes.datacontenttype,
        "dataschema": attributes.dataschema,
        "partitionkey": event.key,
        **attributes.extensions,
    }
    document = {name: value for name, value in document.items() if value}
    if data is not None:
        document["data"] = data
    elif event.data and not elide_biometrics:  # an unknown payload may hold anything
        import base64

        document["data_base64"] = base64.b64encode(event.data).decode("ascii")
    return document


def event_to_json(event: Event, *, elide_biometrics: bool = True) -> str:
    """``event_to_dict`` as one line of JSON."""
    return json.dumps(event_to_dict(event, elide_biometrics=elide_biometrics), separators=(",", ":"))


def _rfc3339(attributes: CloudEventAttributes) -> str:
    if attributes.time is None:
        return ""
    return attributes.time.isoformat().replace("+00:00", "Z")


def _elided(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: (_size_of(value) if key in BIOMETRIC_FIELDS else _elided(value)) for key, value in data.items()}
    if isinstance(data, list):
        return [_elided(value) for value in data]
    return data


def _size_of(value: Any) -> str:
    if isinstance(value, list):
        return f"<{len(value)} values>"
    return f"<{len(value) * 3 // 4 - value[-2:].count('=')} bytes>"  # base64: 4 characters per 3 bytes, padded
