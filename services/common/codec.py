"""Conversions between protobuf events and the numpy values the models work with.

Kept in one place so that every service builds and reads events the same way (box and landmark layout, chip bytes,
timestamps) and a malformed event fails the same way everywhere: ``MalformedEvent``.
"""

from __future__ import annotations

import time
from typing import TypeVar, cast

import numpy as np
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from sightline.common.topics import TopicSpec
from sightline.v1 import events_pb2, types_pb2

M = TypeVar("M", bound=Message)


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
    return message


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


def outcome_name(outcome: int) -> str:
    """An e-channel session's outcome as logs, audit records and the CLI name it: ``ACCEPT``, ``REFER_TO_OFFICER``,
    ``CANCELLED`` (``UNSPECIFIED`` while undecided)."""
    from sightline.v1 import session_pb2

    return session_pb2.SessionOutcome.Name(outcome).removeprefix("SESSION_OUTCOME_")


def event_class(topic: TopicSpec) -> type[Message]:
    """The protobuf message type carried on a topic (events.proto, audit.proto or session.proto)."""
    from sightline.v1 import audit_pb2, session_pb2

    for module in (events_pb2, audit_pb2, session_pb2):
        if hasattr(module, topic.event):
            # A topic's `event` names a message class of these modules (topics.py); getattr cannot say so.
            return cast(type[Message], getattr(module, topic.event))
    raise KeyError(f"no protobuf message {topic.event} for topic {topic.name}")
