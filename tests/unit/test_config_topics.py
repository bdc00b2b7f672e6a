"""Typed configuration (env, secret files, YAML sections, validation) and the topic registry, which events.proto's
topic list repeats."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from sightline.common import codec
from sightline.common.config import KafkaSettings
from sightline.common.topics import ALL_TOPICS, DataClass, by_name
from sightline.decision.settings import DecisionSettings
from sightline.matching.settings import MatchingSettings
from sightline.v1 import events_pb2

EVENTS_PROTO = Path(__file__).parents[2] / "protos" / "sightline" / "v1" / "events.proto"
# "//   sightline.sessions.v1  SessionEvent  capture, decision -> decision (capture's relay, integrators)"
_TOPIC_LINE = re.compile(r"^//\s+(sightline\.\S+)\s+(\w+)\s+(.+?)\s+->\s*([^(]*?)\s*(\(.*\))?$")


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


def proto_topic_list() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(name, message, producer, consumers) of each line of the topic list that opens events.proto; the readers
    in parentheses are not Sightline services, and not in the registry."""
    header = EVENTS_PROTO.read_text().split("syntax = ", 1)[0]
    rows = []
    for line in header.splitlines():
        if line.startswith("//   sightline."):
            match = _TOPIC_LINE.match(line)
            assert match, f"events.proto: cannot read the topic line {line!r}"
            name, event, producer, consumers, _ = match.groups()
            rows.append((name, event, producer, tuple(c.strip() for c in consumers.split(",") if c.strip())))
    return rows


def test_events_proto_lists_the_topics_of_the_registry() -> None:
    listed = proto_topic_list()
    assert len(listed) >= 10 and listed[0][0] == "sightline.frames.v1"
    assert listed == [(t.name, t.event, t.producer, t.consumers) for t in ALL_TOPICS]


def test_every_topic_carries_a_generated_message() -> None:
    for topic in ALL_TOPICS:
        assert codec.event_class(topic).DESCRIPTOR.full_name == f"sightline.v1.{topic.event}"
    # All but two are defined in events.proto; those two live with their APIs, as events.proto says.
    elsewhere = {t.event for t in ALL_TOPICS if t.event not in events_pb2.DESCRIPTOR.message_types_by_name}
    assert elsewhere == {"SessionEvent", "AuditRecord"}
    assert "SessionEvent is defined with the kiosk API (session.proto), AuditRecord with the audit API" in (
        EVENTS_PROTO.read_text()
    )
