"""``sightline bench video``: what capture spends on a 1080p H.264 file at each sampling rate, and on its JPEGs.

Decoding (issue #12, "video at camera rates"): a real H.264 clip is written first (PyAV's libx264, the ``av`` wheel
of the test extra; :func:`write_clip`: 1920x1080 at 25 fps, a keyframe every 2 s like a camera's, 4 Mbit/s, from
:mod:`sightline.tooling.scenes` frames panning slowly, with sensor-like noise and the frame's index stamped in its
corner), then sampled at each rate three ways, each frame converted to RGB as capture hands it on:

- ``old``: the loop capture used before: every frame read (decoded, converted to BGR, copied), the due ones kept;
- ``new``: capture's own sources (``open_source``): frames between samples only grabbed; keyframes only once the
  sampling period spans 2 keyframe intervals; a seek per sample from 5 (capture/sources.py);
- ``seek``: OpenCV's seek (``CAP_PROP_POS_MSEC``) to each due time at every rate up to 1 fps, for comparison.

For each: samples, process CPU time per sample (FFmpeg's decoding threads included) and wall time; ``x_realtime`` is
media seconds read per wall second. Every sample's stamped index is checked against its media time.

JPEG: 1080p scenes with faces of 32-64 px at known places, encoded as capture publishes a decoded frame (RGB in,
OpenCV's encoder) at each quality, decoded as detection decodes (``decode_image``), and detected with
``min_face_px`` 40: recall against the known boxes (centre-in-box, as ``bench detection``), false detections, bytes
and encode time; ``descriptor_drift``: the median distance between each face's descriptor on the lossless frame and
on the JPEG's (dlib's same-person threshold is 0.6). Also the bytes of frames of the H.264 clip itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

DEFAULT_RATES = "25,5,1,0.2,0.1"
DEFAULT_SECONDS = 60.0  # 12 samples at 0.2 fps, 6 at 0.1
SEEK_MAX_RATE = 1.0  # the seek strategy is measured at this rate and below (above it, it only re-decodes)
QUALITIES = (100, 95, 92, 85, 75)
JPEG_FACE_WIDTHS = (32, 40, 48, 64)
JPEG_MIN_FACE_PX = 40.0
DEFAULT_JPEG_FRAMES = 8  # per face width: 8 faces a frame, so 64 faces a width
DRIFT_MIN_FACE_PX = 48  # descriptor drift on the faces that are embedded in practice
PAN_PX = 200  # the clip's camera pans this far over each scene
SCENE_SECONDS = 4.0  # one scene (background, faces) per 4 s of clip
NOISE_SIGMA = 1.5  # sensor noise, fresh in each frame (grey levels)
STAMP_BITS = 16


@dataclass(frozen=True)
class ClipSpec:
    """What :func:`write_clip` makes. Defaults: a 1080p camera's H.264 (no B frames, fixed 2 s GOP, 4 Mbit/s)."""

    seconds: float = 10.0
    fps: int = 25
    gop: int = 50  # frames from one keyframe to the next (no extra keyframes at scene cuts, as cameras do)
    size: tuple[int, int] = (1920, 1080)
    bitrate: int = 4_000_000
    b_frames: int = 0
    container: str = "mp4"  # or "mpegts" (what a stream or an NVR export carries)
    seed: int = 0
    keyframes: tuple[int, ...] = ()  # frames made keyframes instead of every gop-th (an irregular GOP)

    @property
    def frames(self) -> int:
        return round(self.seconds * self.fps)


def write_clip(path: Path, spec: ClipSpec = ClipSpec()) -> Path:
    """Write an H.264 clip of synthetic CCTV frames to ``path``; raises RuntimeError when no H.264 encoder is found."""
    try:
        import av
    except ImportError:
        raise RuntimeError("PyAV is not installed (the `av` wheel of the test extra: `make setup`)") from None
    from sightline.tooling.scenes import FaceLibrary, make_scene

    width, height = spec.size
    library = FaceLibrary()
    rng = np.random.default_rng(spec.seed)
    scenes = [make_scene(library, (width + PAN_PX, height), 64, i, spec.seed).image for i in range(3)]
    noise = rng.normal(0.0, NOISE_SIGMA, (height + 64, width + 64, 3)).astype(np.int16)
    with av.open(str(path), "w", format=spec.container) as out:
        gop = spec.frames + 1 if spec.keyframes else spec.gop
        options = {"preset": "veryfast", "g": f"{gop}", "keyint_min": f"{gop}", "sc_threshold": "0", "forced-idr": "1"}
        stream = out.add_stream("libx264", rate=spec.fps, options={**options, "bf": f"{spec.b_frames}"})
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = width, height, "yuv420p", spec.bitrate
        for index in range(spec.frames):
            scene = scenes[int(index / spec.fps / SCENE_SECONDS) % len(scenes)]
            x = (index * 2) % PAN_PX
            dx, dy = rng.integers(0, 64, 2)
            frame = np.clip(scene[:, x : x + width] + noise[dy : dy + height, dx : dx + width], 0, 255)
            picture = av.VideoFrame.from_ndarray(stamp(frame.astype(np.uint8), index), format="rgb24")
            if index in spec.keyframes:
                picture.pict_type = av.video.frame.PictureType.I
            out.mux(stream.encode(picture))
        out.mux(stream.encode(None))
    return path


def _stamp_cells(width: int) -> tuple[int, list[tuple[int, int]]]:
    cell = max(8, width // 40)
    return cell, [(cell // 4 + bit * cell, cell // 4) for bit in range(STAMP_BITS)]


def stamp(rgb: np.ndarray, index: int) -> np.ndarray:
    """The frame with ``index`` written in its top-left corner as black and white squares (one per bit)."""
    cell, corners = _stamp_cells(rgb.shape[1])
    inset = cell // 6
    for bit, (x, y) in enumerate(corners):
        rgb[y + inset : y + cell - inset, x + inset : x + cell - inset] = 255 if (index >> bit) & 1 else 0
    return rgb


def frame_index(rgb: np.ndarray) -> int:
    """The index :func:`stamp` wrote into a (decoded, lossy) frame."""
    cell, corners = _stamp_cells(rgb.shape[1])
    middle = slice(cell // 3, cell - cell // 3)
    bits = [rgb[y : y + cell, x : x + cell][middle, middle].mean() > 128 for x, y in corners]
    return sum(1 << bit for bit, on in enumerate(bits) if on)


# -- decoding ---------------------------------------------------------------------------------------------------------

Sampled = Iterator[tuple[float, np.ndarray]]  # (media time, RGB) per sample


def _policy_for(path: Path) -> Any:
    from sightline.capture.source_policy import SourcePolicy

    return SourcePolicy(roots=(path.resolve().parent,))


def _opened(path: Path) -> cv2.VideoCapture:
    """The clip opened as capture opens a file (same FFmpeg options), without its sampling."""
    from sightline.capture.source_policy import ffmpeg_capture_options
    from sightline.capture.sources import FFMPEG_OPTIONS_VARIABLE

    os.environ[FFMPEG_OPTIONS_VARIABLE] = ffmpeg_capture_options(_policy_for(path).vet(str(path)))
    try:
        return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    finally:
        os.environ.pop(FFMPEG_OPTIONS_VARIABLE, None)


def sample_old(path: Path, fps: float) -> Sampled:
    """Capture's loop before issue #12: every frame read, the due ones kept (next due = this one + the period)."""
    capture, period, next_time = _opened(path), 1.0 / fps, 0.0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            media_time = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            if media_time + 1e-6 < next_time:
                continue
            next_time = media_time + period
            yield media_time, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def sample_new(path: Path, fps: float) -> Sampled:
    """Capture's own sources, as an Ingest of the file reads it."""
    from sightline.capture.sources import open_source

    for frame in open_source(str(path), fps, _policy_for(path)):
        assert frame.pixels is not None
        yield frame.media_time_s, frame.pixels


def sample_seek(path: Path, fps: float) -> Sampled:
    """OpenCV's seek to each due time, then one read."""
    capture, due = _opened(path), 0.0
    try:
        while True:
            if due > 0 and not capture.set(cv2.CAP_PROP_POS_MSEC, due * 1000.0):
                return
            ok, bgr = capture.read()
            if not ok:
                return
            media_time = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            due = media_time + 1.0 / fps
            yield media_time, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def measure(sample: Callable[[Path, float], Sampled], path: Path, fps: float, spec: ClipSpec) -> dict[str, Any]:
    """Run one strategy at one rate: samples, CPU and wall time, and whether every sample is the frame it says."""
    cpu, wall = time.process_time(), time.perf_counter()
    times, wrong = [], 0
    for media_time, rgb in sample(path, fps):
        times.append(media_time)
        wrong += frame_index(rgb) != round(media_time * spec.fps)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    duration = spec.frames / spec.fps
    return {
        "samples": len(times),
        "cpu_ms_per_sample": round(1000 * cpu / max(1, len(times)), 1),
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "samples_per_s": round(len(times) / wall, 1) if wall else None,
        "x_realtime": round(duration / wall, 1) if wall else None,
        "first_times_s": [round(t, 2) for t in times[:6]],
        "wrong_frames": wrong,
    }


def bench_decoding(path: Path, spec: ClipSpec, rates: Sequence[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fps in rates:
        strategies = {"old": sample_old, "new": sample_new}
        if fps <= SEEK_MAX_RATE:
            strategies["seek"] = sample_seek
        row = {name: measure(sample, path, fps, spec) for name, sample in strategies.items()}
        row["cpu_saved"] = round(1 - row["new"]["cpu_s"] / row["old"]["cpu_s"], 2) if row["old"]["cpu_s"] else None
        out[f"{fps:g}"] = row
    return out


def keyframe_interval_s(path: Path) -> float | None:
    """The longest interval between the clip's first keyframes (read by decoding, as capture measures it)."""
    capture, keyframes = _opened(path), []
    try:
        while len(keyframes) < 4 and capture.grab():
            if capture.get(cv2.CAP_PROP_FRAME_TYPE) == ord("I"):
                keyframes.append(capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
    finally:
        capture.release()
    return max(np.diff(keyframes)) if len(keyframes) > 1 else None


# -- JPEG -------------------------------------------------------------------------------------------------------------


def _jpeg_variants() -> dict[str, list[int]]:
    variants = {f"q{q}": [cv2.IMWRITE_JPEG_QUALITY, q] for q in QUALITIES}
    variants["q85_optimize"] = [cv2.IMWRITE_JPEG_QUALITY, 85, cv2.IMWRITE_JPEG_OPTIMIZE, 1]
    variants["q85_444"] = [
        cv2.IMWRITE_JPEG_QUALITY,
        85,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    ]
    return variants


def _encoded(rgb: np.ndarray, params: list[int]) -> tuple[bytes, float]:
    """JPEG bytes as capture's _encode makes them (RGB to BGR, OpenCV's encoder), and the milliseconds taken."""
    started = time.perf_counter()
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    return buffer.tobytes(), 1000 * (time.perf_counter() - started)


def _descriptors(analyzer: Any, embedder: Any, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and descriptors of the faces the detection service would embed (min_face_px as in the recall)."""
    faces = analyzer.analyze(rgb, 0, JPEG_MIN_FACE_PX)
    if not faces:
        return np.zeros((0, 4)), np.zeros((0, 128))
    return np.stack([f.box for f in faces]), np.asarray(embedder.embed(np.stack([f.chip for f in faces])))


def _drift(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> list[float]:
    """Distances between the descriptors of the same faces (box centres within a few pixels) in two versions."""
    out = []
    centres = (other[0][:, :2] + other[0][:, 2:]) / 2 if len(other[0]) else np.zeros((0, 2))
    for box, descriptor in zip(*reference, strict=True):
        if not len(centres):
            break
        gaps = np.hypot(*(centres - (box[:2] + box[2:]) / 2).T)
        nearest = int(np.argmin(gaps))
        if gaps[nearest] <= 0.2 * (box[2] - box[0]):
            out.append(float(np.linalg.norm(other[1][nearest] - descriptor)))
    return out


def bench_jpeg(frames_per_width: int, seed: int, clip_frames: Sequence[np.ndarray]) -> dict[str, Any]:
    """Recall, false detections, descriptor drift, bytes and encode time of each JPEG variant on 1080p scenes."""
    from sightline.cli.bench_detection import match, single_thread
    from sightline.common.images import decode_image
    from sightline.common.models.blazeface import FaceDetector
    from sightline.common.models.embedder import FaceEmbedder
    from sightline.common.models.pipeline import FaceAnalyzer
    from sightline.common.models.registry import model_files
    from sightline.tooling.scenes import FRAME_SIZES, FaceLibrary, make_scene

    single_thread()
    files = model_files()
    detector = FaceDetector(files.detector, threads=1)
    analyzer, embedder = FaceAnalyzer(files, threads=1), FaceEmbedder(files.embedder, threads=1)
    library = FaceLibrary()
    variants = {"lossless": None, **_jpeg_variants()}
    tallies: dict[str, dict[str, Any]] = {
        name: {"found": {}, "false": 0, "bytes": [], "ms": [], "drift": []} for name in variants
    }
    frames = 0
    for face_px in JPEG_FACE_WIDTHS:
        for index in range(frames_per_width):
            scene = make_scene(library, FRAME_SIZES["1080p"], face_px, index, seed)
            frames += 1
            reference = _descriptors(analyzer, embedder, scene.image) if face_px >= DRIFT_MIN_FACE_PX else None
            for name, params in variants.items():
                tally = tallies[name]
                rgb = scene.image
                if params is not None:
                    data, ms = _encoded(scene.image, params)
                    tally["bytes"].append(len(data))
                    tally["ms"].append(ms)
                    rgb = decode_image(data)
                    if reference is not None:
                        tally["drift"] += _drift(reference, _descriptors(analyzer, embedder, rgb))
                hits, false = match(scene.faces, [d.box for d in detector.detect(rgb, min_face_px=JPEG_MIN_FACE_PX)])
                counts = tally["found"].setdefault(face_px, [0, 0])
                counts[0] += sum(hits)
                counts[1] += len(hits)
                tally["false"] += false
    out = {name: _jpeg_summary(tally, frames) for name, tally in tallies.items()}
    for name, params in variants.items():
        if params is not None and clip_frames:
            out[name]["clip_frame_kb"] = round(np.mean([len(_encoded(f, params)[0]) for f in clip_frames]) / 1024)
    return out


def _jpeg_summary(tally: dict[str, Any], frames: int) -> dict[str, Any]:
    found = tally["found"]
    summary: dict[str, Any] = {
        "recall_by_face_px": {str(px): round(f / t, 3) for px, (f, t) in sorted(found.items())},
        "faces": sum(t for _, t in found.values()),
        "false_per_frame": round(tally["false"] / frames, 2),
    }
    if tally["bytes"]:
        summary["kb_mean"] = round(float(np.mean(tally["bytes"])) / 1024)
        summary["encode_ms_median"] = round(float(np.median(tally["ms"])), 1)
    if tally["drift"]:
        summary["descriptor_drift_median"] = round(float(np.median(tally["drift"])), 4)
        summary["descriptor_drift_p95"] = round(float(np.percentile(tally["drift"], 95)), 4)
        summary["drift_faces"] = len(tally["drift"])
    return summary


# -- command ----------------------------------------------------------------------------------------------------------


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``video`` to ``sightline bench``'s kinds (called from bench.py's ``register``)."""
    parser = kinds.add_parser("video", help="1080p H.264 decoding at sampled rates (old vs new) and JPEG by quality")
    parser.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help=f"clip length (default {DEFAULT_SECONDS:g})"
    )
    parser.add_argument("--rates", default=DEFAULT_RATES, help=f"sampling rates, fps (default {DEFAULT_RATES})")
    parser.add_argument(
        "--clip",
        type=Path,
        help="H.264 clip to reuse, one this command wrote (its frames carry their index); written there if missing",
    )
    parser.add_argument(
        "--jpeg-frames",
        type=int,
        default=DEFAULT_JPEG_FRAMES,
        help=f"1080p scenes per face width for the JPEG figures (default {DEFAULT_JPEG_FRAMES}); 0 skips them",
    )
    parser.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on one line")
    parser.set_defaults(func=cmd_video)


def cmd_video(args: argparse.Namespace) -> int:
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit("error: --rates must be positive numbers, comma-separated")
    with tempfile.TemporaryDirectory(prefix="sightline-bench-video-") as scratch:
        path = args.clip or Path(scratch) / "clip.mp4"
        result = bench_video(path, args.seconds, rates, args.jpeg_frames, args.seed)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def bench_video(path: Path, seconds: float, rates: Sequence[float], jpeg_frames: int, seed: int) -> dict[str, Any]:
    """The figures of ``sightline bench video`` as one JSON-ready dict."""
    spec = ClipSpec(seconds=seconds, seed=seed)
    if not path.exists():
        print(f"writing a {seconds:g} s 1080p H.264 clip to {path}", file=sys.stderr)
        try:
            write_clip(path, spec)
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}") from None
    probe = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    clip = {
        **asdict(spec),
        "path": str(path),
        "frames": int(probe.get(cv2.CAP_PROP_FRAME_COUNT)),
        "bytes": path.stat().st_size,
        "keyframe_interval_s": keyframe_interval_s(path),
    }
    probe.release()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "opencv": cv2.__version__,
        "clip": clip,
        "decode": bench_decoding(path, spec, rates),
    }
    if jpeg_frames > 0:
        print("JPEG: encoding, decoding and detecting 1080p scenes", file=sys.stderr)
        sampled = [rgb for _, rgb in sample_new(path, 1.0 / max(1.0, math.floor(seconds / 8)))][:8]
        result["jpeg"] = {
            "frames_per_face_width": jpeg_frames,
            "min_face_px": JPEG_MIN_FACE_PX,
            "variants": bench_jpeg(jpeg_frames, seed, sampled),
        }
    return result
