"""``sightline bench soak``: the five services at a steady share of their capacity for minutes, watched for the slow
failures a short test cannot see: memory that grows, lag that never comes back down, latency that drifts.

A private local stack runs with the chaos benchmark's cameras (bench_chaos.py: dlib's "johns" in CCTV-like 640x480
frames, tracks of one person, two of five on a watchlist), nothing killed. Then:

- **Cameras**: each is read by capture at CAMERA_FPS or a little less, several at once; detection's tracker is set
  (TRACK_MAX_AGE_S) so that at those rates each person's walk is one track and the next person a new one.
- **Capacity**: unless ``--fps`` is given, CALIBRATION_CAMERAS cameras at once offer more frames than the pipeline
  can take, and the rate at which their frames reach a terminal record (a decision, NO_FACE included, or a dead
  letter) is the capacity.
- **Soak**: enough cameras at once to offer ``--load`` (default 80%) of that rate, for ``--minutes``. Each pass over
  the cameras uses new source ids, so every frame id is new.
- **Samples**, every ``--sample-s``: the resident memory (RSS) of each service process and of the broker, and the
  consumer lag of each stream service (common/lag.py). **Latency** of every decision, its ``decided_at`` minus its
  frame's ``captured_at``, by minute of the run; dead letters by minute.

Goals (the exit status): memory flat, no service's RSS more than MEMORY_GROWTH_LIMIT above its first sample after
the warm-up; lag bounded, the highest lag in the last third of the soak no higher than in the middle third plus
LAG_SLACK_S seconds of frames. The broker is reported, not judged: the embedded Tansu keeps every record in memory
and never frees it (docs/broker.md), so its RSS grows with what was produced; a real Kafka keeps its log on disk.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POOL_FRAMES = 400  # the cameras' frames (10 cameras of 40), written once and read pass after pass
CAMERA_FPS = 10.0
# Longer than a frame interval at every camera rate used (5-10 fps), shorter than the two empty frames between tracks.
TRACK_MAX_AGE_S = 0.25
CALIBRATION_CAMERAS = 8  # 80 frames/s offered: more than the five services take on a small machine
MEMORY_GROWTH_LIMIT = 0.05
LAG_SLACK_S = 5.0
DRAIN_TIMEOUT_S = 180.0
STREAM_SERVICES = ("detection", "embedding", "matching", "decision")
RUN_PREFIX = "soak-run-"  # the soak's source ids (the calibration's: soak-cal-)


def register(kinds: Any) -> None:
    soak = kinds.add_parser(
        "soak", help="the pipeline at a steady share of its capacity for minutes: memory, lag, latency over time"
    )
    soak.add_argument("--minutes", type=float, default=30.0, help="how long to stream (default 30)")
    soak.add_argument("--fps", type=float, default=0.0, help="frames per second to stream (default: --load x capacity)")
    soak.add_argument("--load", type=float, default=0.8, help="share of the measured capacity to stream at (0.8)")
    soak.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory and lag samples (10)")
    soak.add_argument("--warm-up-s", type=float, default=0.0, help="samples ignored for memory (default: 20%% of run)")
    soak.add_argument("--seed", type=int, default=1, help="seed of the frames")
    soak.add_argument("--json", action="store_true", help="print one JSON object")
    soak.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    if args.minutes <= 0 or args.fps < 0 or not 0 < args.load <= 1 or args.sample_s <= 0 or args.warm_up_s < 0:
        print("error: --minutes and --sample-s must be positive, --fps not negative, --load in (0, 1]", file=sys.stderr)
        return 2
    warm_up_s = args.warm_up_s or args.minutes * 60 * 0.2
    if warm_up_s >= args.minutes * 60:
        print("error: --warm-up-s must be shorter than the soak", file=sys.stderr)
        return 2
    result = bench_soak(args.minutes, args.fps, args.load, args.sample_s, warm_up_s, args.seed)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


# --- what the topics say ---------------------------------------------------------------------------------------------


@dataclass
class Outcomes:
    """Terminal records of the run's frames as they arrive: which frames are done, latency and dead letters by
    minute. Keeps only ids and numbers."""

    started: float  # time.time() of the soak's start: minute 0 (of a frame's capture, of a dead letter's arrival)
    done: set[str] = field(default_factory=set)  # frame ids with a terminal record
    seen: set[str] = field(default_factory=set)  # decision ids (a replay is counted once)
    latency_ms: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, message: Any) -> None:
        from sightline.common.codec import seconds
        from sightline.v1 import events_pb2

        with self.lock:
            if isinstance(message, events_pb2.Decision) and message.decision_id not in self.seen:
                self.seen.add(message.decision_id)
                self.done.add(message.frame.frame_id)
                if message.frame.source_id.startswith(RUN_PREFIX):  # the calibration's are not the soak's
                    captured = seconds(message.frame.captured_at)
                    minute = int((captured - self.started) // 60)
                    self.latency_ms[minute].append((seconds(message.decided_at) - captured) * 1000.0)
            elif isinstance(message, events_pb2.DeadLetter):
                self.done.add(message.frame_id)
                if message.frame_id.startswith(RUN_PREFIX):
                    self.dead_letters[int((time.time() - self.started) // 60)] += 1

    def count_done(self, prefix: str) -> int:
        with self.lock:
            return sum(frame_id.startswith(prefix) for frame_id in self.done)


def _follow(kafka: Any, since_ms: int, outcomes: Outcomes, stop: threading.Event) -> None:
    from sightline.common import codec
    from sightline.common.bus import read_topics
    from sightline.common.topics import DEADLETTER, DECISIONS, by_name

    for record in read_topics(kafka, [DECISIONS.name, DEADLETTER.name], since_ms, stop=stop.is_set):
        try:
            outcomes.add(codec.parse(codec.event_class(by_name(record.topic)), record.value))
        except codec.MalformedEvent:
            continue


# --- samples ---------------------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


def _sample(stack: Any, kafka: Any, at_s: float) -> dict[str, Any]:
    from sightline.common.lag import LagError, service_lags

    rss = {name: rss_mb(pid) for name, pid in stack.pids.items()}  # the services' processes and the broker
    try:
        lag: dict[str, int | None] = {s: g.total for s, g in service_lags(kafka, STREAM_SERVICES, 10.0).items()}
    except LagError:
        lag = dict.fromkeys(STREAM_SERVICES)
    return {"at_s": round(at_s, 1), "rss_mb": {k: v and round(v, 1) for k, v in rss.items()}, "lag": lag}


def _sampler(stack: Any, kafka: Any, every_s: float, samples: list[dict[str, Any]], stop: threading.Event) -> None:
    started = time.monotonic()
    while True:
        samples.append(_sample(stack, kafka, time.monotonic() - started))
        if stop.wait(every_s):
            return


# --- the run -------------------------------------------------------------------------------------------------------


def _write_cameras(folder: Path, plan: list[Any]) -> list[Path]:
    folders = []
    for camera in plan:
        path = folder / camera.source_id
        path.mkdir(parents=True)
        for sequence, image in enumerate(camera.frames, 1):
            (path / f"{sequence:05d}.jpg").write_bytes(image)
        folders.append(path)
    return folders


def _ingest(stack: Any, folder: Path, source_id: str, fps: float) -> int:
    from sightline.cli.run import ingest

    reply = ingest(str(folder), source_id=source_id, fps=fps, address=stack.addresses["capture"], progress=False)
    return int(reply.frames_published)


def _wait_done(outcomes: Outcomes, prefix: str, frames: int, timeout_s: float) -> float:
    started = time.monotonic()
    while outcomes.count_done(prefix) < frames and time.monotonic() - started < timeout_s:
        time.sleep(0.2)
    return time.monotonic() - started


class Cameras:
    """``streams`` cameras read at once, each at ``fps``: every stream takes the next folder of the pool (cycling,
    each pass under new source ids) until the deadline or the folder budget is spent."""

    def __init__(self, stack: Any, folders: list[Path], prefix: str) -> None:
        self.stack, self.folders, self.prefix = stack, folders, prefix
        self.sent = 0
        self._next = 0
        self._lock = threading.Lock()

    def run(self, streams: int, fps: float, deadline: float, max_folders: int = 0) -> int:
        threads = [threading.Thread(target=self._stream, args=(fps, deadline, max_folders)) for _ in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self.sent

    def _take(self, max_folders: int) -> tuple[Path, str] | None:
        with self._lock:
            if max_folders and self._next >= max_folders:
                return None
            n, self._next = self._next, self._next + 1
        folder = self.folders[n % len(self.folders)]
        return folder, f"{self.prefix}{n // len(self.folders):04d}-{n % len(self.folders):03d}"

    def _stream(self, fps: float, deadline: float, max_folders: int) -> None:
        while time.monotonic() < deadline and (taken := self._take(max_folders)) is not None:
            published = _ingest(self.stack, taken[0], taken[1], fps)
            with self._lock:
                self.sent += published


def calibrate(stack: Any, folders: list[Path], outcomes: Outcomes) -> float:
    """Frames per second the pipeline finishes while CALIBRATION_CAMERAS cameras offer more than it can take."""
    started = time.monotonic()
    sent = Cameras(stack, folders, "soak-cal-").run(
        CALIBRATION_CAMERAS, CAMERA_FPS, started + DRAIN_TIMEOUT_S, CALIBRATION_CAMERAS
    )
    _wait_done(outcomes, "soak-cal-", sent, DRAIN_TIMEOUT_S)
    return outcomes.count_done("soak-cal-") / (time.monotonic() - started)


def _stream(stack: Any, folders: list[Path], rate: float, seconds: float) -> int:
    """Cameras at ``rate`` frames per second in all (each at CAMERA_FPS or less) for ``seconds``; the frames
    capture published."""
    from tqdm import tqdm

    streams = max(1, math.ceil(rate / CAMERA_FPS))
    cameras, deadline = Cameras(stack, folders, RUN_PREFIX), time.monotonic() + seconds
    worker = threading.Thread(target=cameras.run, args=(streams, rate / streams, deadline))
    worker.start()
    with tqdm(total=round(seconds), unit="s", desc="soak", file=sys.stderr, leave=False, disable=None) as bar:
        while worker.is_alive():
            worker.join(1.0)
            bar.n = min(round(seconds), round(seconds - max(0.0, deadline - time.monotonic())))
            bar.refresh()
    return cameras.sent


def bench_soak(minutes: float, fps: float, load: float, sample_s: float, warm_up_s: float, seed: int) -> dict[str, Any]:
    from sightline.cli.bench_chaos import cameras, enrol, people
    from sightline.common.config import KafkaSettings
    from sightline.tooling.localstack import LocalStack

    cast = people(seed)
    work = Path(tempfile.mkdtemp(prefix="sightline-bench-soak-"))
    # No frame dropped for lag: a soak must see the lag grow if the pipeline cannot keep up, not frames vanish.
    env = {
        "SIGHTLINE_CAPTURE_BACKPRESSURE_MAX_LAG_FRAMES": "0",
        "SIGHTLINE_DETECTION_TRACK_MAX_AGE_S": str(TRACK_MAX_AGE_S),
    }
    try:
        folders = _write_cameras(work / "frames", cameras(cast, POOL_FRAMES, seed))
        with LocalStack(work / "run", ports="auto", env=env, capture_roots=[work / "frames"]) as stack:
            print("starting a private local stack...", file=sys.stderr)
            stack.start(timeout=180)
            enrol(stack.addresses["matching"], cast)
            kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers, fetch_max_wait_ms=25)
            outcomes, stop = Outcomes(time.time()), threading.Event()
            follower = threading.Thread(
                target=_follow, args=(kafka, int(time.time() * 1000) - 1000, outcomes, stop), daemon=True
            )
            follower.start()
            capacity = calibrate(stack, folders, outcomes) if not fps else 0.0
            rate = fps or load * capacity
            print(f"capacity {capacity:.1f} frames/s; streaming at {rate:.1f} for {minutes:g} min", file=sys.stderr)
            samples: list[dict[str, Any]] = []
            sampler = threading.Thread(target=_sampler, args=(stack, kafka, sample_s, samples, stop), daemon=True)
            soak_started = time.time()
            outcomes.started = soak_started
            sampler.start()
            sent = _stream(stack, folders, rate, minutes * 60)
            streamed_s = time.time() - soak_started
            drained_s = _wait_done(outcomes, RUN_PREFIX, sent, DRAIN_TIMEOUT_S)
            stop.set()
            sampler.join()
            crashed = stack.poll_crashed()
        return report(capacity, rate, load, minutes, warm_up_s, sent, outcomes, samples, streamed_s, drained_s, crashed)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the report ------------------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def memory_report(samples: list[dict[str, Any]], warm_up_s: float) -> dict[str, dict[str, Any]]:
    """Per process: RSS at start, after warm-up, at the end and its peak (MiB), growth after warm-up."""
    after = [s for s in samples if s["at_s"] >= warm_up_s] or samples[-1:]
    memory = {}
    for name in samples[0]["rss_mb"]:
        series = [s["rss_mb"][name] for s in samples if s["rss_mb"].get(name)]
        settled = [s["rss_mb"][name] for s in after if s["rss_mb"].get(name)]
        if not series or not settled:
            continue
        growth = (settled[-1] - settled[0]) / settled[0]
        memory[name] = {
            "start_mb": series[0],
            "after_warm_up_mb": settled[0],
            "end_mb": series[-1],
            "peak_mb": max(series),
            "growth_after_warm_up_pct": round(growth * 100, 1),
        }
    return memory


def lag_report(samples: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    """Highest lag per service in each third of the soak, and whether the last third stayed within the middle's."""
    thirds = [samples[i * len(samples) // 3 : (i + 1) * len(samples) // 3] for i in range(3)]
    slack = LAG_SLACK_S * rate
    per_service, bounded = {}, True
    for service in STREAM_SERVICES:
        peaks = [max((s["lag"][service] or 0 for s in part), default=0) for part in thirds]
        per_service[service] = {"max_lag_by_third": peaks}
        bounded = bounded and peaks[2] <= peaks[1] + slack
    return {"services": per_service, "slack_frames": round(slack), "bounded": bounded}


def report(
    capacity: float,
    rate: float,
    load: float,
    minutes: float,
    warm_up_s: float,
    sent: int,
    outcomes: Outcomes,
    samples: list[dict[str, Any]],
    streamed_s: float,
    drained_s: float,
    crashed: list[str],
) -> dict[str, Any]:
    memory = memory_report(samples, warm_up_s)
    lag = lag_report(samples, rate)
    services = {k: v for k, v in memory.items() if k != "broker"}
    flat = all(v["growth_after_warm_up_pct"] <= MEMORY_GROWTH_LIMIT * 100 for v in services.values())
    done = outcomes.count_done(RUN_PREFIX)
    latency = {
        str(minute): {
            "decisions": len(values),
            "p50_ms": round(_percentile(values, 0.5)),
            "p99_ms": round(_percentile(values, 0.99)),
        }
        for minute, values in sorted(outcomes.latency_ms.items())
    }
    return {
        "capacity_fps": round(capacity, 2) if capacity else None,
        "load": load if capacity else None,
        "rate_fps": round(rate, 2),
        "minutes": minutes,
        "warm_up_s": warm_up_s,
        "frames": sent,
        "frames_with_terminal_record": done,
        "lost": sent - done,
        "dead_letters": sum(outcomes.dead_letters.values()),
        "dead_letters_by_minute": {str(m): n for m, n in sorted(outcomes.dead_letters.items())},
        "streamed_s": round(streamed_s, 1),
        "drained_s": round(drained_s, 1),
        "memory_mb": memory,
        "memory_flat": flat,
        "lag": lag,
        "latency_by_minute": latency,
        "samples": samples,
        "crashed": crashed,
        "passed": flat and lag["bounded"] and sent == done and not crashed,
    }
