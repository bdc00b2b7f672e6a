"""``sightline bench``. ``pipeline``: the same frames through a bare in-process loop and through the five services.

(a) raw: decode, detect, landmarks, align, embed in one process, one frame after another;
(b) pipeline: the frames published through capture as fast as it can, through detection, embedding, matching and
decision as separate processes over the broker. Prints ``raw_fps``, ``pipeline_fps``, ``ratio`` (b/a), and the
capture-to-decision latency measured in a second, paced pass at half the measured pipeline rate (so that it shows the
pipeline's own latency, not the length of a queue). ``landmarks`` and ``fidelity`` check the face models;
``gates`` simulates e-channel gates (bench_gates.py); ``detection`` measures face detection (bench_detection.py);
``sizes`` measures recognition by face size (bench_sizes.py).
``video`` measures 1080p H.264 decoding at sampled rates, old vs new, and JPEG by quality (bench_video.py).
``search`` measures 1:N search at gallery scale, the ANN index against exact search (bench_search.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    pipeline = kinds.add_parser("pipeline", help="raw in-process loop vs the five services over the broker")
    pipeline.add_argument("--frames", type=int, default=60, help="frames per pass (sample photos, repeated)")
    pipeline.add_argument("--json", action="store_true", help="print one JSON object")
    pipeline.add_argument("--timeout", type=float, default=300.0)
    pipeline.set_defaults(func=cmd_pipeline)
    landmarks = kinds.add_parser("landmarks", help="5-point landmark speed, ours vs dlib's C++ (if dlib-bin is there)")
    landmarks.add_argument("--repeat", type=int, default=300)
    landmarks.set_defaults(func=cmd_landmarks)
    fidelity = kinds.add_parser("fidelity", help="our descriptors vs dlib's own pipeline on the sample photos")
    fidelity.set_defaults(func=cmd_fidelity)
    gates = kinds.add_parser("gates", help="N e-channel gates at once: time to decision, per-frame latency, capacity")
    gates.add_argument("--gates", default="2", help="number of gates, or a comma-separated list tried in turn (1,2,4)")
    gates.add_argument("--fps", type=float, default=10.0, help="frames per second per gate (default 10)")
    gates.add_argument("--seconds", type=float, default=30.0, help="how long each number of gates runs (default 30)")
    gates.add_argument(
        "--frames",
        type=int,
        default=50,
        help="most frames per session: a gate's camera sends until the outcome (default 50)",
    )
    gates.add_argument(
        "--target-ms",
        type=float,
        default=300.0,
        help="p99 last-needed-frame-to-decision within which a number of gates is sustained",
    )
    gates.add_argument("--running", action="store_true", help="use the running local stack instead of a private one")
    gates.add_argument("--json", action="store_true", help="print one JSON object")
    gates.add_argument("--timeout", type=float, default=300.0, help="longest wait for a private stack to start")
    gates.set_defaults(func=cmd_gates)
    from sightline.cli import bench_detection  # `detection`: its options and cmd_detection live in bench_detection.py

    bench_detection.register(kinds)
    from sightline.cli import bench_sizes  # `sizes`: recognition by face width, its options in bench_sizes.py

    bench_sizes.register(kinds)
    from sightline.cli import bench_search  # `search`: 1:N search at scale, its options in bench_search.py

    bench_search.register(kinds)
    from sightline.cli import bench_video  # `video`: decoding at sampled rates and JPEG quality, in bench_video.py

    bench_video.register(kinds)
    from sightline.cli import bench_chaos  # `chaos`: every service SIGKILLed while frames stream, in bench_chaos.py

    bench_chaos.register(kinds)
    from sightline.cli import bench_soak  # `soak`: minutes at a steady share of capacity, in bench_soak.py

    bench_soak.register(kinds)
    from sightline.cli import bench_outage  # `outage`: the broker away and back, in bench_outage.py

    bench_outage.register(kinds)


def bench_frames(count: int) -> list[Path]:
    from sightline.common.paths import samples_dir

    pool = sorted((samples_dir() / "face_recognition").glob("*.jpg")) + sorted(
        (samples_dir() / "dlib" / "faces").glob("*.jpg")
    )
    if not pool:
        raise SystemExit(f"error: no sample photos in {samples_dir()}: run `make setup`")
    return [pool[i % len(pool)] for i in range(count)]


def raw_loop(frames: list[Path]) -> dict[str, float]:
    from sightline.common.images import decode_image
    from sightline.common.models.pipeline import FacePipeline

    pipeline = FacePipeline()
    data = [f.read_bytes() for f in frames]
    for blob in data[:2]:
        pipeline.run(decode_image(blob))  # warm-up: first inference allocates
    stages = {"decode": 0.0, "analyze": 0.0, "embed": 0.0}
    faces = 0
    start = time.perf_counter()
    for blob in data:
        t0 = time.perf_counter()
        rgb = decode_image(blob)
        t1 = time.perf_counter()
        found = pipeline.analyzer.analyze(rgb)
        t2 = time.perf_counter()
        if found:
            pipeline.embedder.embed(np.stack([f.chip for f in found]))
        t3 = time.perf_counter()
        stages["decode"] += t1 - t0
        stages["analyze"] += t2 - t1
        stages["embed"] += t3 - t2
        faces += len(found)
    elapsed = time.perf_counter() - start
    return {
        "fps": len(data) / elapsed,
        "faces": faces,
        **{f"{k}_ms_per_frame": 1000 * v / len(data) for k, v in stages.items()},
    }


def _through_stack(stack: Any, frames: list[Path], source_id: str, fps: float, timeout: float) -> dict[str, Any]:
    from sightline.cli.outcomes import collect
    from sightline.cli.run import ingest
    from sightline.common.config import KafkaSettings

    folder = Path(tempfile.mkdtemp(prefix="sightline-bench-"))
    try:
        for i, frame in enumerate(frames):
            shutil.copy(frame, folder / f"{i:05d}{frame.suffix}")
        since = int(time.time() * 1000) - 1000
        start = time.time()
        ingest(
            str(folder),
            source_id=source_id,
            fps=fps,
            no_pacing=fps == 0,
            address=stack.addresses["capture"],
            progress=False,
        )
        outcomes = collect(
            KafkaSettings(bootstrap_servers=stack.bootstrap_servers),
            source_id,
            set(range(1, len(frames) + 1)),
            since,
            timeout,
            grace_s=0.0,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"start": start, "outcomes": outcomes}


def _frame_latencies(outcomes: Any) -> list[float]:
    """Per frame: capture time to its last decision (or to its match result when it had no face)."""
    from sightline.common.codec import seconds

    done: dict[int, float] = {seq: seconds(m.matched_at) for seq, m in outcomes.matches.items()}
    for d in outcomes.decisions:
        done[d.frame.sequence] = max(done.get(d.frame.sequence, 0.0), seconds(d.decided_at))
    return [done[seq] - seconds(m.frame.captured_at) for seq, m in outcomes.matches.items() if seq in done]


def pipeline_figures(frames: list[Path], timeout: float) -> dict[str, Any]:
    from sightline.cli.gallery import enroll
    from sightline.common.paths import samples_dir
    from sightline.tooling.localstack import LocalStack

    run_dir = Path(tempfile.mkdtemp(prefix="sightline-bench-run-"))
    # Like for like with the raw loop: every face embedded (no per-track selection) and no frame dropped for lag,
    # so the figures measure the services' throughput rather than how much work they were spared.
    env = {"SIGHTLINE_DETECTION_SEARCH_EVERY_FACE": "true", "SIGHTLINE_CAPTURE_BACKPRESSURE_MAX_LAG_FRAMES": "0"}
    with LocalStack(run_dir, ports="auto", env=env) as stack:
        stack.start(timeout=timeout)
        enroll(
            "obama", [samples_dir() / "face_recognition" / "obama.jpg"], ["bench"], address=stack.addresses["matching"]
        )
        _through_stack(stack, frames[:4], "bench-warmup", 0, timeout)  # warm-up: group joins, first inferences
        burst = _through_stack(stack, frames, "bench-throughput", 0, timeout)
        elapsed = _span(burst)
        pipeline_fps = len(burst["outcomes"].matches) / elapsed if elapsed > 0 else 0.0
        paced_fps = max(pipeline_fps / 2, 0.5)
        paced = _through_stack(stack, frames, "bench-latency", paced_fps, timeout)
    shutil.rmtree(run_dir, ignore_errors=True)
    latencies = np.array(_frame_latencies(paced["outcomes"])) * 1000
    return {
        "pipeline_fps": pipeline_fps,
        "frames_through": len(burst["outcomes"].matches),
        "latency_paced_fps": paced_fps,
        "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
        "latency_p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
    }


def _span(run: dict[str, Any]) -> float:
    """Seconds from the start of publishing to the last decision or match result of the run."""
    from sightline.common.codec import seconds

    outcomes = run["outcomes"]
    stamps = [d.decided_at for d in outcomes.decisions] + [m.matched_at for m in outcomes.matches.values()]
    if not stamps:
        return float("inf")
    return max(seconds(s) for s in stamps) - run["start"]


def cmd_pipeline(args: argparse.Namespace) -> int:
    frames = bench_frames(args.frames)
    print(f"raw loop over {len(frames)} frames...", file=sys.stderr)
    raw = raw_loop(frames)
    print("the same frames through the five services (starting a private local stack)...", file=sys.stderr)
    piped = pipeline_figures(frames, args.timeout)
    result = {
        "frames": len(frames),
        "faces_per_pass": raw["faces"],
        "raw_fps": round(raw["fps"], 2),
        "pipeline_fps": round(piped["pipeline_fps"], 2),
        "ratio": round(piped["pipeline_fps"] / raw["fps"], 3) if raw["fps"] else None,
        "latency_p50_ms": piped["latency_p50_ms"] and round(piped["latency_p50_ms"], 1),
        "latency_p99_ms": piped["latency_p99_ms"] and round(piped["latency_p99_ms"], 1),
        "latency_measured_at_fps": round(piped["latency_paced_fps"], 2),
        "raw_ms_per_frame": {
            k.removesuffix("_ms_per_frame"): round(v, 2) for k, v in raw.items() if k.endswith("_ms_per_frame")
        },
        "cores": __import__("os").cpu_count(),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if piped["frames_through"] == len(frames) else 1


def cmd_gates(args: argparse.Namespace) -> int:
    """Simulated gates against the stack (the logic is in bench_gates.py)."""
    from sightline.cli.bench_gates import bench_gates

    try:
        counts = sorted({int(n) for n in args.gates.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1 or args.fps <= 0 or args.seconds <= 0 or args.frames < 1:
        print(
            "error: --gates takes positive numbers (e.g. 2 or 1,2,4); --fps, --seconds and --frames must be positive",
            file=sys.stderr,
        )
        return 2
    result = bench_gates(counts, args.fps, args.seconds, args.frames, args.target_ms, args.running, args.timeout)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if all(r["sessions_decided"] == r["sessions"] for r in result["runs"]) else 1


def _per_call_ms(function: Any, repeat: int) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeat):
        function()
    return 1000 * (time.perf_counter() - start) / repeat


def cmd_landmarks(args: argparse.Namespace) -> int:
    """ms per face for one face and for ten faces at once, and against dlib's C++ when dlib-bin is installed."""
    from sightline.common.images import decode_image
    from sightline.common.models.face_chip import landmark_box_from_detection
    from sightline.common.models.pipeline import FaceAnalyzer
    from sightline.common.paths import samples_dir

    analyzer = FaceAnalyzer()
    rgb = decode_image((samples_dir() / "face_recognition" / "obama.jpg").read_bytes())
    detection = analyzer.detector.detect(rgb)[0]
    box = landmark_box_from_detection(np.asarray(detection.box), detection.keypoints)[None]
    ten = np.repeat(box, 10, axis=0)
    result: dict[str, Any] = {
        "ours_ms_per_face_1": round(_per_call_ms(lambda: analyzer.landmarks.predict(rgb, box), args.repeat), 3),
        "ours_ms_per_face_10": round(_per_call_ms(lambda: analyzer.landmarks.predict(rgb, ten), args.repeat) / 10, 3),
    }
    try:
        import dlib
    except ImportError:
        result["dlib"] = "dlib-bin not installed"
    else:
        predictor = dlib.shape_predictor(str(_model_sources() / "shape_predictor_5_face_landmarks.dat"))
        rect = dlib.rectangle(*(int(round(v)) for v in box[0]))
        result["dlib_cpp_ms_per_face"] = round(_per_call_ms(lambda: predictor(rgb, rect), args.repeat), 3)
    print(json.dumps(result))
    return 0


def _model_sources() -> Path:
    from sightline.common.paths import models_dir

    return models_dir() / "sources"


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Median and 90th percentile of the L2 distance between our descriptors and dlib's, face by face."""
    from sightline.common.models.convert.fidelity import descriptor_distances
    from sightline.common.paths import samples_dir

    images = sorted((samples_dir() / "face_recognition").glob("*.jpg")) + sorted(
        (samples_dir() / "dlib" / "faces").glob("*.jpg")
    )
    try:
        distances, hog_faces = descriptor_distances(images, _model_sources())
    except ImportError:
        print(
            "error: the fidelity benchmark needs dlib-bin (installed by `make setup` with the test extra)",
            file=sys.stderr,
        )
        return 2
    values = np.array(distances)
    print(
        json.dumps(
            {
                "images": len(images),
                "dlib_faces": hog_faces,
                "paired_faces": len(distances),
                "median_l2": round(float(np.median(values)), 4),
                "p90_l2": round(float(np.percentile(values, 90)), 4),
                "max_l2": round(float(values.max()), 4),
                "targets": {"median": 0.07, "p90": 0.15},
            }
        )
    )
    return 0
