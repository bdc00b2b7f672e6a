"""``sightline run SOURCE``: feed a folder, a video file or an RTSP URL through the capture service."""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from sightline.cli.endpoints import rpc_failed


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="stream a folder, video file or RTSP URL through the pipeline")
    parser.add_argument("source", help="folder of images, image file, video file or rtsp:// URL")
    parser.add_argument("--fps", type=float, default=0.0, help="frames per second to sample (default: service's)")
    parser.add_argument("--source-id", default="", help="camera/source name used as the Kafka key")
    parser.add_argument("--watchlist", action="append", default=[], help="search only these watchlists (repeatable)")
    parser.add_argument("--claim", default="", help="verify every face 1:1 against this enrolled subject")
    parser.add_argument("--max-frames", type=int, default=0)
    parser.add_argument("--no-pacing", action="store_true", help="publish files as fast as possible")
    parser.add_argument("--capture", help="capture gRPC address (default: the local stack)")
    from sightline.cli.endpoints import add_token_argument

    add_token_argument(parser)
    parser.set_defaults(func=cmd_run)


def ingest(
    source: str,
    *,
    fps: float = 0.0,
    source_id: str = "",
    watchlists: list[str] | None = None,
    claim: str = "",
    max_frames: int = 0,
    no_pacing: bool = False,
    address: str | None = None,
    progress: bool = True,
    token: str | None = None,
):  # type: ignore[no-untyped-def]
    """Run the Ingest RPC to the end; returns the final IngestResponse."""
    from tqdm import tqdm

    from sightline.cli.endpoints import connect
    from sightline.v1 import capture_pb2, capture_pb2_grpc, types_pb2

    purpose = types_pb2.PURPOSE_ECHANNEL if claim else types_pb2.PURPOSE_CCTV
    request = capture_pb2.IngestRequest(
        source_uri=source,
        source_id=source_id,
        fps=fps,
        purpose=purpose,
        claim_subject_id=claim,
        watchlists=watchlists or [],
        max_frames=max_frames,
        no_pacing=no_pacing,
    )
    stub = capture_pb2_grpc.CaptureServiceStub(connect("capture", address, token))
    last = None
    # disable=None: tqdm hides itself when stderr is not a terminal (logs, CI), instead of printing every refresh.
    with tqdm(unit="frame", desc="capture", disable=None if progress else True, file=sys.stderr) as bar:
        for last in stub.Ingest(request):
            bar.n = last.frames_read
            bar.set_postfix(published=last.frames_published, dropped=last.frames_dropped, failed=last.frames_failed)
            bar.refresh()
    return last


def source_argument(source: str) -> str:
    """A URL as given; a relative path made absolute, since capture resolves paths against its own folder."""
    return source if "://" in source else os.path.abspath(os.path.expanduser(source))


def cmd_run(args: argparse.Namespace) -> int:
    try:
        final = ingest(
            source_argument(args.source),
            fps=args.fps,
            source_id=args.source_id,
            watchlists=args.watchlist,
            claim=args.claim,
            max_frames=args.max_frames,
            no_pacing=args.no_pacing,
            address=args.capture,
            token=args.token,
        )
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    # Dropped: CCTV frames not published while the pipeline lagged (backpressure, docs/cctv.md).
    print(
        f"{final.source_id}: {final.frames_published} frame(s) published, {final.frames_dropped} dropped, "
        f"{final.frames_failed} failed (last frame {final.last_frame_id or '-'})"
    )
    return 0 if final.frames_published else 1
