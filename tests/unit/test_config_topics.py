"""Typed configuration (env, secret files, YAML sections, validation) and the topic registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sightline.common.config import KafkaSettings
from sightline.common.topics import ALL_TOPICS, DataClass, by_name
from sightline.decision.settings import DecisionSettings
from sightline.matching.settings import MatchingSettings


def test_env_overrides_yaml_which_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sightline.yaml"
    config.write_text("kafka:\n  bootstrap_servers: yaml-host:9092\n  default_partitions: 8\n")
    monkeypatch.setenv("SIGHTLINE_CONFIG_FILE", str(config))
    assert KafkaSettings().bootstrap_servers == "yaml-host:9092"
    monkeypatch.setenv("SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS", "a:1, b:2")
    settings = KafkaSettings()
    assert settings.servers == ["a:1", "b:2"] and settings.default_partitions == 8


def test_invalid_values_fail_at_start_with_the_field_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_DECISION_GRPC_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="grpc_port"):
        DecisionSettings()


def test_matching_requires_a_template_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIGHTLINE_MATCHING_TEMPLATE_KEY", raising=False)
    with pytest.raises(ValidationError, match="template_key"):
        MatchingSettings()


def test_secret_comes_from_a_mounted_file_and_never_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "SIGHTLINE_MATCHING_TEMPLATE_KEY").write_text("c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3I=")
    monkeypatch.setenv("SIGHTLINE_SECRETS_DIR", str(tmp_path))
    monkeypatch.delenv("SIGHTLINE_MATCHING_TEMPLATE_KEY", raising=False)
    settings = MatchingSettings()
    assert settings.template_key.get_secret_value().startswith("c2Vj")
    assert "c2Vj" not in repr(settings) and "c2Vj" not in str(settings.model_dump())


def test_topic_registry_is_consistent() -> None:
    names = [t.name for t in ALL_TOPICS]
    assert len(names) == len(set(names))
    assert all(t.retention_ms <= 3_600_000 for t in ALL_TOPICS if t.data_class is DataClass.BIOMETRIC_RAW)
    assert by_name("decisions").name == "sightline.decisions.v1"
    with pytest.raises(KeyError, match="known topics"):
        by_name("nope")
