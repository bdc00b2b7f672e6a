"""Command-line options for integration scripts: where Sightline is, the same way in every script.

``add_connection_options(parser)`` adds ``--local-stack [RUN_DIR]`` (the stack ``sightline up`` runs: its addresses,
token and broker), ``--matching``, ``--decision``, ``--capture`` (gRPC addresses, default ``SIGHTLINE_SDK_*_ADDR``)
and ``--bootstrap`` (Kafka, default ``SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS``); ``client_from`` and ``kafka_from`` turn
the parsed arguments into a ``SightlineClient`` and ``KafkaSettings``. The bearer token is never an option (a flag is
visible to every user in the process list): it is ``$SIGHTLINE_TOKEN``, or the local stack's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sightline.common.config import KafkaSettings
from sightline.sdk.client import SightlineClient

USE_DEFAULT_RUN_DIR = Path("")  # --local-stack given without a folder


def add_connection_options(parser: argparse.ArgumentParser, *, grpc: bool = True, kafka: bool = True) -> None:
    """The options that say where Sightline is (gRPC APIs and/or the broker)."""
    group = parser.add_argument_group("connection (token: $SIGHTLINE_TOKEN)" if grpc else "connection")
    group.add_argument(
        "--local-stack",
        nargs="?",
        type=Path,
        const=USE_DEFAULT_RUN_DIR,
        metavar="RUN_DIR",
        help="use the local stack `sightline up` runs (from RUN_DIR, default $SIGHTLINE_RUN_DIR): its addresses, "
        "token and broker",
    )
    if grpc:
        group.add_argument(
            "--matching", help="gallery and watchlist API, host:port (default $SIGHTLINE_SDK_MATCHING_ADDR)"
        )
        group.add_argument("--decision", help="review and audit API, host:port (default $SIGHTLINE_SDK_DECISION_ADDR)")
        group.add_argument("--capture", help="kiosk API, host:port (default $SIGHTLINE_SDK_CAPTURE_ADDR)")
    if kafka:
        group.add_argument("--bootstrap", help="Kafka bootstrap servers (default $SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS)")


def _run_dir(args: argparse.Namespace) -> Path | None:
    chosen: Path = args.local_stack
    return None if chosen == USE_DEFAULT_RUN_DIR else chosen


def client_from(args: argparse.Namespace) -> SightlineClient:
    """The client the options describe; ConfigurationError when ``--local-stack`` names no running stack."""
    if args.local_stack is not None:
        return SightlineClient.for_local_stack(_run_dir(args))
    return SightlineClient(matching=args.matching, decision=args.decision, capture=args.capture)


def kafka_from(args: argparse.Namespace) -> KafkaSettings:
    """The broker the options describe."""
    if args.local_stack is not None:
        from sightline.sdk.local import local_stack

        return local_stack(_run_dir(args)).kafka_settings()
    return KafkaSettings(bootstrap_servers=args.bootstrap) if args.bootstrap else KafkaSettings()
