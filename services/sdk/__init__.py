"""The Sightline SDK: call Sightline's gRPC APIs and subscribe to its topics from Python, typed and documented.

- ``SightlineClient`` (``client.py``): ``client.gallery`` (enrol, search, verify, subjects, delete, erase),
  ``client.watchlists``, ``client.review`` (alerts, confirm, reject, feedback), ``client.audit`` (records, verify
  the chain) and ``client.kiosk`` (e-channel sessions), with bearer tokens and TLS through Sightline's own channels;
  failed calls raise one exception per gRPC status (``errors.py``).
- ``Subscriber`` (``subscriber.py``): events from the topics, decoded by ``ce_type`` with their CloudEvents
  attributes (``events.py``), deduplicated by ``ce_id`` in a persistent store (``seen.py``), committed after the
  handler returns, resumed after a restart.
- ``event_to_json`` / ``message_to_dict`` (``jsonformat.py``): any event in the CloudEvents JSON format, any message
  in the protobuf JSON mapping, for integrators without protobuf.

The integrator guide (docs/integrators.md) documents the topics, keys, ids and delivery guarantees; ``examples/``
holds three runnable integrations built on this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sightline.sdk.client import SightlineClient
    from sightline.sdk.errors import (
        AlreadyExists,
        CallFailed,
        Cancelled,
        ConfigurationError,
        DeadlineExceeded,
        FailedPrecondition,
        InvalidArgument,
        MalformedRecord,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        ServerError,
        SightlineError,
        Unauthenticated,
        Unavailable,
    )
    from sightline.sdk.events import CloudEventAttributes, Event
    from sightline.sdk.jsonformat import CLOUDEVENTS_JSON, event_to_dict, event_to_json, message_to_dict
    from sightline.sdk.kiosk import KioskSession
    from sightline.sdk.settings import ClientSettings, SubscriberSettings
    from sightline.sdk.subscriber import Subscriber, SubscriberStats

# Where each name lives: imported on first use, so that a program using one part (the CLI renders JSON with
# jsonformat) does not pay for the others (grpc, kafka-python).
_HOMES = {
    "CLOUDEVENTS_JSON": "jsonformat",
    "ClientSettings": "settings",
    "CloudEventAttributes": "events",
    "Event": "events",
    "KioskSession": "kiosk",
    "SightlineClient": "client",
    "Subscriber": "subscriber",
    "SubscriberSettings": "settings",
    "SubscriberStats": "subscriber",
    "event_to_dict": "jsonformat",
    "event_to_json": "jsonformat",
    "message_to_dict": "jsonformat",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name) or ("errors" if name in __all__ else None)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = [
    "CLOUDEVENTS_JSON",
    "AlreadyExists",
    "CallFailed",
    "Cancelled",
    "ClientSettings",
    "CloudEventAttributes",
    "ConfigurationError",
    "DeadlineExceeded",
    "Event",
    "FailedPrecondition",
    "InvalidArgument",
    "KioskSession",
    "MalformedRecord",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerError",
    "SightlineClient",
    "SightlineError",
    "Subscriber",
    "SubscriberSettings",
    "SubscriberStats",
    "Unauthenticated",
    "Unavailable",
    "event_to_dict",
    "event_to_json",
    "message_to_dict",
]
