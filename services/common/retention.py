"""Retention of personal data: how long each class of data lives on the topics and in the databases, and the purge.

Published norms for the data a watchlist system gathers come down to limits per data class: raw frames, face chips
and descriptors for hours (long enough to replay a failed stage, never for browsing), results and alerts for what
the operating policy says, the audit trail for long. Topic retention is set when the topics are created
(``topic_specs``: the local stack, ``sightline topics ensure`` and, through its values, the Helm hook); what the
databases hold past its limit is deleted by ``PurgeSchedule``, which each service with a database runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common import telemetry
from sightline.common.config import SightlineSettings
from sightline.common.topics import (
    ALERTS,
    ALL_TOPICS,
    AUDIT,
    DEADLETTER,
    DECISIONS,
    EMBEDDINGS,
    ERASURES,
    FACES,
    FRAMES,
    MATCHES,
    SESSIONS,
    TopicSpec,
)

log = logging.getLogger(__name__)
HOUR_MS = 3_600_000


class RetentionSettings(SightlineSettings):
    """Retention limits (``SIGHTLINE_RETENTION_*``), shared by every service and by topic creation."""

    config_section: ClassVar[str] = "retention"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_RETENTION_", extra="ignore")

    raw_hours: float = Field(
        1.0,
        gt=0,
        le=72,
        description="Frames, face chips and descriptors on their topics (and dead letters, which may hold them).",
    )
    matches_hours: float = Field(24.0, gt=0, description="Match results (scores and subject ids) on their topic.")
    sessions_hours: float = Field(
        24.0, gt=0, description="E-channel session events on their topic, and decided sessions in the database."
    )
    decisions_days: float = Field(7.0, gt=0, description="Per-face decisions on their topic.")
    alerts_days: float = Field(
        30.0,
        gt=0,
        description="Alerts on their topic, and alerts with their reviews in the database (reviewed or not).",
    )
    audit_days: float = Field(
        365.0, gt=0, description="Audit records and erasure notices on their topics (the database chain is kept)."
    )
    purge_interval_s: float = Field(600.0, gt=0, description="How often the databases purge what is past its limit.")

    def topic_retention_ms(self) -> dict[str, int]:
        """retention.ms per topic name, from these limits."""
        raw = int(self.raw_hours * HOUR_MS)

        def hours(h: float) -> int:
            return int(h * HOUR_MS)

        def days(d: float) -> int:
            return int(d * 24 * HOUR_MS)

        return {
            FRAMES.name: raw,
            FACES.name: raw,
            EMBEDDINGS.name: raw,
            DEADLETTER.name: raw,
            MATCHES.name: hours(self.matches_hours),
            SESSIONS.name: hours(self.sessions_hours),
            DECISIONS.name: days(self.decisions_days),
            ALERTS.name: days(self.alerts_days),
            AUDIT.name: days(self.audit_days),
            ERASURES.name: days(self.audit_days),
        }


def topic_specs(settings: RetentionSettings | None = None) -> list[TopicSpec]:
    """Every topic's spec with its retention taken from the settings (the environment when None)."""
    retention = (settings or RetentionSettings()).topic_retention_ms()
    return [replace(spec, retention_ms=retention.get(spec.name, spec.retention_ms)) for spec in ALL_TOPICS]


# One purge job: takes the cut-off time, returns how many rows it deleted.
Purge = Callable[[datetime], int]


class PurgeSchedule:
    """Runs purge jobs now and then every ``interval_s`` on a daemon thread; a failing job is logged and retried."""

    def __init__(self, service: str, jobs: Mapping[str, tuple[timedelta, Purge]], interval_s: float) -> None:
        """``jobs``: name -> (how long the data is kept, the purge taking the cut-off)."""
        self._service = service
        self._jobs = dict(jobs)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{service}-purge", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """Purge every job once; rows deleted per job (a failed job is absent)."""
        now = now or datetime.now(UTC)
        deleted: dict[str, int] = {}
        for name, (keep, purge) in self._jobs.items():
            try:
                deleted[name] = purge(now - keep)
            except Exception:
                log.exception("purge failed; will retry", extra={"job": name})
                continue
            telemetry.RECORDS_PURGED.labels(self._service, name).inc(deleted[name])
            if deleted[name]:
                log.info("purged records past their retention", extra={"job": name, "records": deleted[name]})
        return deleted

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self._interval)
