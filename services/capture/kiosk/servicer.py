"""``sightline.v1.KioskService``: the kiosk's gRPC face, its session errors mapped to their gRPC status."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import grpc

from sightline.capture.kiosk.kiosk import Kiosk, Update
from sightline.capture.kiosk.session_store import SessionNotOpen, TooManySessions
from sightline.common.rpc import rpc_errors
from sightline.v1 import session_pb2, session_pb2_grpc

Context = grpc.ServicerContext

_STATUS = {SessionNotOpen: grpc.StatusCode.FAILED_PRECONDITION, TooManySessions: grpc.StatusCode.RESOURCE_EXHAUSTED}


def _kiosk_errors(method):  # type: ignore[no-untyped-def]
    """The kiosk's own failures as their gRPC status, with the message (InvalidInput/NotFound/Unavailable:
    ``rpc_errors``)."""

    @functools.wraps(method)
    def wrapper(self, request, context):  # type: ignore[no-untyped-def]
        try:
            return method(self, request, context)
        except (SessionNotOpen, TooManySessions) as exc:
            context.abort(_STATUS[type(exc)], str(exc))

    return wrapper


class KioskServicer(session_pb2_grpc.KioskServiceServicer):
    def __init__(self, kiosk: Kiosk) -> None:
        self._kiosk = kiosk

    @rpc_errors
    @_kiosk_errors
    def OpenSession(self, request: session_pb2.OpenSessionRequest, context: Context) -> session_pb2.OpenSessionResponse:
        return self._kiosk.open(request)

    @rpc_errors
    @_kiosk_errors
    def SendFrame(self, request: session_pb2.SendFrameRequest, context: Context) -> session_pb2.SendFrameResponse:
        return self._kiosk.send(request)

    @rpc_errors
    @_kiosk_errors
    def CloseSession(
        self, request: session_pb2.CloseSessionRequest, context: Context
    ) -> session_pb2.CloseSessionResponse:
        self._kiosk.close_session(request)
        return session_pb2.CloseSessionResponse()

    @rpc_errors
    @_kiosk_errors
    def CancelSession(
        self, request: session_pb2.CancelSessionRequest, context: Context
    ) -> session_pb2.CancelSessionResponse:
        self._kiosk.cancel(request)
        return session_pb2.CancelSessionResponse()

    @rpc_errors
    @_kiosk_errors
    def WatchSession(self, request: session_pb2.WatchSessionRequest, context: Context) -> Iterator[Update]:
        return self._kiosk.watch(request.session_id, context.is_active)
