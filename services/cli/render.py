"""How the CLI shows events: one readable line per decision or alert, or JSON with bulky bytes elided.

Images, chips and descriptors are never printed: the JSON form replaces them with their size.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.message import Message

from sightline.common import codec
from sightline.sdk.jsonformat import message_to_dict
from sightline.v1 import events_pb2


def to_dict(message: Message) -> dict[str, Any]:
    """The protobuf JSON mapping, bulky biometric fields as their size (the SDK's rendering, so both agree)."""
    return message_to_dict(message, elide_biometrics=True)


def to_json(message: Message) -> str:
    return json.dumps(to_dict(message), sort_keys=True)


def one_line(message: Message) -> str:
    if isinstance(message, events_pb2.Decision):
        return _decision_line(message)
    if isinstance(message, events_pb2.Alert):
        return _alert_line(message)
    if isinstance(message, events_pb2.DeadLetter):
        frame = message.frame_id or "-"
        return f"DEAD-LETTER stage={message.stage} reason={message.reason} frame={frame}: {message.error}"
    return to_json(message)


def _decision_line(d: events_pb2.Decision) -> str:
    outcome = codec.enum_label(events_pb2.Outcome, d.outcome, "OUTCOME_")
    if d.outcome == events_pb2.OUTCOME_NO_FACE:
        return f"{outcome:<11} source={d.frame.source_id} frame={d.frame.sequence} | {'; '.join(d.reasons)}"
    who = f" subject={d.subject_id}" if d.subject_id else ""
    alert = f" alert={d.alert_id[:12]}" if d.alert_id else ""
    return (
        f"{outcome:<11} source={d.frame.source_id} frame={d.frame.sequence} face={d.face_index}{who} "
        f"similarity={d.similarity:.3f} distance={d.distance:.3f}{alert} | {'; '.join(d.reasons)}"
    )


def _alert_line(a: events_pb2.Alert) -> str:
    status = codec.enum_label(events_pb2.AlertStatus, a.status, "ALERT_STATUS_")
    return (
        f"ALERT {status} subject={a.subject_id} watchlists={','.join(a.watchlists)} source={a.source_id} "
        f"similarity={a.similarity:.3f} frames={len(a.evidence_frame_ids)} id={a.alert_id[:12]}"
    )
