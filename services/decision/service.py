"""Decision service: match results in, decisions and alerts out, following the configured policy.

Consumes ``sightline.matches.v1``; publishes one ``Decision`` per face to ``sightline.decisions.v1`` and an ``Alert``
for review to ``sightline.alerts.v1`` when a watchlist subject is confirmed on enough frames. An alert is never an
automatic action: it starts PENDING_REVIEW.
"""

from __future__ import annotations

import logging

from sightline.common import codec, telemetry
from sightline.common.config import KafkaSettings
from sightline.common.runtime import run_service
from sightline.common.stage import InputEvent, Output, Stage, one_at_a_time
from sightline.common.topics import ALERTS, DECISIONS, MATCHES
from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import load_policy
from sightline.decision.settings import DecisionSettings
from sightline.v1 import events_pb2

SERVICE = "decision"
log = logging.getLogger(__name__)


def decide(engine: DecisionEngine, event: InputEvent) -> list[Output]:
    result = codec.parse(events_pb2.MatchResult, event.value)
    decisions, alerts = engine.decide(result)
    key = result.frame.source_id.encode()
    telemetry.END_TO_END_LATENCY.labels(SERVICE).observe(codec.seconds_since(result.frame.captured_at))
    return [Output(DECISIONS, key, d.SerializeToString()) for d in decisions] + [
        Output(ALERTS, key, a.SerializeToString()) for a in alerts
    ]


def main() -> None:
    settings = DecisionSettings()
    policy = load_policy(settings.policy_file)
    engine = DecisionEngine(policy)
    log.info("policy loaded", extra={"policy_version": policy.version})
    stage = Stage(SERVICE, MATCHES, [DECISIONS, ALERTS], one_at_a_time(lambda event: decide(engine, event)))
    run_service(SERVICE, settings, KafkaSettings(), [], [stage])
