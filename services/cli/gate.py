"""``sightline gate``: one e-channel session against the running stack, run the way a gate's kiosk runs it.

The claim (an enrolled subject, a chip portrait or a photographed data page) opens the session; the frames (image
files, folders of images, video files) are sent at the gate camera's rate while the session is watched; sending
stops as soon as the outcome is in (the gate has opened, or an officer is called), else the session is closed after
the last frame. A session this command cannot finish (a frame refused, capture unreachable, Ctrl-C) is cancelled,
so that no gate decision is taken for a traveller the gate no longer serves. Exit code 0 for ACCEPT, 1 for
REFER_TO_OFFICER (or a cancelled session), 2 for a usage error, a refused claim or a failed call. :func:`run_session`
is also what ``sightline bench gates`` runs on each simulated gate.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

EXIT_ACCEPT, EXIT_REFERRED, EXIT_USAGE = 0, 1, 2
CANCEL_TIMEOUT_S = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:
    from sightline.cli.endpoints import add_token_argument

    parser = subparsers.add_parser("gate", help="run one e-channel gate session: claim, frames, outcome")
    claim = parser.add_mutually_exclusive_group(required=True)
    claim.add_argument("--subject", help="claim: the subject id of an enrolled traveller")
    claim.add_argument("--portrait", type=Path, metavar="IMAGE", help="claim: the passport chip's portrait")
    claim.add_argument("--document", type=Path, metavar="IMAGE", help="claim: a photographed passport data page")
    parser.add_argument(
        "frames", nargs="+", metavar="FRAME_OR_VIDEO", help="camera frames: image files, folders of images, video files"
    )
    parser.add_argument("--gate", default="gate-1", help="gate id (default: gate-1)")
    parser.add_argument("--fps", type=float, default=10.0, help="frames sent per second, as a camera (default 10)")
    parser.add_argument(
        "--stop-list",
        action="append",
        default=[],
        help="also search the face on this stop list (repeatable; added to the service's default "
        "stop lists, which it cannot narrow)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="longest wait for the outcome, seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--capture", help="capture gRPC address (default: the local stack)")
    add_token_argument(parser)
    parser.set_defaults(func=cmd_gate)


class UsageError(ValueError):
    """A claim or frame file that cannot be used; the message says which and why."""


@dataclass
class SessionRun:
    """What one session gave, with the wall-clock times a benchmark needs."""

    session_id: str
    opened: Any  # OpenSessionResponse
    outcome: Any = None  # the final SessionUpdate (None: none arrived within the timeout)
    watch_error: grpc.RpcError | None = None  # why watching failed, other than by the timeout
    sent_at: list[float] = field(default_factory=list)  # epoch seconds at which each frame was sent (captured)
    frame_ids: list[str] = field(default_factory=list)
    decided_at: float = 0.0  # epoch seconds at which the outcome reached the kiosk

    @property
    def frames_sent(self) -> int:
        return len(self.sent_at)

    @property
    def elapsed_ms(self) -> float:
        """From the first frame sent to the outcome received: what the traveller waits for."""
        return (self.decided_at - self.sent_at[0]) * 1000 if self.sent_at and self.decided_at else 0.0


def open_request(
    gate_id: str,
    subject: str | None = None,
    portrait: Path | None = None,
    document: Path | None = None,
    stop_lists: list[str] | None = None,
) -> Any:
    from sightline.v1 import session_pb2

    request = session_pb2.OpenSessionRequest(gate_id=gate_id, stop_lists=stop_lists or [])
    if subject:
        request.subject_id = subject
    elif portrait:
        request.portrait = _read(portrait, "portrait")
    elif document:
        request.document_page = _read(document, "document page")
    return request


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror}") from None


def load_frames(sources: list[str], fps: float) -> list[bytes]:
    """JPEG or PNG bytes of every frame: images as they are (others re-encoded), videos sampled at ``fps``."""
    from sightline.capture.kiosk.kiosk import media_type_of
    from sightline.capture.source_policy import SourcePolicy
    from sightline.capture.sources import SourceError, open_source
    from sightline.common.images import ImageError, decode_image, encode_jpeg
    from sightline.common.rpc import InvalidInput

    frames = []
    for source in sources:
        try:
            for raw in open_source(source, fps, SourcePolicy.local_files()):  # the user's own files, read by the CLI
                if raw.error:
                    raise UsageError(f"{source}: {raw.error}")
                if raw.pixels is not None:
                    frames.append(encode_jpeg(raw.pixels))
                    continue
                try:
                    media_type_of(raw.encoded or b"")
                    frames.append(raw.encoded)
                except InvalidInput:
                    frames.append(encode_jpeg(decode_image(raw.encoded or b"")))
        except (SourceError, ImageError) as exc:
            raise UsageError(f"{source}: {exc}") from None
    if not frames:
        raise UsageError("no frames: give image files, folders of images or video files")
    return frames


def run_session(stub: Any, request: Any, frames: Iterable[bytes], fps: float, timeout: float) -> SessionRun:
    """Open a session, watch it, send the frames at ``fps`` until the outcome is in, close it if needed, and wait.

    grpc.RpcError from OpenSession propagates (INVALID_ARGUMENT: the claim was refused). Once the session is open, a
    call that fails (its RpcError propagates), a watch that breaks (``watch_error``) or a KeyboardInterrupt cancels
    it first.
    """
    opened = stub.OpenSession(request, timeout=120)
    run = SessionRun(opened.session_id, opened)
    decided = threading.Event()
    watcher = threading.Thread(target=_watch, args=(stub, run, decided, timeout), daemon=True, name="gate-watch")
    watcher.start()
    try:
        _send_frames(stub, run, frames, fps, decided)
        watcher.join(timeout)
    except grpc.RpcError as exc:
        _cancel(stub, run, f"the gate failed: {exc.code().name} from capture")
        raise
    except KeyboardInterrupt:
        _cancel(stub, run, "the gate was interrupted")
        raise
    if run.watch_error is not None:
        _cancel(stub, run, f"the gate stopped watching: {run.watch_error.code().name} from capture")
    return run


def _send_frames(stub: Any, run: SessionRun, frames: Iterable[bytes], fps: float, decided: threading.Event) -> None:
    """Send the frames at ``fps`` until the outcome is in (or the watch ends), then close the session if it is not."""
    from sightline.v1 import session_pb2

    started = time.monotonic()
    for index, frame in enumerate(frames):
        if decided.wait(max(0.0, started + index / fps - time.monotonic())):
            break
        captured_at = time.time()
        try:
            sent = stub.SendFrame(session_pb2.SendFrameRequest(session_id=run.session_id, image=frame), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # ended meanwhile (decided, timed out)
                break
            raise
        run.sent_at.append(captured_at)
        run.frame_ids.append(sent.frame_id)
    if not decided.is_set():
        try:
            stub.CloseSession(session_pb2.CloseSessionRequest(session_id=run.session_id), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise


def _cancel(stub: Any, run: SessionRun, reason: str) -> None:
    """Cancel the session, if capture can still be told (the error being reported matters more than this one)."""
    from sightline.v1 import session_pb2

    if run.outcome is not None:
        return
    try:
        stub.CancelSession(
            session_pb2.CancelSessionRequest(session_id=run.session_id, reason=reason), timeout=CANCEL_TIMEOUT_S
        )
    except grpc.RpcError:
        pass


def _watch(stub: Any, run: SessionRun, decided: threading.Event, timeout: float) -> None:
    from sightline.v1 import session_pb2

    try:
        for update in stub.WatchSession(session_pb2.WatchSessionRequest(session_id=run.session_id), timeout=timeout):
            if update.outcome != session_pb2.SESSION_OUTCOME_UNSPECIFIED:
                run.outcome, run.decided_at = update, time.time()
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # the timeout passed: no outcome, run.outcome stays None
            run.watch_error = exc
    finally:
        decided.set()


def summary(run: SessionRun) -> dict[str, Any]:
    from sightline.common.codec import outcome_name

    update = run.outcome
    return {
        "outcome": outcome_name(update.outcome),
        "reasons": list(update.reasons),
        "elapsed_ms": round(run.elapsed_ms, 1),
        "session_id": run.session_id,
        "frames_sent": run.frames_sent,
        "frames_verified": update.frames_verified,
        "best_similarity": round(update.best_similarity, 4),
        "liveness_score": round(update.liveness_score, 4),
        "evidence_frame_ids": list(update.evidence_frame_ids),
        "policy_version": update.policy_version,
        "model_version": update.model_version,
    }


def print_summary(result: dict[str, Any], run: SessionRun) -> None:
    document = f", document {run.opened.document_number}" if run.opened.document_number else ""
    print(
        f"{result['outcome']} after {result['elapsed_ms']:.0f} ms (session {run.session_id}, claim "
        f"{run.opened.claim_subject_id}{document})"
    )
    for reason in result["reasons"]:
        print(f"  - {reason}")
    print(
        f"  frames: {result['frames_sent']} sent, {result['frames_verified']} verified against the claim; best "
        f"similarity {result['best_similarity']:.3f}, liveness score {result['liveness_score']:.2f}"
    )
    if result["evidence_frame_ids"]:
        print(f"  evidence: {_frames(result['evidence_frame_ids'], run.session_id)}")
    print(f"  policy {result['policy_version'] or '-'}, model {result['model_version'] or '-'}")


def _frames(frame_ids: list[str], session_id: str) -> str:
    """Frame ids in short: ``frames 1, 2, 5 (<gate>:<session>:<n>)`` when all are the session's own."""
    prefixes = {frame_id.rsplit(":", 1)[0] for frame_id in frame_ids}
    if len(prefixes) != 1 or not next(iter(prefixes)).endswith(f":{session_id}"):
        return ", ".join(frame_ids)
    numbers = ", ".join(frame_id.rsplit(":", 1)[1] for frame_id in frame_ids)
    return f"frames {numbers} ({next(iter(prefixes))}:<n>)"


def cmd_gate(args: argparse.Namespace) -> int:
    from sightline.cli.endpoints import connect
    from sightline.v1 import session_pb2, session_pb2_grpc

    if args.fps <= 0:
        return _usage("--fps must be positive")
    try:
        request = open_request(args.gate, args.subject, args.portrait, args.document, args.stop_list)
        frames = load_frames(args.frames, args.fps)
    except UsageError as exc:
        return _usage(str(exc))
    stub = session_pb2_grpc.KioskServiceStub(connect("capture", args.capture, args.token))
    try:
        run = run_session(stub, request, frames, args.fps, args.timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return _usage(f"the claim was refused: {exc.details()}")
        return _usage(_failure(exc))
    if run.watch_error is not None and run.outcome is None:
        return _usage(f"watching session {run.session_id} failed: {_failure(run.watch_error)}")
    if run.outcome is None:
        print(f"error: no outcome for session {run.session_id} within {args.timeout:g} s", file=sys.stderr)
        return EXIT_REFERRED
    result = summary(run)
    if args.json:
        print(json.dumps(result))
    else:
        print_summary(result, run)
    return EXIT_ACCEPT if run.outcome.outcome == session_pb2.SESSION_OUTCOME_ACCEPT else EXIT_REFERRED


def _failure(exc: grpc.RpcError) -> str:
    hint = " (is the stack running? `sightline up`)" if exc.code() == grpc.StatusCode.UNAVAILABLE else ""
    return f"{exc.code().name}: {exc.details()}{hint}"


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE
