"""Every Kafka topic Sightline uses, with its partitions, retention and data class, in one place.

Topics are created explicitly (never auto-created: a broker's default partition count is not a design decision) by
``sightline topics ensure``, by the local stack and by the Helm pre-install hook. Retention follows the data class:
raw frames and face chips are personal data kept for hours, decisions and alerts for as long as policy says.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


class DataClass(str, Enum):
    """How sensitive a topic's content is; drives retention."""

    BIOMETRIC_RAW = "biometric-raw"  # frames, chips, descriptors: short retention
    RESULT = "result"  # scores and ids, no biometric data
    OPERATIONAL = "operational"  # dead letters
    AUDIT = "audit"  # the audit trail: who did what, when and why; kept long, never face data


@dataclass(frozen=True)
class TopicSpec:
    name: str
    event: str  # the protobuf message type carried, for readers and for `sightline watch`
    data_class: DataClass
    retention_ms: int
    producer: str
    consumers: tuple[str, ...]

    def configs(self, max_message_bytes: int | None = None) -> dict[str, str]:
        """The topic configs to create it with; ``max.message.bytes`` when given (see bus.topic_max_message_bytes)."""
        configs = {"retention.ms": str(self.retention_ms), "cleanup.policy": "delete"}
        if max_message_bytes is not None:
            configs["max.message.bytes"] = str(max_message_bytes)
        return configs


FRAMES = TopicSpec("sightline.frames.v1", "FrameCaptured", DataClass.BIOMETRIC_RAW, HOUR_MS, "capture", ("detection",))
FACES = TopicSpec("sightline.faces.v1", "FacesDetected", DataClass.BIOMETRIC_RAW, HOUR_MS, "detection", ("embedding",))
EMBEDDINGS = TopicSpec(
    "sightline.embeddings.v1", "FacesEmbedded", DataClass.BIOMETRIC_RAW, HOUR_MS, "embedding", ("matching",)
)
MATCHES = TopicSpec("sightline.matches.v1", "MatchResult", DataClass.RESULT, DAY_MS, "matching", ("decision",))
DECISIONS = TopicSpec("sightline.decisions.v1", "Decision", DataClass.RESULT, 7 * DAY_MS, "decision", ())
ALERTS = TopicSpec("sightline.alerts.v1", "Alert", DataClass.RESULT, 30 * DAY_MS, "decision", ())
# E-channel session control (capture -> decision) and progress/outcomes (decision -> kiosks through capture's
# WatchSession, and integrators). Ids and scores only: a session's frames travel on the frames topic like any other.
# Its consumer is decision; capture's relay reads it like an integrator would (no group lag to scale on).
SESSIONS = TopicSpec(
    "sightline.sessions.v1", "SessionEvent", DataClass.RESULT, DAY_MS, "capture, decision", ("decision",)
)
# Right-to-erasure notices: decision erases what it holds about the subject, integrators their copies of results.
ERASURES = TopicSpec("sightline.erasures.v1", "SubjectErased", DataClass.AUDIT, 365 * DAY_MS, "matching", ("decision",))
DEADLETTER = TopicSpec("sightline.deadletter.v1", "DeadLetter", DataClass.OPERATIONAL, HOUR_MS, "*", ())
# A copy of every audit record, for a SIEM or an archive; the hash chain in the database is the reference.
AUDIT = TopicSpec("sightline.audit.v1", "AuditRecord", DataClass.AUDIT, 365 * DAY_MS, "*", ())

ALL_TOPICS: tuple[TopicSpec, ...] = (
    FRAMES,
    FACES,
    EMBEDDINGS,
    MATCHES,
    DECISIONS,
    ALERTS,
    SESSIONS,
    ERASURES,
    DEADLETTER,
    AUDIT,
)


def by_name(name: str) -> TopicSpec:
    """The spec of a topic, accepting the full name or the short one ("decisions")."""
    for spec in ALL_TOPICS:
        if name in (spec.name, spec.name.split(".")[1]):
            return spec
    known = ", ".join(s.name.split(".")[1] for s in ALL_TOPICS)
    raise KeyError(f"unknown topic {name!r}; known topics: {known}")
