"""Retention limits: topic retention per data class from the settings, and the purge schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from sightline.common.retention import PurgeSchedule, RetentionSettings, topic_specs
from sightline.common.topics import ALL_TOPICS, DataClass


def test_topic_retention_follows_the_data_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_RETENTION_RAW_HOURS", "2")
    monkeypatch.setenv("SIGHTLINE_RETENTION_ALERTS_DAYS", "90")
    specs = {spec.name: spec for spec in topic_specs()}
    assert set(specs) == {spec.name for spec in ALL_TOPICS}
    raw = [s for s in specs.values() if s.data_class is DataClass.BIOMETRIC_RAW]
    assert raw and all(s.retention_ms == 2 * 3_600_000 for s in raw)
    assert specs["sightline.deadletter.v1"].retention_ms == 2 * 3_600_000  # dead letters may hold a frame
    assert specs["sightline.alerts.v1"].retention_ms == 90 * 86_400_000
    assert specs["sightline.audit.v1"].retention_ms == 365 * 86_400_000
    assert specs["sightline.alerts.v1"].configs()["retention.ms"] == str(90 * 86_400_000)


def test_raw_biometric_data_is_never_kept_for_days() -> None:
    with pytest.raises(ValidationError, match="raw_hours"):
        RetentionSettings(raw_hours=24 * 7)


def test_purge_schedule_runs_every_job_with_its_cutoff_and_survives_a_failing_one() -> None:
    seen: dict[str, datetime] = {}

    def purge_alerts(cutoff: datetime) -> int:
        seen["alerts"] = cutoff
        return 3

    def broken(cutoff: datetime) -> int:
        raise RuntimeError("database unavailable")

    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    schedule = PurgeSchedule(
        "decision",
        {"alerts": (timedelta(days=30), purge_alerts), "sessions": (timedelta(hours=24), broken)},
        interval_s=60,
    )
    assert schedule.run_once(now) == {"alerts": 3}
    assert seen["alerts"] == now - timedelta(days=30)
