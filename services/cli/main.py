"""The ``sightline`` command: one entry point, one module per command group.

Each command module exposes ``register(subparsers)``, which adds its sub-commands and sets ``func`` on them. Modules
import their heavy dependencies (models, faust, grpc stubs) inside the command functions, so ``sightline --help`` is
instant and a broken optional dependency only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMAND_MODULES = (
    "sightline.cli.stack",  # up, down, status, restart
    "sightline.cli.topics",  # topics ensure
    "sightline.cli.gallery",  # enroll
    "sightline.cli.watchlists",  # watchlists create, list, show, update, delete, add, remove, members
    "sightline.cli.erase",  # erase (right to erasure)
    "sightline.cli.keys",  # keys generate, rotate
    "sightline.cli.run",  # run
    "sightline.cli.gate",  # gate (one e-channel session)
    "sightline.cli.watch",  # watch
    "sightline.cli.faces",  # faces
    "sightline.cli.demo",  # demo
    "sightline.cli.bench",  # bench pipeline
    "sightline.cli.config",  # config docs
    "sightline.cli.evaluate",  # eval
    "sightline.cli.compare",  # compare
    "sightline.cli.calibrate",  # calibrate
    "sightline.cli.ops",  # ops status, ops scale (Kubernetes)
    "sightline.cli.review",  # review list, show, confirm, reject
    "sightline.cli.audit",  # audit verify, list
    "sightline.cli.auth",  # auth new-token, hash-token, methods
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sightline",
        description="Sightline face recognition: local stack, enrolment, streaming, inspection and benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # kafka-python 3 warns ~100 times at import
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
