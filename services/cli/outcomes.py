"""Collects what the pipeline concluded about a run of frames: match results, decisions, alerts and dead letters.

The demo, the benchmark and the end-to-end tests all need to know when every frame of a run has gone through:
a frame is done when its match result has arrived with one decision per face (a frame without faces: its one NO_FACE
decision), or when it was dead-lettered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import Message

from sightline.common import codec
from sightline.common.bus import read_topics
from sightline.common.config import KafkaSettings
from sightline.common.topics import ALERTS, DEADLETTER, DECISIONS, MATCHES, by_name
from sightline.v1 import events_pb2


@dataclass
class Outcomes:
    source_id: str
    matches: dict[int, events_pb2.MatchResult] = field(default_factory=dict)
    decisions: list[events_pb2.Decision] = field(default_factory=list)
    alerts: list[events_pb2.Alert] = field(default_factory=list)
    dead_letters: list[events_pb2.DeadLetter] = field(default_factory=list)
    received_at: dict[str, float] = field(default_factory=dict)  # decision id -> wall-clock arrival

    def add(self, message: Message) -> bool:
        """Keep a message that belongs to this run's source; False when it belongs to another source."""
        if isinstance(message, events_pb2.MatchResult) and message.frame.source_id == self.source_id:
            self.matches[message.frame.sequence] = message
        elif isinstance(message, events_pb2.Decision) and message.frame.source_id == self.source_id:
            self.decisions.append(message)
            self.received_at[message.decision_id] = time.time()
        elif isinstance(message, events_pb2.Alert) and message.source_id == self.source_id:
            self.alerts.append(message)
        elif isinstance(message, events_pb2.DeadLetter) and message.frame_id.startswith(f"{self.source_id}:"):
            self.dead_letters.append(message)
        else:
            return False
        return True

    def dead_sequences(self) -> set[int]:
        return {int(d.frame_id.rsplit(":", 1)[1]) for d in self.dead_letters if d.frame_id}

    def done(self, sequences: set[int]) -> bool:
        decided: dict[int, int] = {}
        for decision in self.decisions:
            decided[decision.frame.sequence] = decided.get(decision.frame.sequence, 0) + 1
        dead = self.dead_sequences()
        return all(
            seq in dead or (seq in self.matches and decided.get(seq, 0) >= max(len(self.matches[seq].faces), 1))
            for seq in sequences
        )


def collect(
    settings: KafkaSettings,
    source_id: str,
    sequences: set[int],
    since_ms: int,
    timeout_s: float,
    on_message: Callable[[Message], None] | None = None,
    grace_s: float = 1.0,
) -> Outcomes:
    """Read the result topics until every frame in ``sequences`` is done, or the timeout passes."""
    outcomes = Outcomes(source_id)
    deadline = time.monotonic() + timeout_s
    finished_at: float | None = None

    def stop() -> bool:
        # A short grace after the last frame is done: its alert travels on another topic and may come a bit later.
        now = time.monotonic()
        return now > deadline or (finished_at is not None and now - finished_at > grace_s)

    topics = [MATCHES.name, DECISIONS.name, ALERTS.name, DEADLETTER.name]
    for record in read_topics(settings, topics, since_ms, stop=stop):
        message = codec.parse(codec.event_class(by_name(record.topic)), record.value)
        if outcomes.add(message) and on_message:
            on_message(message)
        if finished_at is None and outcomes.done(sequences):
            finished_at = time.monotonic()
    return outcomes
