"""The ``video_1080p`` block of ``sightline bench detection``: focused scanning on a camera's video (issue #12).

A single frame must be scanned in full (about 100 ms of one core for 40 px faces at 1080p); a camera's stream need not
be: the detection service's scan plan (detection/scan_plan.py) scans closely only where the picture changed, around
the tracks and one tile in turn. This block measures that on synthetic video (sightline.tooling.walkers): per
background, VIDEO_FRAMES frames at 10 fps in which walkers (real faces of the sample photos, 40-80 px wide) cross the
view and a few people stand still, with per-frame sensor noise. Every frame goes through the plan, the detector and
the tracker exactly as in the service, with the service's default settings; the same frames are also scanned in full
for comparison. Times are per frame, detection only (plan included), single-threaded, after one untimed run of the
same video: onnxruntime prepares each new crop shape once, which a running service has long done. Recall counts the
walkers' faces in full view (the truth of ``walkers.video``); false detections are detections matching no face.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

VIDEO_FRAMES = 60
VIDEO_FPS = 10.0
BACKGROUNDS = 3
MOVING_WALKERS = 4
STILL_PEOPLE = 1
WALKER_WIDTHS = ((40.0, 60.0), (50.0, 80.0))  # (range at the start, range at the end) of a walk
STILL_WIDTH = 48.0
PEOPLE_BUCKETS = ((0, 1), (2, 3), (4, 5))  # people in view, for the cost by crowd size


def walkers_for(library: Any, seed: int, frames: int = VIDEO_FRAMES) -> list[Any]:
    """The walkers of one background: MOVING_WALKERS crossing at random times, STILL_PEOPLE standing all along."""
    from sightline.tooling.scenes import Look
    from sightline.tooling.walkers import Walker

    rng = np.random.default_rng((seed, 12))
    out = []
    for i in range(MOVING_WALKERS):
        face = library.faces[int(rng.integers(len(library.faces)))]
        first = int(rng.integers(0, max(1, frames // 2)))
        last = min(frames - 1, first + int(rng.integers(20, 50)))
        y = float(rng.uniform(150, 900))
        x0, x1 = float(rng.uniform(100, 600)), float(rng.uniform(1300, 1800))
        if rng.random() < 0.5:
            x0, x1 = x1, x0
        widths = (float(rng.uniform(*WALKER_WIDTHS[0])), float(rng.uniform(*WALKER_WIDTHS[1])))
        end = (x1, y + float(rng.uniform(-100, 100)))
        out.append(Walker(f"walker-{i}", face, first, last, (x0, y), end, widths, Look(bool(rng.random() < 0.5))))
    for i in range(STILL_PEOPLE):
        face = library.faces[int(rng.integers(len(library.faces)))]
        place = (float(rng.uniform(200, 1700)), float(rng.uniform(200, 900)))
        out.append(Walker(f"still-{i}", face, 0, frames - 1, place, place, (STILL_WIDTH, STILL_WIDTH)))
    return out


def run_video(library: Any, seed: int, frames: int = VIDEO_FRAMES) -> dict[str, Any]:
    """The figures of the block, focused (the service's default) beside full scans of the same frames."""
    from sightline.common.models.blazeface import FaceDetector
    from sightline.common.models.registry import model_files
    from sightline.detection.settings import DetectionSettings
    from sightline.tooling.walkers import video

    settings = DetectionSettings()
    detector = FaceDetector(model_files().detector, threads=1)
    videos = [
        list(video(library, walkers_for(library, seed + bg, frames), frames, background=bg, seed=seed))
        for bg in range(BACKGROUNDS)
    ]
    focused = settings.camera_scan("bench")
    full = dataclasses.replace(focused, tile_px=0)
    out: dict[str, Any] = {
        "frames": BACKGROUNDS * frames,
        "fps": VIDEO_FPS,
        "walkers_per_video": MOVING_WALKERS,
        "still_people_per_video": STILL_PEOPLE,
        "face_px": "40-80 (walkers grow as they come closer), 48 (still)",
        "min_face_px": focused.min_face_px,
        "tile_px": focused.tile_px,
    }
    for name, scan in (("focused", focused), ("full_scan", full)):
        _scan_videos(detector, videos, scan)  # untimed: every crop shape seen once
        out[name] = _summary(_scan_videos(detector, videos, scan))
    out["speed_up"] = round(out["full_scan"]["ms_mean"] / max(out["focused"]["ms_mean"], 1e-9), 2)
    return out


def _scan_videos(detector: Any, videos: list[list[Any]], scan: Any) -> list[dict[str, Any]]:
    """Per frame: people in view, wall and CPU ms, faces found, false detections and the share scanned closely."""
    from sightline.cli.bench_detection import match  # the same matching rule as the scenes of bench detection
    from sightline.detection.scan_plan import ScanPlanner
    from sightline.detection.tracker import FaceTracker

    rows = []
    for number, frames in enumerate(videos):
        camera = f"bench-{number}"
        planner, tracker = ScanPlanner(), FaceTracker()
        for frame in frames:
            at = frame.index / VIDEO_FPS
            wall, cpu = time.perf_counter(), time.thread_time()
            areas = planner.areas(camera, scan, frame.image, tracker.expected_boxes(camera, at))
            faces = detector.detect(frame.image, areas.min_face_px, areas.roi, areas.focus)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            boxes = [np.array(face.box) for face in faces]
            tracker.tracks_of(camera, at, boxes, [face.keypoints[:5] for face in faces], size=frame.image.shape[:2])
            hits, false = match([box for _, box in frame.faces], [tuple(map(float, box)) for box in boxes])
            height, width = frame.image.shape[:2]
            rows.append(
                {
                    "people": len(frame.faces),
                    "ms": wall * 1000,
                    "cpu_ms": cpu * 1000,
                    "found": sum(hits),
                    "false": false,
                    "share": areas.scanned_share(width, height),
                }
            )
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ms = np.array([row["ms"] for row in rows])
    faces = sum(row["people"] for row in rows)
    by_people = {}
    for low, high in PEOPLE_BUCKETS:
        chosen = np.array([row["ms"] for row in rows if low <= row["people"] <= high])
        if chosen.size:
            by_people[f"{low}-{high}"] = {
                "frames": int(chosen.size),
                "ms_mean": round(float(chosen.mean()), 1),
                "ms_p99": round(float(np.percentile(chosen, 99)), 1),
            }
    return {
        "recall": round(sum(row["found"] for row in rows) / max(1, faces), 3),
        "faces": faces,
        "false_per_frame": round(sum(row["false"] for row in rows) / len(rows), 3),
        "ms_mean": round(float(ms.mean()), 1),
        "ms_median": round(float(np.median(ms)), 1),
        "ms_p99": round(float(np.percentile(ms, 99)), 1),
        "cpu_ms_mean": round(float(np.mean([row["cpu_ms"] for row in rows])), 1),
        "scanned_share_mean": round(float(np.mean([row["share"] for row in rows])), 3),
        "ms_by_people_in_view": by_people,
    }
