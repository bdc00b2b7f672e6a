"""protos/asyncapi.yaml: in sync with the topic catalogue and the protos (regenerating gives the checked-in file),
and valid for the AsyncAPI parser with its protobuf schema parser (installed by `make tools`), which reads back every
topic as a channel, every event's proto schema as a payload with the message's fields, and the operations."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sightline.common import codec
from sightline.common.topics import ALL_TOPICS, AUDIT
from sightline.tooling import asyncapi
from sightline.tooling.contract import ASYNCAPI_VALIDATOR, ContractToolsMissing, tool


@pytest.fixture(scope="module")
def parsed() -> dict[str, Any]:
    """What the AsyncAPI parser reports on the checked-in document."""
    try:
        script = tool(ASYNCAPI_VALIDATOR)
    except ContractToolsMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    done = subprocess.run(
        ["node", str(script), str(asyncapi.OUTPUT)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode in (0, 1), done.stderr
    return dict(json.loads(done.stdout))


def short(name: str) -> str:
    return name.split(".")[1]


def test_the_checked_in_document_is_what_the_catalogue_and_protos_give() -> None:
    assert asyncapi.OUTPUT.read_text() == asyncapi.render(), (
        "protos/asyncapi.yaml is out of date: run `.venv/bin/python -m sightline.tooling.asyncapi`"
    )


def test_the_check_option_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "asyncapi.yaml"
    stale.write_text(asyncapi.render().replace("retention.ms: 3600000", "retention.ms: 7200000", 1))
    assert asyncapi.main(["--out", str(stale), "--check"]) == 1
    assert asyncapi.main(["--out", str(stale)]) == 0 and asyncapi.main(["--out", str(stale), "--check"]) == 0


def test_the_parser_finds_no_error_and_no_warning(parsed: dict[str, Any]) -> None:
    assert parsed["error"] == [] and parsed["warning"] == [], parsed["error"] + parsed["warning"]


def test_every_topic_is_a_channel_with_its_events(parsed: dict[str, Any]) -> None:
    expected = {
        short(spec.name): {
            "address": spec.name,
            "messages": [codec.event_class(spec).DESCRIPTOR.name] + (["AuditCheckpoint"] if spec is AUDIT else []),
        }
        for spec in ALL_TOPICS
    }
    assert parsed["channels"] == expected


def test_every_producer_sends_and_every_consumer_receives(parsed: dict[str, Any]) -> None:
    found = {(op["action"], op["id"].split(".")[0], op["channels"][0]) for op in parsed["operations"]}
    expected = set()
    for spec in ALL_TOPICS:
        for producer in spec.producer.split(","):
            expected.add(("send", producer.strip().replace("*", "any-service"), short(spec.name)))
        expected |= {("receive", consumer, short(spec.name)) for consumer in spec.consumers}
    assert found == expected


def test_each_proto_payload_is_read_as_its_message_with_every_field(parsed: dict[str, Any]) -> None:
    for spec in ALL_TOPICS:
        descriptor = codec.event_class(spec).DESCRIPTOR
        payload = parsed["payloads"][descriptor.name]
        assert payload == {"title": descriptor.name, "properties": [field.name for field in descriptor.fields]}


def test_channels_state_partitions_retention_and_keys() -> None:
    document = yaml.safe_load(asyncapi.OUTPUT.read_text())
    for spec in ALL_TOPICS:
        channel = document["channels"][short(spec.name)]
        kafka = channel["bindings"]["kafka"]
        assert kafka["topic"] == spec.name and kafka["partitions"] >= 1
        assert kafka["topicConfiguration"]["retention.ms"] == spec.retention_ms
        for ref in channel["messages"].values():
            message = document["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
            assert message["bindings"]["kafka"]["key"]["description" if spec is not AUDIT else "type"]
            example = message["examples"][0]["headers"]
            assert example["ce_type"] == message["title"] and example["ce_specversion"] == "1.0"


def test_a_proto_schema_holds_every_definition_it_uses_and_no_import_of_ours() -> None:
    from sightline.v1 import events_pb2

    schema = asyncapi.proto_schema(events_pb2.Decision)
    assert schema.count("// @RootNode\n") == 1 and "\nmessage Decision {" in schema
    for used in ("message FrameRef {", "enum Outcome {", "enum Purpose {"):
        assert used in schema
    assert 'import "google/protobuf/timestamp.proto";' in schema and 'import "sightline/' not in schema
