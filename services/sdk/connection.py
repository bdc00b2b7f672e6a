"""One gRPC service as the SDK calls it: its channel (token, TLS), stubs, timeouts and typed errors.

The channel is Sightline's own (``common/rpc.py``: message size limits, trace context, the bearer token, TLS from
``common/tls.py``), made on the first call, so a client for several services fails only for the one it uses when
that one is misconfigured. Every call goes through ``call`` or ``stream``, which turn a ``grpc.RpcError`` into the
SDK's exception for its status (``errors.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from sightline.common.rpc import channel
from sightline.common.tls import TlsError, TlsSettings
from sightline.sdk.errors import ConfigurationError, from_rpc_error

S = TypeVar("S")


class Connection:
    """The channel to one service (made when first needed) and the calls made on it."""

    def __init__(self, address: str, token: str | None, tls: TlsSettings | None, timeout_s: float) -> None:
        """``token``: None sends the process's token (``$SIGHTLINE_TOKEN``...), "" none. ``tls``: None reads
        ``SIGHTLINE_TLS_*``."""
        self.address = address
        self.timeout_s = timeout_s
        self._token = token
        self._tls = tls
        self._lock = threading.Lock()  # a client may be shared by threads
        self._channel: grpc.Channel | None = None
        self._stubs: dict[Callable[[grpc.Channel], Any], Any] = {}

    def stub(self, factory: Callable[[grpc.Channel], S]) -> S:
        """The generated stub (``gallery_pb2_grpc.GalleryServiceStub``...) on this connection's channel."""
        with self._lock:
            if factory not in self._stubs:
                self._stubs[factory] = factory(self._open())
            stub: S = self._stubs[factory]
            return stub

    def call(self, stub: Any, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """A unary call; the SDK's exception for its status when it fails."""
        try:
            return getattr(stub, method)(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as error:
            raise from_rpc_error(error, method) from error

    def stream(self, stub: Any, method: str, request: Any, timeout_s: float | None = None) -> Iterator[Any]:
        """The responses of a server-streaming call; the SDK's exception when it fails, before or while streaming."""
        try:
            yield from getattr(stub, method)(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as error:
            raise from_rpc_error(error, method) from error

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel, self._stubs = None, {}

    def _open(self) -> grpc.Channel:
        if self._channel is None:
            try:
                self._channel = channel(self.address, self._token, self._tls)
            except TlsError as error:
                raise ConfigurationError(str(error)) from None
        return self._channel
