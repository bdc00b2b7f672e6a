"""Conversions between protobuf events and the numpy values the models work with.

Kept in one place so that every service builds and reads events the same way (box and landmark layout, chip bytes,
timestamps) and a malformed event fails the same way everywhere: ``MalformedEvent``. That includes an event that
parses but carries a timestamp outside ``google.protobuf.Timestamp``'s range (years 1 to 9999): protobuf itself
accepts any seconds and nanos on the wire, and converting such a value to a date (decision's erasure check, the
CloudEvents ``ce_time`` of every record a stage sends on) would otherwise fail far from where it came in.
"""

from __future__ import annotations

import functools
import time
from typing import TypeVar, cast

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from sightline.common.topics import TopicSpec
from sightline.v1 import events_pb2, types_pb2

M = TypeVar("M", bound=Message)

# google.protobuf.Timestamp's valid range (timestamp.proto): 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_MIN_SECONDS, TIMESTAMP_MAX_SECONDS = -62_135_596_800, 253_402_300_799
_TIMESTAMP = Timestamp.DESCRIPTOR.full_name


class MalformedEvent(ValueError):
    """An event that does not parse, or lacks a field its stage needs."""

    reason = "malformed_event"


def parse(message_type: type[M], data: bytes | None) -> M:
    """Parse bytes as the given protobuf type; MalformedEvent on failure or an empty payload."""
    if not data:
        raise MalformedEvent(f"empty payload where a {message_type.__name__} was expected")
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise MalformedEvent(f"payload is not a valid {message_type.__name__}: {exc}") from None
    invalid = invalid_timestamp(message)
    if invalid is not None:
        raise MalformedEvent(f"payload is not a valid {message_type.__name__}: {invalid}")
    return message


def invalid_timestamp(message: Message, path: str = "") -> str | None:
    """Where a message holds a timestamp outside the valid range, and what it holds; None when every one is valid.

    Only the fields whose type can hold a timestamp are read, so a frame's image or a face's chip is never copied.
    """
    for field in _timestamp_fields(message.DESCRIPTOR):
        if not field.is_repeated and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            items = list(value.values())  # a map of messages (a map of scalars holds no timestamp)
        else:
            items = list(value) if field.is_repeated else [value]
        name = f"{path}{field.name}"
        for item in items:
            found = _timestamp_error(item, name) if item.DESCRIPTOR.full_name == _TIMESTAMP else None
            found = found or invalid_timestamp(item, f"{name}.")
            if found:
                return found
    return None


def _timestamp_error(stamp: Timestamp, name: str) -> str | None:
    if TIMESTAMP_MIN_SECONDS <= stamp.seconds <= TIMESTAMP_MAX_SECONDS and 0 <= stamp.nanos <= 999_999_999:
        return None
    return f"{name} is not a valid timestamp (seconds {stamp.seconds}, nanos {stamp.nanos})"


@functools.cache
def _timestamp_fields(descriptor: Descriptor) -> tuple[FieldDescriptor, ...]:
    """The fields of a message type that are, or hold somewhere inside them, a Timestamp."""
    return tuple(
        field
        for field in descriptor.fields
        if field.message_type is not None and _holds_timestamp(field.message_type, frozenset({descriptor.full_name}))
    )


def _holds_timestamp(descriptor: Descriptor, visiting: frozenset[str]) -> bool:
    """Whether a message type is a Timestamp or has one somewhere inside it (a recursive type is walked once)."""
    if descriptor.full_name == _TIMESTAMP:
        return True
    inside = visiting | {descriptor.full_name}
    return any(
        field.message_type is not None
        and field.message_type.full_name not in inside
        and _holds_timestamp(field.message_type, inside)
        for field in descriptor.fields
    )


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def seconds(stamp: Timestamp) -> float:
    """A timestamp as seconds since the epoch (``time.time()``'s scale)."""
    return stamp.seconds + stamp.nanos / 1e9


def seconds_since(stamp: Timestamp) -> float:
    """Wall-clock seconds since a timestamp (capture-to-stage latency)."""
    return time.time() - seconds(stamp)


def box_to_proto(box: np.ndarray | tuple[float, float, float, float]) -> types_pb2.Box:
    x1, y1, x2, y2 = (float(v) for v in box)
    return types_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2)


def points_to_proto(points: np.ndarray) -> list[types_pb2.Point]:
    return [types_pb2.Point(x=float(x), y=float(y)) for x, y in np.asarray(points, dtype=np.float64)]


def chip_from_bytes(data: bytes, size: int) -> np.ndarray:
    """A chip's RGB bytes as a size x size x 3 uint8 array; MalformedEvent when the length is wrong."""
    expected = size * size * 3
    if size <= 0 or len(data) != expected:
        raise MalformedEvent(f"face chip has {len(data)} bytes, expected {expected} for a {size}x{size} RGB chip")
    return np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3)


def enum_label(enum: EnumTypeWrapper, value: int, prefix: str) -> str:
    """A protobuf enum value's name without its prefix (``AlertStatus`` 2 with ``"ALERT_STATUS_"``: ``CONFIRMED``);
    ``UNKNOWN_<value>`` for a value the enum does not define, which a newer producer or a hostile one can send (the
    wire carries any integer) and which must not crash whoever names it."""
    try:
        return enum.Name(value).removeprefix(prefix)
    except ValueError:
        return f"UNKNOWN_{value}"


def enum_value(enum: EnumTypeWrapper, name: str, prefix: str) -> int:
    """An enum value from its name, with or without the prefix, in any case (``"confirmed"``,
    ``"ALERT_STATUS_CONFIRMED"``); ValueError naming the enum's values for a name it does not define."""
    wanted = name.strip().upper()
    try:
        return enum.Value(wanted if wanted.startswith(prefix) else f"{prefix}{wanted}")
    except ValueError:
        known = ", ".join(n.removeprefix(prefix) for n in enum.keys())
        raise ValueError(f"unknown {enum.DESCRIPTOR.name} {name!r}: one of {known}") from None


def outcome_name(outcome: int) -> str:
    """An e-channel session's outcome as logs, audit records and the CLI name it: ``ACCEPT``, ``REFER_TO_OFFICER``,
    ``CANCELLED`` (``UNSPECIFIED`` while undecided)."""
    from sightline.v1 import session_pb2

    return enum_label(session_pb2.SessionOutcome, outcome, "SESSION_OUTCOME_")


def event_class(topic: TopicSpec) -> type[Message]:
    """The protobuf message type carried on a topic (events.proto, audit.proto or session.proto)."""
    from sightline.v1 import audit_pb2, session_pb2

    for module in (events_pb2, audit_pb2, session_pb2):
        if hasattr(module, topic.event):
            # A topic's `event` names a message class of these modules (topics.py); getattr cannot say so.
            return cast(type[Message], getattr(module, topic.event))
    raise KeyError(f"no protobuf message {topic.event} for topic {topic.name}")
