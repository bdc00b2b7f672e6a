"""The kiosk API (``KioskService`` on capture): one e-channel session per traveller, as a gate runs it.

``open_session`` with exactly one claim (an enrolled subject id, the chip's portrait or a photographed data page)
gives a ``KioskSession``: send the camera's frames, then read the outcome (``outcome``, or every progress update
with ``updates``). Watching may start at any time: the first update is the latest one. ``send_frame`` raises
``FailedPrecondition`` once the session has ended (decided, timed out), which is the kiosk's cue to stop sending.
Used as a context manager, a session left by an exception is cancelled, so no gate decision is taken for a traveller
the gate no longer serves (``sightline gate`` does the same).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Self

from sightline.sdk.connection import Connection
from sightline.sdk.errors import SightlineError
from sightline.sdk.inputs import Image, image_bytes
from sightline.v1 import session_pb2, session_pb2_grpc

OPEN_TIMEOUT_S = 120.0  # a portrait or data-page claim is analysed (face, MRZ) before the session opens
CANCEL_TIMEOUT_S = 5.0


class KioskApi:
    """E-channel sessions: ``client.kiosk``."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def open_session(
        self,
        gate_id: str,
        *,
        subject_id: str | None = None,
        portrait: Image | None = None,
        document_page: Image | None = None,
        stop_lists: Sequence[str] = (),
    ) -> KioskSession:
        """Open a session with one claim; ``InvalidArgument`` when the claim cannot be used (unknown subject, no face
        in the portrait, unreadable MRZ: the message says which). ``stop_lists`` are searched too (1:N)."""
        claims = [c for c in (subject_id, portrait, document_page) if c is not None]
        if len(claims) != 1:
            raise ValueError("give exactly one claim: subject_id, portrait or document_page")
        request = session_pb2.OpenSessionRequest(gate_id=gate_id, stop_lists=list(stop_lists))
        if subject_id is not None:
            request.subject_id = subject_id
        elif portrait is not None:
            request.portrait = image_bytes(portrait)
        elif document_page is not None:
            request.document_page = image_bytes(document_page)
        stub = self._connection.stub(session_pb2_grpc.KioskServiceStub)
        opened: session_pb2.OpenSessionResponse = self._connection.call(stub, "OpenSession", request, OPEN_TIMEOUT_S)
        return KioskSession(self._connection, stub, opened)


class KioskSession:
    """One open session: ``session_id``, ``opened`` (claim kind, claim subject, document number, deadline)."""

    def __init__(
        self, connection: Connection, stub: session_pb2_grpc.KioskServiceStub, opened: session_pb2.OpenSessionResponse
    ) -> None:
        self._connection = connection
        self._stub = stub
        self.opened = opened
        self.session_id = opened.session_id
        self.last_outcome: session_pb2.SessionUpdate | None = None

    def send_frame(self, image: Image) -> session_pb2.SendFrameResponse:
        """Send one camera frame (JPEG or PNG); its frame id and the frames sent so far."""
        request = session_pb2.SendFrameRequest(session_id=self.session_id, image=image_bytes(image))
        sent: session_pb2.SendFrameResponse = self._connection.call(self._stub, "SendFrame", request)
        return sent

    def close(self) -> None:
        """No more frames: the session is decided with what was sent."""
        self._connection.call(self._stub, "CloseSession", session_pb2.CloseSessionRequest(session_id=self.session_id))

    def cancel(self, reason: str) -> None:
        """End the session without a decision (outcome CANCELLED): the traveller left, the kiosk aborted."""
        request = session_pb2.CancelSessionRequest(session_id=self.session_id, reason=reason)
        self._connection.call(self._stub, "CancelSession", request, CANCEL_TIMEOUT_S)

    def updates(self, timeout_s: float) -> Iterator[session_pb2.SessionUpdate]:
        """Progress updates, then the outcome (the last one); ``DeadlineExceeded`` when ``timeout_s`` passes first."""
        request = session_pb2.WatchSessionRequest(session_id=self.session_id)
        for update in self._connection.stream(self._stub, "WatchSession", request, timeout_s):
            if update.outcome != session_pb2.SESSION_OUTCOME_UNSPECIFIED:
                self.last_outcome = update
            yield update

    def outcome(self, timeout_s: float = 60.0) -> session_pb2.SessionUpdate:
        """Wait for the outcome (ACCEPT, REFER_TO_OFFICER or CANCELLED) with its reasons and evidence."""
        for _ in self.updates(timeout_s):
            if self.last_outcome is not None:
                return self.last_outcome
        raise SightlineError(f"session {self.session_id} ended its updates without an outcome")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None or self.last_outcome is not None:
            return
        try:
            self.cancel(f"the kiosk stopped: {exc_type.__name__}")
        except SightlineError:
            pass  # the error that ended the block matters more than this one
