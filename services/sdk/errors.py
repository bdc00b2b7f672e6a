"""The errors the SDK raises: one exception class per gRPC status, so callers catch what they mean.

Every failed call raises a subclass of ``CallFailed`` carrying the status code, the service's message and the method,
never a bare ``grpc.RpcError``: ``except NotFound`` instead of comparing ``exc.code()``. The classes also derive from
the Python built-ins they mean (``NotFound`` is a ``LookupError``, ``InvalidArgument`` a ``ValueError``,
``DeadlineExceeded`` a ``TimeoutError``), so generic code keeps working. ``ConfigurationError`` is raised before any
call: a channel that cannot be made as configured (a certificate that cannot be read, a token that would go in clear
text to another machine), or no local stack where one was asked for.
"""

from __future__ import annotations

from typing import cast

import grpc


class SightlineError(Exception):
    """Base of every error the SDK raises."""


class ConfigurationError(SightlineError):
    """The client or subscriber cannot be set up as configured; the message says what to change."""


class MalformedRecord(SightlineError):
    """A record on a topic is not the event its headers (or its topic) say it is."""


class CallFailed(SightlineError):
    """A gRPC call failed: ``code`` (a ``grpc.StatusCode``), ``details`` (the service's message) and ``method``."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {details}")
        self.code = code
        self.details = details
        self.method = method

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later unchanged (the service was unavailable, busy or slow)."""
        return self.code in _RETRYABLE


class InvalidArgument(CallFailed, ValueError):
    """The request was refused as it is (a bad id, an image without a usable face, a field over its limit)."""


class NotFound(CallFailed, LookupError):
    """The subject, watchlist, alert or session named does not exist."""


class AlreadyExists(CallFailed):
    """The name is taken (a watchlist)."""


class FailedPrecondition(CallFailed):
    """The call does not fit the current state: a closed alert, a second confirmation by the same reviewer, a session
    that has ended."""


class Unauthenticated(CallFailed):
    """No valid credentials: a missing, unknown or revoked bearer token."""


class PermissionDenied(CallFailed):
    """The token is valid but its principal lacks the role the method needs (see ``sightline auth methods``)."""


class ResourceExhausted(CallFailed):
    """The server is at its limit of calls or streams; retry later."""


class Unavailable(CallFailed):
    """The service (or something it needs) cannot be reached now; retry later."""


class DeadlineExceeded(CallFailed, TimeoutError):
    """The call did not finish within its timeout."""


class Cancelled(CallFailed):
    """The call was cancelled (by the client, or the server ended the stream)."""


class ServerError(CallFailed):
    """Any other status: a bug or an unexpected failure on the server (UNKNOWN, INTERNAL, UNIMPLEMENTED...)."""


_BY_CODE: dict[grpc.StatusCode, type[CallFailed]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)


def from_rpc_error(error: grpc.RpcError, method: str = "") -> CallFailed:
    """The SDK exception for a failed call (``raise from_rpc_error(exc, "Enroll") from exc``)."""
    call = cast(grpc.Call, error)  # every RpcError a call raises is also its grpc.Call
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = (call.details() if hasattr(call, "details") else "") or ""
    return _BY_CODE.get(code, ServerError)(code, details, method)
