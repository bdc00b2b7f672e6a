"""``sightline bench detection``: face detection recall by face size, false detections and time per frame (issue #12).

Runs Sightline's detector (with ``min_face_px`` and whole-frame only) and dlib's HOG detector (upsample 0 and 1) on
the same synthetic 1080p and 4K scenes (:mod:`sightline.tooling.scenes`: real faces pasted at known sizes into
face-free backgrounds) and on dlib's examples/faces testing.xml photos with their annotated boxes, and prints one JSON
object with a ``goal`` block (issue #12's targets, each with ``met``).

A detection matches a truth box when its box centre falls inside the truth box (one-to-one, nearest centre first).
Not IoU: dlib's truth boxes are HOG-style squares from the eyebrows to the chin, while BlazeFace's boxes take in the
forehead, so a correct BlazeFace box can have an IoU under 0.4 with a small truth box; the centre test treats both
conventions alike. Unmatched detections are false detections.

Timing is single-threaded (onnxruntime with one thread, OpenCV and OpenMP set to one thread; dlib's HOG is
single-threaded), per frame, detection only: the frame is already decoded. dlib is the ``dlib-bin`` wheel of the
test extra, imported lazily; without it the dlib rows say so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from sightline.cli.bench_focus import VIDEO_FRAMES, run_video

Box = tuple[float, float, float, float]
Detect = Callable[[np.ndarray], list[Box]]

DEFAULT_FRAMES = 5  # per face width and frame size: the default run stays under 3 minutes on 2 cores
DEFAULT_SIZES = "32,40,48,64,96,128"
DLIB_UP1_FRAMES = 1  # per face width (and face-free): dlib HOG with one upsampling takes ~1.1 s per 1080p frame
DLIB_4K_FRAMES = 1  # per face width: dlib HOG at 4K takes ~1.3 s per frame without upsampling
CROWD_FACES = 40  # a crowd in one 1080p frame (issue #12), faces of CROWD_FACE_PX
CROWD_FACE_PX = 56
FACE_FREE_FRAMES = 6  # per frame size, two of each background kind
FACE_FREE_4K_FRAMES = 3
GOALS = {"recall_40px_min": 0.95, "recall_32px_min": 0.80, "false_per_face_free_frame_max": 0.05, "ms_1080p_max": 40}


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``detection`` to ``sightline bench``'s kinds (called from bench.py's ``register``)."""
    parser = kinds.add_parser("detection", help="face detection recall by face size and ms per frame, ours vs dlib HOG")
    parser.add_argument(
        "--frames", type=int, default=DEFAULT_FRAMES, help=f"frames per face width (default {DEFAULT_FRAMES})"
    )
    parser.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"face box widths in px, comma-separated (default {DEFAULT_SIZES})"
    )
    parser.add_argument(
        "--min-face-px", type=float, default=32.0, help="min_face_px passed to Sightline's detector (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    parser.add_argument("--no-dlib", action="store_true", help="skip dlib's HOG detector")
    parser.add_argument("--no-4k", action="store_true", help="skip the 3840x2160 frames")
    parser.add_argument(
        "--video-frames",
        type=int,
        default=VIDEO_FRAMES,
        help=f"frames per background of the video_1080p block, focused scanning (default {VIDEO_FRAMES}; 0: skip it)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on one line")
    parser.set_defaults(func=cmd_detection)


def single_thread() -> None:
    """One core for every library that would spread a frame over several (the goal is per core)."""
    import cv2

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    cv2.setNumThreads(1)


# -- matching --------------------------------------------------------------------------------------------------------


def match(truth: Sequence[Box], found: Sequence[Box]) -> tuple[list[bool], int]:
    """Which truth boxes were found (a detection's centre inside the box, one-to-one), and how many detections were
    left over (false detections)."""
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in found]
    free = set(range(len(found)))
    hits = []
    for box in truth:
        mid = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        inside = [i for i in free if box[0] <= centres[i][0] <= box[2] and box[1] <= centres[i][1] <= box[3]]
        if inside:
            best = min(inside, key=lambda i: np.hypot(centres[i][0] - mid[0], centres[i][1] - mid[1]))
            free.discard(best)
        hits.append(bool(inside))
    return hits, len(free)


class Tally:
    """Running figures of one detector on one set of frames."""

    def __init__(self) -> None:
        self.found: dict[int, list[int]] = {}  # face width -> [found, total]
        self.face_free_frames = 0
        self.face_free_false = 0
        self.face_frame_false = 0
        self.face_frames = 0
        self.ms: list[float] = []

    def add(self, face_px: int | None, truth: Sequence[Box], found: Sequence[Box], ms: float) -> None:
        hits, false = match(truth, found)
        self.ms.append(ms)
        if face_px is None:
            self.face_free_frames += 1
            self.face_free_false += false
            return
        self.face_frames += 1
        self.face_frame_false += false
        counts = self.found.setdefault(face_px, [0, 0])
        counts[0] += sum(hits)
        counts[1] += len(hits)

    def summary(self) -> dict[str, Any]:
        ms = np.array(self.ms) if self.ms else np.array([np.nan])
        return {
            "recall_by_face_px": {str(px): round(f / t, 3) if t else None for px, (f, t) in sorted(self.found.items())},
            "faces_by_face_px": {str(px): t for px, (_, t) in sorted(self.found.items())},
            "false_per_face_free_frame": (
                round(self.face_free_false / self.face_free_frames, 3) if self.face_free_frames else None
            ),
            "face_free_frames": self.face_free_frames,
            "false_per_face_frame": round(self.face_frame_false / self.face_frames, 3) if self.face_frames else None,
            "ms_median": round(float(np.median(ms)), 1),
            "ms_p90": round(float(np.percentile(ms, 90)), 1),
            "frames": len(self.ms),
        }


# -- detectors -------------------------------------------------------------------------------------------------------


def sightline_detectors(min_face_px: float) -> tuple[dict[str, Detect], dict[str, Any]]:
    """Sightline with ``min_face_px`` and whole-frame only, on one thread; and notes for the JSON."""
    from sightline.common.models.blazeface import FaceDetector
    from sightline.common.models.registry import model_files

    detector = FaceDetector(model_files().detector, threads=1)
    notes: dict[str, Any] = {"min_face_px": min_face_px}

    def small(rgb: np.ndarray) -> list[Box]:
        return [d.box for d in detector.detect(rgb, min_face_px=min_face_px)]

    def whole(rgb: np.ndarray) -> list[Box]:
        return [d.box for d in detector.detect(rgb)]

    return {"sightline": small, "sightline_whole_frame": whole}, notes


def dlib_detectors() -> dict[str, Detect] | str:
    """dlib's HOG detector without and with one upsampling, or why it is not there."""
    try:
        import dlib
    except ImportError:
        return "dlib not installed (the dlib-bin wheel of the test extra: `make setup`)"
    hog = dlib.get_frontal_face_detector()

    def run(upsample: int) -> Detect:
        def detect(rgb: np.ndarray) -> list[Box]:
            return [
                (float(r.left()), float(r.top()), float(r.right() + 1), float(r.bottom() + 1))
                for r in hog(rgb, upsample)
            ]

        return detect

    return {"dlib_hog_up0": run(0), "dlib_hog_up1": run(1)}


def _timed(detect: Detect, rgb: np.ndarray) -> tuple[list[Box], float]:
    start = time.perf_counter()
    found = detect(rgb)
    return found, 1000 * (time.perf_counter() - start)


# -- runs ------------------------------------------------------------------------------------------------------------


def run_scenes(
    library: Any,
    size: tuple[int, int],
    widths: Sequence[int],
    frames: int,
    face_free: int,
    seed: int,
    detectors: dict[str, tuple[Detect, int, int]],
    progress: Any,
) -> dict[str, Tally]:
    """Each detector on the scenes of one frame size. ``detectors``: name -> (detect, frames per width, face-free
    frames); a detector limited to fewer frames runs on the first ones of each series, so all see the same frames."""
    from sightline.tooling.scenes import make_scene

    tallies = {name: Tally() for name in detectors}
    series: list[tuple[int | None, int]] = [(px, i) for px in widths for i in range(frames)]
    series += [(None, i) for i in range(face_free)]
    for face_px, index in series:
        scene = make_scene(library, size, face_px, index, seed)
        for name, (detect, per_width, free) in detectors.items():
            if index >= (free if face_px is None else per_width):
                continue
            found, ms = _timed(detect, scene.image)
            tallies[name].add(face_px, scene.faces, found, ms)
        progress.update(1)
    return tallies


def run_dlib_photos(detectors: dict[str, Detect]) -> dict[str, Any]:
    """Each detector on dlib's examples/faces testing.xml photos: recall and false detections against the boxes."""
    from sightline.common.images import decode_image
    from sightline.common.paths import samples_dir
    from sightline.tooling.scenes import parse_dlib_boxes

    folder = samples_dir() / "dlib" / "faces"
    annotated = parse_dlib_boxes(folder / "testing.xml")
    photos = {name: decode_image((folder / name).read_bytes()) for name in sorted(annotated)}
    out: dict[str, Any] = {"photos": len(photos), "faces": sum(len(b) for b in annotated.values())}
    for name, detect in detectors.items():
        found_total, false_total = 0, 0
        for photo, rgb in photos.items():
            hits, false = match(annotated[photo], detect(rgb))
            found_total += sum(hits)
            false_total += false
        out[name] = {"recall": round(found_total / out["faces"], 3), "false_detections": false_total}
    return out


def run_crowd(library: Any, min_face_px: float, seed: int, repeats: int = 3) -> dict[str, Any]:
    """A 1080p frame with CROWD_FACES faces of CROWD_FACE_PX: what detection (with landmarks, chips and quality)
    and the embedding of every face in one batch cost per frame, on one thread; the median of ``repeats`` runs.

    Every face is embedded here, as on a camera's first frame (each face starts a track, and a track's first faces
    are searched); on later frames the tracker sends only a track's better faces, so this is the worst frame.
    """
    from sightline.common.models.embedder import FaceEmbedder
    from sightline.common.models.pipeline import FaceAnalyzer
    from sightline.common.models.registry import model_files
    from sightline.detection.settings import DetectionSettings
    from sightline.tooling.scenes import FRAME_SIZES, make_scene

    files = model_files()
    analyzer, embedder = FaceAnalyzer(files, threads=1), FaceEmbedder(files.embedder, threads=1)
    scene = make_scene(library, FRAME_SIZES["1080p"], CROWD_FACE_PX, 0, seed, faces=CROWD_FACES)
    timings: dict[str, list[float]] = {"analyze_ms": [], "embed_ms": []}
    for _ in range(repeats):
        started = time.perf_counter()
        faces = analyzer.analyze(scene.image, 0, min_face_px)
        timings["analyze_ms"].append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        embedder.embed(np.stack([face.chip for face in faces]))
        timings["embed_ms"].append((time.perf_counter() - started) * 1000)
    hits, false = match(scene.faces, [tuple(map(float, face.box)) for face in faces])
    medians = {name: round(float(np.median(values)), 1) for name, values in timings.items()}
    return {
        "face_px": CROWD_FACE_PX,
        "faces": len(scene.faces),
        "found": sum(hits),
        "false_detections": false,
        **medians,
        "embed_ms_per_face": round(medians["embed_ms"] / max(1, len(faces)), 2),
        "total_ms": round(medians["analyze_ms"] + medians["embed_ms"], 1),
        "max_faces_default": DetectionSettings().max_faces,
    }


def _goals(result: dict[str, Any], widths: Sequence[int]) -> dict[str, Any]:
    ours = result["1080p"]["sightline"]
    recall = ours["recall_by_face_px"]
    at_least_40 = [recall[str(px)] for px in widths if px >= 40 and recall.get(str(px)) is not None]
    goals: dict[str, Any] = {}
    if at_least_40:
        goals["recall_faces_40px_and_wider"] = {
            "value": min(at_least_40),
            "target": f">= {GOALS['recall_40px_min']}",
            "met": min(at_least_40) >= GOALS["recall_40px_min"],
        }
    if recall.get("32") is not None:
        goals["recall_32px"] = {
            "value": recall["32"],
            "target": f">= {GOALS['recall_32px_min']}",
            "met": recall["32"] >= GOALS["recall_32px_min"],
        }
    false = ours["false_per_face_free_frame"]
    if false is not None:
        goals["false_per_face_free_frame"] = {
            "value": false,
            "target": f"<= {GOALS['false_per_face_free_frame_max']}",
            "met": false <= GOALS["false_per_face_free_frame_max"],
        }
    goals["ms_per_1080p_frame_median"] = {
        "value": ours["ms_median"],
        "target": f"<= {GOALS['ms_1080p_max']}",
        "met": ours["ms_median"] <= GOALS["ms_1080p_max"],
    }
    video = result["video_1080p"].get("focused") if isinstance(result.get("video_1080p"), dict) else None
    if video:
        goals["ms_per_1080p_video_frame_mean"] = {
            "value": video["ms_mean"],
            "target": f"<= {GOALS['ms_1080p_max']}",
            "met": video["ms_mean"] <= GOALS["ms_1080p_max"],
            "note": "a camera's stream with focused scanning (video_1080p); a lone frame is scanned in full",
        }
    goals["all_met"] = all(g["met"] for g in goals.values())
    return goals


def bench_detection(
    widths: Sequence[int],
    frames: int,
    min_face_px: float,
    seed: int,
    use_dlib: bool,
    with_4k: bool,
    progress: bool,
    video_frames: int = VIDEO_FRAMES,
) -> dict[str, Any]:
    """The figures of ``sightline bench detection`` as one JSON-ready dict."""
    from tqdm import tqdm

    from sightline.tooling.scenes import FACES_PER_FRAME, FRAME_SIZES, FaceLibrary

    single_thread()
    library = FaceLibrary()
    ours, notes = sightline_detectors(min_face_px)
    hog = dlib_detectors() if use_dlib else "skipped (--no-dlib)"
    face_free = FACE_FREE_FRAMES
    up1_free = min(face_free, 2)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "threads": 1,
        "seed": seed,
        "face_widths_px": list(widths),
        "frames_per_face_width": frames,
        "faces_per_frame": FACES_PER_FRAME,
        "face_free_frames": face_free,
        "match": "detection box centre inside the truth box, one-to-one (not IoU: box conventions differ)",
        "face_width": "truth box width, dlib convention (HOG-style square, eyebrows to chin)",
        "sightline_min_face_px": notes["min_face_px"],
    }
    sizes_1080 = {name: (detect, frames, face_free) for name, detect in ours.items()}
    sizes_4k = {"sightline": (ours["sightline"], frames, FACE_FREE_4K_FRAMES)}
    if isinstance(hog, dict):
        up1 = min(frames, DLIB_UP1_FRAMES)
        sizes_1080["dlib_hog_up0"] = (hog["dlib_hog_up0"], frames, face_free)
        sizes_1080["dlib_hog_up1"] = (hog["dlib_hog_up1"], up1, up1_free)
        sizes_4k["dlib_hog_up0"] = (hog["dlib_hog_up0"], min(frames, DLIB_4K_FRAMES), 1)
        result["dlib"] = (
            f"dlib_hog_up1 limited to {up1} frame(s) per face width and {up1_free} face-free frames at 1080p "
            f"(~1.1 s per frame); at 4K only dlib_hog_up0, on {min(frames, DLIB_4K_FRAMES)} frame(s) per face width "
            "and 1 face-free frame; dlib_hog_up1 skipped at 4K (~4.5 s per frame)"
        )
    else:
        result["dlib"] = hog
    warm = np.zeros((1080, 1920, 3), np.uint8)
    for detect, _, _ in sizes_1080.values():
        detect(warm)  # first inference allocates; keep it out of the timings
    total = len(widths) * frames + face_free + (0 if not with_4k else len(widths) * frames + FACE_FREE_4K_FRAMES)
    with tqdm(total=total, desc="bench detection", unit="frame", file=sys.stderr, disable=not progress) as bar:
        bar.set_postfix_str("1080p")
        tallies = run_scenes(library, FRAME_SIZES["1080p"], widths, frames, face_free, seed, sizes_1080, bar)
        result["1080p"] = {name: tally.summary() for name, tally in tallies.items()}
        if with_4k:
            bar.set_postfix_str("4K")
            tallies = run_scenes(library, FRAME_SIZES["4k"], widths, frames, FACE_FREE_4K_FRAMES, seed, sizes_4k, bar)
            result["4k"] = {name: tally.summary() for name, tally in tallies.items()}
    photo_detectors = dict(ours)
    if isinstance(hog, dict):
        photo_detectors.update(hog)
    result["dlib_testing_photos"] = run_dlib_photos(photo_detectors)
    result["crowd_1080p"] = run_crowd(library, min_face_px, seed)
    if progress and video_frames:
        print("bench detection: video_1080p (focused scanning, about a minute)", file=sys.stderr)
    result["video_1080p"] = run_video(library, seed, video_frames) if video_frames else "skipped (--video-frames 0)"
    result["goal"] = _goals(result, widths)
    return result


def cmd_detection(args: argparse.Namespace) -> int:
    try:
        widths = sorted({int(v) for v in args.sizes.split(",") if v.strip()})
    except ValueError:
        widths = []
    if not widths or widths[0] < 8 or args.frames < 1 or args.video_frames < 0:
        print(
            "error: --sizes takes face widths of 8 px or more (e.g. 32,48,128); --frames must be positive, "
            "--video-frames 0 or more",
            file=sys.stderr,
        )
        return 2
    try:
        result = bench_detection(
            widths,
            args.frames,
            args.min_face_px,
            args.seed,
            not args.no_dlib,
            not args.no_4k,
            progress=True,
            video_frames=args.video_frames,
        )
    except FileNotFoundError as exc:  # models or sample photos not fetched
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
