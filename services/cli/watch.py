"""``sightline watch TOPIC``: tail decisions, alerts or any Sightline topic, readably or as JSON lines."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("watch", help="tail a topic (decisions, alerts, deadletter, matches, ...)")
    parser.add_argument("topic", help="topic name, full (sightline.decisions.v1) or short (decisions)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (bulky bytes elided)")
    parser.add_argument("--from-beginning", action="store_true", help="show retained records too, not only new ones")
    parser.add_argument("--max", type=int, default=0, help="stop after this many records")
    parser.add_argument("--idle-timeout", type=float, default=None, help="stop after this many seconds with no record")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    parser.set_defaults(func=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    from sightline.cli import render
    from sightline.cli.endpoints import kafka_settings
    from sightline.common import codec
    from sightline.common.audit_checkpoints import is_checkpoint
    from sightline.common.bus import read_topics
    from sightline.common.topics import by_name

    try:
        spec = by_name(args.topic)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    since = None if args.from_beginning else int(time.time() * 1000) - 1000
    shown = 0
    try:
        for record in read_topics(kafka_settings(args.bootstrap), [spec.name], since, args.idle_timeout):
            if is_checkpoint(record.headers):  # the audit writer's signed chain heads share the audit topic
                print(record.value.decode() if args.json else f"audit checkpoint {record.value.decode()}", flush=True)
                continue
            try:
                message = codec.parse(codec.event_class(spec), record.value)
            except codec.MalformedEvent as exc:
                print(f"(offset {record.offset}: {exc})", flush=True)
                continue
            print(render.to_json(message) if args.json else render.one_line(message), flush=True)
            shown += 1
            if args.max and shown >= args.max:
                break
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
