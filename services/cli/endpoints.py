"""Where the CLI finds the services and how it proves who it is.

An address is an explicit flag, else the local stack recorded in the run dir, else the default port. The bearer
token is ``--token``, else ``$SIGHTLINE_AUTH_TOKEN`` or ``$SIGHTLINE_TOKEN``, else, for the addresses of the local
stack only, the stack's own ``client-token`` (so ``sightline enroll`` just works against ``sightline up``). A token
goes in clear text to loopback addresses only, unless TLS or ``SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from sightline.common import paths
from sightline.common.config import KafkaSettings
from sightline.common.ports import GRPC_PORTS
from sightline.tooling.localstack import HOST, StackState, client_token, load_state

if TYPE_CHECKING:
    import grpc


def _running_stack() -> StackState | None:
    state = load_state(paths.run_dir())
    return state if state is not None and state.any_alive() else None


def grpc_address(service: str, explicit: str | None = None) -> str:
    if explicit:
        return explicit
    stack = _running_stack()
    # A sharded matching runs as matching-0, matching-1...: its gallery API is on any of them.
    record = stack.services.get(service) or stack.services.get(f"{service}-0") if stack else None
    return f"{HOST}:{record.port if record else GRPC_PORTS[service]}"


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    """``--token``, for every command that calls a gRPC API."""
    parser.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help="bearer token (default: $SIGHTLINE_TOKEN, else the local stack's); "
        "prefer the variable: a flag is visible to other users in the process list",
    )


def connect(service: str, explicit_address: str | None = None, token: str | None = None) -> grpc.Channel:
    """A channel to a service, carrying the caller's bearer token (see the module docstring for which).

    Exits the command with the reason when the channel cannot be made as configured: a certificate that cannot be
    read, or a token that would go in clear text to another machine.
    """
    from sightline.common import auth
    from sightline.common.rpc import channel
    from sightline.common.tls import TlsError

    address = grpc_address(service, explicit_address)
    try:
        return channel(address, token or auth.outgoing_token(address) or _stack_token(address))
    except TlsError as error:
        raise SystemExit(f"error: {error}") from None


def _stack_token(address: str) -> str:
    """The local stack's client token, when ``address`` is one of its services (never sent anywhere else)."""
    stack = _running_stack()
    ports = {record.port for record in stack.services.values()} if stack else set()
    if address not in {f"{host}:{port}" for port in ports for host in (HOST, "localhost")}:
        return ""
    return client_token(paths.run_dir())


def kafka_settings(explicit: str | None = None) -> KafkaSettings:
    if explicit:
        return KafkaSettings(bootstrap_servers=explicit)
    stack = _running_stack()
    return KafkaSettings(bootstrap_servers=f"{HOST}:{stack.broker.port}") if stack else KafkaSettings()


def rpc_failed(exc: Any) -> int:
    """Report a failed call (its status and the service's message) on stderr; the command's exit code, 1."""
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1
