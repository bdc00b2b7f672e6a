"""``sightline topics ensure|list``: create the topics with explicit partitions and retention, or list them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from sightline.common.topics import TopicSpec, by_name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("topics", help="create or list Sightline's Kafka topics")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ensure = actions.add_parser("ensure", help="create missing topics (partitions, retention); exit 1 on failure")
    ensure.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack or SIGHTLINE_KAFKA_*)")
    ensure.add_argument(
        "--from-file", type=Path, help="YAML list of {name, partitions, retention_ms} overriding the defaults"
    )
    ensure.set_defaults(func=cmd_ensure)
    listing = actions.add_parser("list", help="the topics Sightline uses, with data class and retention")
    listing.set_defaults(func=cmd_list)


def load_overrides(path: Path) -> tuple[list[TopicSpec], dict[str, int]]:
    """Topic specs with retention overridden from the file, and the partitions asked per topic."""
    entries = yaml.safe_load(path.read_text()) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a YAML list of topics")
    specs, partitions = [], {}
    for entry in entries:
        spec = by_name(str(entry["name"]))
        retention = int(entry.get("retention_ms", spec.retention_ms))
        specs.append(TopicSpec(spec.name, spec.event, spec.data_class, retention, spec.producer, spec.consumers))
        if "partitions" in entry:
            partitions[spec.name] = int(entry["partitions"])
    return specs, partitions


def cmd_ensure(args: argparse.Namespace) -> int:
    from sightline.cli.endpoints import kafka_settings
    from sightline.common.bus import ensure_topics
    from sightline.common.retention import topic_specs

    settings = kafka_settings(args.bootstrap)
    try:
        specs, partitions = load_overrides(args.from_file) if args.from_file else (topic_specs(), {})
        states = {}
        for spec in specs:
            count = partitions.get(spec.name, settings.default_partitions)
            states.update(ensure_topics(settings.model_copy(update={"default_partitions": count}), [spec]))
    except Exception as exc:  # noqa: BLE001 - a hook Job must fail loudly with the reason
        print(f"error: could not ensure topics on {settings.bootstrap_servers}: {exc}", file=sys.stderr)
        return 1
    for name, state in states.items():
        print(f"{name:<28} {state}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from sightline.common.retention import topic_specs

    for spec in topic_specs():
        hours = spec.retention_ms / 3_600_000
        print(
            f"{spec.name:<28} {spec.event:<14} {spec.data_class.value:<14} retention {hours:g} h  "
            f"{spec.producer} -> {', '.join(spec.consumers) or 'integrators'}"
        )
    return 0
