"""``sightline bench gates``: N e-channel gates at once, each running back-to-back sessions of enrolled travellers.

Every simulated gate is a kiosk client of capture's KioskService (the real request path): it opens a session with a
subject claim and streams frames of the claimed traveller at the camera's rate until the outcome arrives (at most
``--frames``, then it closes the session), then starts the next session at once. The frames are real photos: dlib's
"johns", 11 different photos of each of 5 people, one enrolled, the others composed into 480x400 camera frames
with the face drifting a little. Meanwhile the match results and session events are read from the topics, and the
stream services' Prometheus metrics are read before and after, to split the time into its parts.

Figures, per number of gates:

- ``first_frame_to_decision_ms``: from sending the session's first frame to the outcome reaching the kiosk. Liveness
  needs 10 frames, so at 10 fps this cannot be under ~900 ms: it is mostly the camera's time.
- ``last_needed_frame_to_decision_ms``: from sending the frame that completed the evidence (the outcome's
  ``frames_seen``-th frame) to the outcome reaching the kiosk: the system's own latency. Only sessions decided by a
  frame's result count (``decided_by_the_clock`` are the others).
- ``frame_result_ms``: capture to match result, every frame.
- ``breakdown_ms_p50``: for the deciding frame, capture to match result, match result to decision's DECIDED event,
  and DECIDED to the kiosk (capture's relay and the gRPC stream).
- ``stages``: per stream service, mean processing time per event, mean time from capture to the end of that stage,
  and the share of the run it was busy (1.0: saturated).
- ``referral_reasons``: the first reason of each outcome other than ACCEPT, without its figures.

``gates_kept_up`` is the largest number of gates tried where every session was decided by a frame's result (none by
the clock for want of results: a close's grace or a time-out) and every frame's result came in; ``sustained_gates``
also needs the p99 of ``last_needed_frame_to_decision_ms`` within the target.
"""

from __future__ import annotations

import io
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TRAVELLER_PREFIX = "bench-traveller-"
FRAME_SIZE = (480, 400)
FACE_SIDE = 240


@dataclass(frozen=True)
class Traveller:
    subject_id: str
    enrolment: bytes  # one photo, composed into a frame
    frames: list[bytes]  # the others, composed into a stream of camera frames (made once: the CPU is the stack's)


@dataclass
class Endpoints:
    capture: str
    matching: str
    bootstrap_servers: str
    metrics_ports: dict[str, int] = field(default_factory=dict)  # service -> Prometheus port, for the stage times


@dataclass
class TopicTimes:
    """What the topics say about the bench's frames and sessions (epoch seconds)."""

    captured: dict[str, float] = field(default_factory=dict)  # frame id -> capture time
    matched: dict[str, float] = field(default_factory=dict)  # frame id -> match result time
    decided: dict[str, float] = field(default_factory=dict)  # session id -> DECIDED event time (record timestamp)


def compose(photo: Path, dx: int, dy: int) -> bytes:
    """A camera frame: the (tight, 150 px) face photo enlarged and placed near the middle of a grey frame."""
    from PIL import Image

    canvas = Image.new("RGB", FRAME_SIZE, (96, 100, 104))
    face = Image.open(photo).convert("RGB").resize((FACE_SIDE, FACE_SIDE))
    canvas.paste(face, ((FRAME_SIZE[0] - FACE_SIDE) // 2 + dx, (FRAME_SIZE[1] - FACE_SIDE) // 2 + dy))
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=90)
    return out.getvalue()


def travellers(stream_length: int = 60, seed: int = 7) -> list[Traveller]:
    from sightline.common.paths import samples_dir

    root = samples_dir() / "dlib" / "johns"
    people = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not people:
        raise SystemExit(f"error: no dlib 'johns' photos in {root}: run `make setup`")
    rng = random.Random(seed)
    found = []
    for person in people:
        photos = sorted(person.glob("*.jpg"))
        found.append(
            Traveller(
                f"{TRAVELLER_PREFIX}{person.name.lower()}",
                compose(photos[-1], 0, 0),
                camera_stream(photos[:-1], stream_length, rng),
            )
        )
    return found


def camera_stream(photos: list[Path], count: int, rng: random.Random) -> list[bytes]:
    """``count`` frames of one person: different photos in random order, the face drifting a little frame to frame."""
    picks = [photo for _ in range(count // len(photos) + 1) for photo in rng.sample(photos, len(photos))][:count]
    dx, dy, frames = 0.0, 0.0, []
    for photo in picks:
        dx, dy = max(-30.0, min(30.0, dx + rng.uniform(-6, 6))), max(-20.0, min(20.0, dy + rng.uniform(-4, 4)))
        frames.append(compose(photo, int(dx), int(dy)))
    return frames


def session_frames(traveller: Traveller, count: int, rng: random.Random) -> list[bytes]:
    """``count`` frames of the traveller's stream, from a random point (the camera runs until the outcome)."""
    start = rng.randrange(len(traveller.frames))
    return [traveller.frames[(start + i) % len(traveller.frames)] for i in range(count)]


def enrol(endpoints: Endpoints, people: list[Traveller]) -> None:
    from sightline.cli.endpoints import connect
    from sightline.v1 import gallery_pb2, gallery_pb2_grpc

    gallery = gallery_pb2_grpc.GalleryServiceStub(connect("matching", endpoints.matching))
    for person in people:
        gallery.DeleteSubject(gallery_pb2.DeleteSubjectRequest(subject_id=person.subject_id), timeout=30)
        reply = gallery.Enroll(
            gallery_pb2.EnrollRequest(
                subject_id=person.subject_id, images=[person.enrolment], purpose="sightline bench gates"
            ),
            timeout=120,
        )
        if not reply.templates_added:
            raise SystemExit(f"error: could not enrol {person.subject_id}: {reply.results[0].reason}")


def remove(endpoints: Endpoints, people: list[Traveller]) -> None:
    from sightline.cli.endpoints import connect
    from sightline.v1 import gallery_pb2, gallery_pb2_grpc

    gallery = gallery_pb2_grpc.GalleryServiceStub(connect("matching", endpoints.matching))
    for person in people:
        gallery.DeleteSubject(gallery_pb2.DeleteSubjectRequest(subject_id=person.subject_id), timeout=30)


# --- running gates ---------------------------------------------------------------------------------------------------


def run_gates(
    endpoints: Endpoints,
    people: list[Traveller],
    gates: int,
    fps: float,
    seconds: float,
    frames_per_session: int,
    timeout: float,
    seed: int = 0,
) -> list[Any]:
    """Run ``gates`` gates for ``seconds`` (at least one session each; sessions under way at the end are finished)."""
    from sightline.cli.endpoints import connect
    from sightline.cli.gate import run_session
    from sightline.v1 import session_pb2, session_pb2_grpc

    until = time.time() + seconds
    runs: list[Any] = []
    lock = threading.Lock()

    def gate(number: int) -> None:
        stub = session_pb2_grpc.KioskServiceStub(connect("capture", endpoints.capture))
        rng = random.Random(seed * 1000 + number)
        session = 0
        while session == 0 or time.time() < until:  # at least one session each
            person = people[(number + session) % len(people)]
            frames = session_frames(person, frames_per_session, rng)
            request = session_pb2.OpenSessionRequest(gate_id=f"bench-gate-{number}", subject_id=person.subject_id)
            run = run_session(stub, request, frames, fps, timeout)
            with lock:
                runs.append(run)
            session += 1

    threads = [threading.Thread(target=gate, args=(n,), name=f"bench-gate-{n}") for n in range(1, gates + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs


def read_topic_times(endpoints: Endpoints, since_ms: int, stop: threading.Event, into: TopicTimes) -> None:
    from sightline.common import codec
    from sightline.common.bus import read_topics
    from sightline.common.config import KafkaSettings
    from sightline.common.topics import MATCHES, SESSIONS
    from sightline.v1 import events_pb2, session_pb2

    kafka = KafkaSettings(bootstrap_servers=endpoints.bootstrap_servers, fetch_max_wait_ms=25)
    for record in read_topics(kafka, [MATCHES.name, SESSIONS.name], since_ms, stop=stop.is_set):
        if record.topic == MATCHES.name:
            result = codec.parse(events_pb2.MatchResult, record.value)
            if result.frame.source_id.startswith("bench-gate-"):
                into.captured[result.frame.frame_id] = codec.seconds(result.frame.captured_at)
                into.matched[result.frame.frame_id] = codec.seconds(result.matched_at)
        else:
            event = codec.parse(session_pb2.SessionEvent, record.value)
            if event.kind == session_pb2.SessionEvent.KIND_DECIDED and event.gate_id.startswith("bench-gate-"):
                into.decided[event.session_id] = record.timestamp / 1000


def stage_totals(endpoints: Endpoints) -> dict[str, tuple[float, float, float, float]]:
    """Per service: (processing seconds, events, capture-to-stage seconds, events) so far, from its metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    totals = {}
    for service, port in endpoints.metrics_ports.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            continue
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(("sightline_stage_latency_seconds_", "sightline_capture_to_stage_seconds_")):
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
        totals[service] = (
            values.get("sightline_stage_latency_seconds_sum", 0.0),
            values.get("sightline_stage_latency_seconds_count", 0.0),
            values.get("sightline_capture_to_stage_seconds_sum", 0.0),
            values.get("sightline_capture_to_stage_seconds_count", 0.0),
        )
    return totals


def stage_means(before: dict[str, tuple[float, ...]], after: dict[str, tuple[float, ...]]) -> dict[str, Any]:
    """Mean processing time per event and mean capture-to-stage time of each stream service over the run, ms."""
    means: dict[str, Any] = {}
    for service, (busy, events, since_capture, counted) in after.items():
        b = before.get(service, (0.0, 0.0, 0.0, 0.0))
        if events - b[1] > 0:
            means[service] = {
                "processing_ms": round(1000 * (busy - b[0]) / (events - b[1]), 1),
                "capture_to_here_ms": round(1000 * (since_capture - b[2]) / max(counted - b[3], 1), 1),
                "busy_share": None,  # filled in by the caller, who knows the run's length
                "events": int(events - b[1]),
                "_busy_s": busy - b[0],
            }
    return means


# --- figures ----------------------------------------------------------------------------------------------------------


def _reason_kind(reason: str) -> str:
    """A referral reason without its figures ("liveness failed: texture_non_planarity 0.0012 < ..." -> "liveness
    failed"), so that reasons can be counted."""
    return reason.split(":", 1)[0].split(" (", 1)[0]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    array = np.array(values)
    return {
        "p50": round(float(np.percentile(array, 50)), 1),
        "p95": round(float(np.percentile(array, 95)), 1),
        "p99": round(float(np.percentile(array, 99)), 1),
        "n": len(values),
    }


def median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 1) if values else None


def figures(runs: list[Any], times: TopicTimes, gates: int, fps: float, seconds: float) -> dict[str, Any]:
    from sightline.common.codec import outcome_name
    from sightline.v1 import session_pb2

    decided = [r for r in runs if r.outcome is not None and r.sent_at]
    by_frame = [r for r in decided if not by_the_clock(r.outcome)]
    first, last, to_match, to_decided, to_kiosk = [], [], [], [], []
    for run in decided:
        first.append(run.elapsed_ms)
    for run in by_frame:
        needed = min(max(run.outcome.frames_seen, 1), run.frames_sent)  # the frame whose result decided
        last.append((run.decided_at - run.sent_at[needed - 1]) * 1000)
        frame_id = run.frame_ids[needed - 1]
        if frame_id in times.matched and run.session_id in times.decided:
            matched, published = times.matched[frame_id], times.decided[run.session_id]
            to_match.append((matched - times.captured[frame_id]) * 1000)
            to_decided.append((published - matched) * 1000)
            to_kiosk.append((run.decided_at - published) * 1000)
    referred = Counter(
        _reason_kind(reason)
        for r in decided
        if r.outcome.outcome != session_pb2.SESSION_OUTCOME_ACCEPT
        for reason in r.outcome.reasons[:1]
    )
    per_frame = [(times.matched[f] - times.captured[f]) * 1000 for f in times.matched]
    frames_sent = sum(r.frames_sent for r in runs)
    span = max((r.decided_at for r in decided), default=0.0) - min((r.sent_at[0] for r in decided), default=0.0)
    return {
        "gates": gates,
        "fps_per_gate": fps,
        "seconds": seconds,
        "sessions": len(runs),
        "sessions_decided": len(decided),
        "decided_by_the_clock": len(decided) - len(by_frame),
        "outcomes": dict(Counter(outcome_name(r.outcome.outcome) for r in decided)),
        "referral_reasons": dict(referred),
        "first_frame_to_decision_ms": percentiles(first),
        "last_needed_frame_to_decision_ms": percentiles(last),
        "frame_result_ms": percentiles(per_frame),
        "breakdown_ms_p50": {
            "deciding_frame_capture_to_match": median(to_match),
            "match_to_decided_event": median(to_decided),
            "decided_event_to_kiosk": median(to_kiosk),
        },
        "frames_sent": frames_sent,
        "frames_matched": len(times.matched),
        "sent_fps": round(frames_sent / span, 1) if span > 0 else None,
        "result_fps": round(len(times.matched) / span, 1) if span > 0 else None,
    }


# Outcomes reached by a timer rather than by a frame's result: after a close (its grace spent waiting for results),
# a time-out, or capture giving up on decision. They have no deciding frame (decision's reasons,
# decision/echannel/engine.py).
_CLOCK_REASONS = ("session closed", "time-out", "the decision did not arrive in time")


def by_the_clock(outcome: Any) -> bool:
    return bool(outcome.reasons) and outcome.reasons[0].startswith(_CLOCK_REASONS)


def kept_up(result: dict[str, Any]) -> bool:
    """Every session decided by a frame's result (none by the clock for want of results), every frame's result in."""
    return (
        result["sessions_decided"] == result["sessions"]
        and result["decided_by_the_clock"] == 0
        and result["frames_matched"] >= result["frames_sent"]
    )


def sustained(result: dict[str, Any], target_ms: float) -> bool:
    """Kept up, and the p99 of the system's own latency (last needed frame to decision) within the target."""
    p99 = result["last_needed_frame_to_decision_ms"]["p99"]
    return kept_up(result) and p99 is not None and p99 <= target_ms


def measure(
    endpoints: Endpoints, gate_counts: list[int], fps: float, seconds: float, frames_per_session: int, target_ms: float
) -> dict[str, Any]:
    people = travellers()
    timeout = 60.0 + frames_per_session / fps
    enrol(endpoints, people)
    try:
        print(f"warm-up: one session on each of {max(gate_counts)} gates...", file=sys.stderr)
        run_gates(endpoints, people, max(gate_counts), fps, 0.0, frames_per_session, timeout, seed=99)
        results = []
        for gates in gate_counts:
            print(f"{gates} gate(s) at {fps:g} fps for {seconds:g} s...", file=sys.stderr)
            results.append(_measure_once(endpoints, people, gates, fps, seconds, frames_per_session, timeout))
    finally:
        remove(endpoints, people)
    return {
        "runs": results,
        "target_ms": target_ms,
        "gates_kept_up": max((r["gates"] for r in results if kept_up(r)), default=0),
        "sustained_gates": max((r["gates"] for r in results if sustained(r, target_ms)), default=0),
        "sustained_means": f"kept up (every session decided by a frame's result, every frame's result in) and p99 "
        f"last_needed_frame_to_decision_ms <= {target_ms:g}",
        "cores": __import__("os").cpu_count(),
    }


def _measure_once(
    endpoints: Endpoints,
    people: list[Traveller],
    gates: int,
    fps: float,
    seconds: float,
    frames_per_session: int,
    timeout: float,
) -> dict[str, Any]:
    times, stop = TopicTimes(), threading.Event()
    reader = threading.Thread(
        target=read_topic_times,
        args=(endpoints, int(time.time() * 1000) - 1000, stop, times),
        daemon=True,
        name="bench-topics",
    )
    reader.start()
    before, started = stage_totals(endpoints), time.monotonic()
    runs = run_gates(endpoints, people, gates, fps, seconds, frames_per_session, timeout)
    sent = {frame_id for run in runs for frame_id in run.frame_ids}
    deadline = time.monotonic() + 10
    while not sent <= times.matched.keys() and time.monotonic() < deadline:
        time.sleep(0.2)  # the results of the frames sent just before the last outcomes
    stages = stage_means(before, stage_totals(endpoints))
    for figures_of in stages.values():
        figures_of["busy_share"] = round(figures_of.pop("_busy_s") / (time.monotonic() - started), 2)
    stop.set()
    reader.join(10)
    return {**figures(runs, times, gates, fps, seconds), "stages": stages}


def bench_gates(
    gate_counts: list[int],
    fps: float,
    seconds: float,
    frames_per_session: int,
    target_ms: float,
    running: bool,
    start_timeout: float,
) -> dict[str, Any]:
    """Against the running local stack, or a private one started (and stopped) here."""
    if running:
        from sightline.cli.endpoints import grpc_address, kafka_settings

        endpoints = Endpoints(
            grpc_address("capture"),
            grpc_address("matching"),
            kafka_settings().bootstrap_servers,
            running_metrics_ports(),
        )
        return measure(endpoints, gate_counts, fps, seconds, frames_per_session, target_ms)
    from sightline.tooling.localstack import LocalStack

    run_dir = Path(tempfile.mkdtemp(prefix="sightline-bench-gates-"))
    try:
        print("starting a private local stack...", file=sys.stderr)
        with LocalStack(run_dir, ports="auto") as stack:
            stack.start(timeout=start_timeout)
            endpoints = Endpoints(
                stack.addresses["capture"], stack.addresses["matching"], stack.bootstrap_servers, stack.metrics_ports
            )
            return measure(endpoints, gate_counts, fps, seconds, frames_per_session, target_ms)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def running_metrics_ports() -> dict[str, int]:
    """The metrics ports of the running local stack's services (none known: no stage times)."""
    from sightline.common import paths
    from sightline.tooling.localstack import load_state

    state = load_state(paths.run_dir())
    return {name: r.metrics_port for name, r in state.services.items() if r.metrics_port} if state else {}
