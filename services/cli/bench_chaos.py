"""``sightline bench chaos``: stream frames of known faces while the services are SIGKILLed, then account for every one.

A private local stack runs with its supervisor (supervisor.py), which restarts each killed service with its backoff.
Meanwhile:

- **Cameras**: ``--frames`` frames (default 2,000) of dlib's "johns" (the photos ``bench gates`` uses), 640x480
  JPEGs split into cameras of 40 frames; each camera shows tracks of 6-10 frames of one person (a 120 px face,
  drifting a little, in one quarter of the picture), two empty frames between tracks. Two of the five people are on
  a watchlist, two are enrolled on no list, one is a stranger. Capture reads each camera as a folder, paced at
  ``--fps``, with no frame dropped for lag. When an Ingest call breaks (capture killed), the frames of that camera
  missing from the frames topic are sent again, as a camera of their own (``<camera>-r1``...), once capture is
  back: every frame reaches the frames topic once. Detection's track_max_age_s is set below the gap between tracks
  (``track_max_age``), so that each track is one person.
- **A gate**: back-to-back e-channel sessions of the two travellers enrolled on no list (claims of their own), at
  10 fps, through capture's KioskService. A session whose capture is killed is left to decision's deadline.
- **Chaos**: each of capture, detection, embedding, matching and decision is SIGKILLed ``--kills`` times, at random
  moments over the streaming time, each time once it is SERVING again.

Then it waits for every frame on the frames topic (cameras and gate) to reach its terminal outcome and accounts for
each (sightline.tooling.ledger): decided (a decision per searched face), no face or none searched (a match result
without faces), or a dead letter; lost (none) and duplicated (more than one, after deduplication by id); records
that came more than once before deduplication; alerts missing or doubled; gate sessions undecided or decided twice.
Exit 0 only when nothing is lost, duplicated after deduplication, missing or doubled.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

CAMERA_FRAMES = 40
CHAOS_SERVICES = ("capture", "detection", "embedding", "matching", "decision")
WATCHLIST = "chaos-watchlist"
GATE_ID = "chaos-gate-1"
GATE_FPS = 10.0
GATE_FRAMES = 30
WARM_UP_S = 3.0  # no kill before the stream has started flowing
TRACK_GAP_FRAMES = 2  # empty frames between two tracks of a camera


def track_max_age(fps: float) -> float:
    """Detection's track_max_age_s for the bench's cameras: longer than a frame interval, shorter than the gap
    between two tracks. The default (2 s) would let the next person, a few frames later, continue the track of the
    one before (a face of about its size within walking reach): one track of several people, as no camera sees."""
    return (TRACK_GAP_FRAMES + 0.5) / fps


def register(kinds: Any) -> None:
    chaos = kinds.add_parser(
        "chaos", help="frames of known faces while every service is SIGKILLed and restarted; account for every frame"
    )
    chaos.add_argument("--frames", type=int, default=2000, help="camera frames to stream (default 2000)")
    chaos.add_argument("--kills", type=int, default=3, help="SIGKILLs of each of the five services (default 3)")
    chaos.add_argument("--fps", type=float, default=15.0, help="rate capture reads the cameras at (default 15)")
    chaos.add_argument("--no-gate", action="store_true", help="no e-channel gate sessions beside the cameras")
    chaos.add_argument("--seed", type=int, default=1, help="seed of the frames and of the kill times")
    chaos.add_argument("--timeout", type=float, default=900.0, help="longest wait for the outcomes after streaming")
    chaos.add_argument("--json", action="store_true", help="print one JSON object")
    chaos.set_defaults(func=cmd_chaos)


def cmd_chaos(args: argparse.Namespace) -> int:
    if args.frames < 1 or args.kills < 0 or args.fps <= 0:
        print("error: --frames must be positive, --kills zero or more, --fps positive", file=sys.stderr)
        return 2
    result = bench_chaos(args.frames, args.kills, args.fps, args.seed, not args.no_gate, args.timeout)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


# --- the frames ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    subject_id: str
    watchlists: tuple[str, ...]
    enrolled: bool
    enrolment: bytes  # a frame of one photo, the others are the camera's
    photos: list[Path]
    gate_frames: list[bytes]  # close-ups at a gate's camera, as `bench gates` makes them


@dataclass(frozen=True)
class Camera:
    source_id: str
    frames: list[bytes]
    people: list[str]  # per frame: the subject shown, "" for an empty frame


def people(seed: int) -> list[Person]:
    """The five "johns": two on the watchlist, two enrolled on no list (the gate's travellers), one stranger."""
    from sightline.cli.bench_gates import camera_stream, compose
    from sightline.common.paths import samples_dir

    root = samples_dir() / "dlib" / "johns"
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(folders) < 5:
        raise SystemExit(f"error: no dlib 'johns' photos in {root}: run `make setup`")
    roles = [((WATCHLIST,), True), ((WATCHLIST,), True), ((), True), ((), True), ((), False)]
    rng = random.Random(seed)
    cast = []
    for folder, (lists, enrolled) in zip(folders, roles, strict=False):
        photos = sorted(folder.glob("*.jpg"))
        cast.append(
            Person(
                f"chaos-{folder.name.lower()}",
                lists,
                enrolled,
                compose(photos[-1], 0, 0),
                photos[:-1],
                camera_stream(photos[:-1], GATE_FRAMES, rng),
            )
        )
    return cast


class SceneMaker:
    """CCTV-like frames: a face of FACE_SIDE px in one quarter of a 640x480 frame, drifting a little."""

    SIZE = (640, 480)
    FACE_SIDE = 120
    CELLS = [(110, 120), (110, 360), (530, 120), (530, 360)]  # face centres: left column, then right

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self._faces: dict[Path, Any] = {}

    def frame(self, photo: Path | None, centre: tuple[int, int]) -> bytes:
        from PIL import Image

        canvas = Image.new("RGB", self.SIZE, (96, 100, 104))
        if photo is not None:
            if photo not in self._faces:
                self._faces[photo] = Image.open(photo).convert("RGB").resize((self.FACE_SIDE, self.FACE_SIDE))
            half = self.FACE_SIDE // 2
            canvas.paste(self._faces[photo], (centre[0] - half, centre[1] - half))
        out = io.BytesIO()
        canvas.save(out, "JPEG", quality=90)
        return out.getvalue()

    def track(self, person: Person, length: int, cell: int) -> list[bytes]:
        """``length`` frames of one person in one cell: their photos in turn, the face drifting up to 20 px."""
        x, y = self.CELLS[cell]
        dx = dy = 0
        start = self.rng.randrange(len(person.photos))
        frames = []
        for i in range(length):
            dx = max(-20, min(20, dx + self.rng.randint(-4, 4)))
            dy = max(-20, min(20, dy + self.rng.randint(-4, 4)))
            frames.append(self.frame(person.photos[(start + i) % len(person.photos)], (x + dx, y + dy)))
        return frames


def cameras(cast: list[Person], frames: int, seed: int) -> list[Camera]:
    """``frames`` frames in cameras of CAMERA_FRAMES: tracks of one person (6-10 frames), two empty frames between
    them, each track in the other half of the picture than the one before. (With the stack's track_max_age_s set
    below the gap, ``track_max_age``, each is a track of its own.)"""
    maker = SceneMaker(seed)
    shown: list[str] = []
    images: list[bytes] = []
    cell = 0
    while len(images) < frames:
        person = maker.rng.choice(cast)
        cell = (2 if cell < 2 else 0) + maker.rng.randrange(2)  # the other column, either row
        length = maker.rng.randint(6, 10)
        images += maker.track(person, length, cell)
        shown += [person.subject_id] * length
        images += [maker.frame(None, (0, 0))] * TRACK_GAP_FRAMES
        shown += [""] * TRACK_GAP_FRAMES
    images, shown = images[:frames], shown[:frames]
    return [
        Camera(f"chaos-cam-{n:03d}", images[i : i + CAMERA_FRAMES], shown[i : i + CAMERA_FRAMES])
        for n, i in enumerate(range(0, frames, CAMERA_FRAMES))
    ]


# --- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the threads of one run share and report."""

    stack: Any
    folder: Path
    ledger: Any
    streaming: threading.Event = field(default_factory=threading.Event)  # set when the cameras are done
    sources: dict[str, str] = field(default_factory=dict)  # ingested source id -> its camera
    shown: dict[tuple[str, int], str] = field(default_factory=dict)  # (source id, sequence) -> subject shown
    frames_sent: int = 0
    cameras_s: float = 0.0  # how long the cameras took to send every frame
    resent: int = 0
    interrupted_ingests: int = 0
    gate_sessions: int = 0
    gate_sessions_broken: int = 0
    gate_errors: Counter[str] = field(default_factory=Counter)  # why sessions broke, at the kiosk
    kills: list[dict[str, Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # the supervisor's messages, kept out of the output


def bench_chaos(frames: int, kills: int, fps: float, seed: int, gate: bool, timeout: float) -> dict[str, Any]:
    from sightline.common.config import KafkaSettings
    from sightline.tooling.ledger import Ledger
    from sightline.tooling.localstack import LocalStack
    from sightline.tooling.supervisor import RestartSettings, Supervisor

    started = time.monotonic()
    cast = people(seed)
    plan = cameras(cast, frames, seed)
    work = Path(tempfile.mkdtemp(prefix="sightline-bench-chaos-"))
    # No CCTV frame dropped for lag: every frame the cameras send must be accounted for, none skipped by design.
    env = {
        "SIGHTLINE_CAPTURE_BACKPRESSURE_MAX_LAG_FRAMES": "0",
        "SIGHTLINE_DETECTION_TRACK_MAX_AGE_S": f"{track_max_age(fps):.3f}",
    }
    try:
        with LocalStack(work / "run", ports="auto", env=env, capture_roots=[work / "frames"]) as stack:
            print("starting a private local stack...", file=sys.stderr)
            stack.start(timeout=180)
            enrol(stack.addresses["matching"], cast)
            since = int(time.time() * 1000) - 1000
            # Tansu holds each fetch for the whole wait: a short one keeps the ledger close behind the topics.
            kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers, fetch_max_wait_ms=25)
            ledger = Ledger(kafka, since).start()
            run = Run(stack, work / "frames", ledger)
            Supervisor(stack, RestartSettings(), notify=run.notices.append).start()
            stream_started = time.monotonic()
            threads = [
                threading.Thread(target=_cameras, args=(run, plan, fps), name="chaos-cameras"),
                threading.Thread(
                    target=_chaos, args=(run, kills, frames / fps, random.Random(seed)), name="chaos-kills"
                ),
            ]
            if gate:
                travellers = [p for p in cast if p.enrolled and not p.watchlists]
                threads.append(threading.Thread(target=_gate, args=(run, travellers, seed), name="chaos-gate"))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            streamed = time.monotonic() - stream_started
            print(f"streamed in {streamed:.0f} s; waiting for every outcome...", file=sys.stderr)
            _wait_all_serving(stack, 300)
            drained = _drain(run, timeout)
            stored = stored_alerts(stack.addresses["decision"])
            restarts = {name: stack.record(name).restarts for name in stack.processes}
            ledger.stop()
        return report(run, cast, restarts, stored, streamed, drained, time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def enrol(matching: str, cast: list[Person]) -> None:
    from sightline.cli.endpoints import connect
    from sightline.cli.watchlists import watchlist_stub
    from sightline.v1 import gallery_pb2, gallery_pb2_grpc

    watchlist = gallery_pb2.Watchlist(name=WATCHLIST, purpose="sightline bench chaos", owner="sightline bench")
    watchlist_stub(matching).CreateWatchlist(gallery_pb2.CreateWatchlistRequest(watchlist=watchlist), timeout=30)
    gallery = gallery_pb2_grpc.GalleryServiceStub(connect("matching", matching))
    for person in (p for p in cast if p.enrolled):
        reply = gallery.Enroll(
            gallery_pb2.EnrollRequest(
                subject_id=person.subject_id,
                images=[person.enrolment],
                watchlists=list(person.watchlists),
                purpose="sightline bench chaos",
            ),
            timeout=120,
        )
        if not reply.templates_added:
            raise SystemExit(f"error: could not enrol {person.subject_id}: {reply.results[0].reason}")


def _cameras(run: Run, plan: list[Camera], fps: float) -> None:
    """Every camera through capture, in turn; what a broken Ingest did not publish is sent again."""
    started = time.monotonic()
    try:
        for camera in plan:
            _camera(run, camera, fps)
    finally:
        run.cameras_s = time.monotonic() - started
        run.streaming.set()


def _camera(run: Run, camera: Camera, fps: float) -> None:
    from sightline.cli.run import ingest

    pending = list(zip(camera.frames, camera.people, strict=True))
    attempt = 0
    while pending:
        source_id = camera.source_id if attempt == 0 else f"{camera.source_id}-r{attempt}"
        folder = run.folder / source_id
        folder.mkdir(parents=True)
        for sequence, (image, subject) in enumerate(pending, 1):
            (folder / f"{sequence:05d}.jpg").write_bytes(image)
            run.shown[(source_id, sequence)] = subject
        run.sources[source_id] = camera.source_id
        run.frames_sent += len(pending) if attempt == 0 else 0
        try:
            ingest(str(folder), source_id=source_id, fps=fps, address=run.stack.addresses["capture"], progress=False)
            return
        except grpc.RpcError:
            run.interrupted_ingests += 1
        # Capture was killed during the call (or is down): once it is back, and the ledger holds all that reached
        # the broker, the frames missing from the frames topic are sent again.
        _wait_serving(run.stack, "capture", 300)
        run.ledger.wait_caught_up()
        published = run.ledger.published(source_id)
        pending = [frame for sequence, frame in enumerate(pending, 1) if sequence not in published]
        run.resent += len(pending)
        attempt += 1


def _gate(run: Run, travellers: list[Person], seed: int) -> None:
    """Back-to-back sessions of the travellers while the cameras stream."""
    from sightline.cli.endpoints import connect
    from sightline.cli.gate import run_session
    from sightline.v1 import session_pb2, session_pb2_grpc

    rng = random.Random(seed + 1)
    while not run.streaming.is_set():
        person = travellers[run.gate_sessions % len(travellers)]
        start = rng.randrange(len(person.gate_frames))
        frames = [person.gate_frames[(start + i) % len(person.gate_frames)] for i in range(GATE_FRAMES)]
        stub = session_pb2_grpc.KioskServiceStub(connect("capture", run.stack.addresses["capture"]))
        request = session_pb2.OpenSessionRequest(gate_id=GATE_ID, subject_id=person.subject_id)
        run.gate_sessions += 1
        try:
            run_session(stub, request, frames, GATE_FPS, timeout=60)
        except grpc.RpcError as exc:
            run.gate_sessions_broken += 1
            run.gate_errors[f"{exc.code().name}: {(exc.details() or '')[:120]}"] += 1
            time.sleep(1.0)  # a kiosk waits a moment before it tries again
            _wait_serving(run.stack, "capture", 300)


def _chaos(run: Run, kills: int, span_s: float, rng: random.Random) -> None:
    """SIGKILL each service ``kills`` times at random moments of the streaming time, each time once it is SERVING."""
    started = time.monotonic()
    end = max(WARM_UP_S + 1, span_s * 0.9)
    moments = sorted((rng.uniform(WARM_UP_S, end), service) for service in CHAOS_SERVICES for _ in range(kills))
    for moment, service in moments:
        time.sleep(max(0.0, started + moment - time.monotonic()))
        process = rng.choice(run.stack.processes_of(service))
        _wait_serving(run.stack, process, 300)
        pid = run.stack.record(process).pid
        os.kill(pid, signal.SIGKILL)
        run.kills.append({"at_s": round(time.monotonic() - started, 1), "process": process, "pid": pid})
        print(f"  {time.monotonic() - started:6.1f} s: SIGKILL {process} (pid {pid})", file=sys.stderr)


def _serving(stack: Any, process: str) -> bool:
    from sightline.common.rpc import check_health

    record = stack.record(process)
    return bool(record.alive()) and check_health(stack.process_addresses[process], timeout=1.0) == "SERVING"


def _wait_serving(stack: Any, process: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _serving(stack, process):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process} is not SERVING again after {timeout:g} s")
        time.sleep(0.25)


def _wait_all_serving(stack: Any, timeout: float) -> None:
    for process in stack.processes:
        _wait_serving(stack, process, timeout)


def _drain(run: Run, timeout: float) -> float:
    """Wait until every frame on the frames topic has its outcome and every session its decision; the seconds it
    took. Then a few seconds more, for replays and alerts still on their way."""
    from sightline.tooling.ledger import session_account

    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        frames = run.ledger.frame_ids(sources=set(run.sources), sessions=_sessions(run))
        sessions = session_account(run.ledger, {GATE_ID})
        if not run.ledger.unfinished(frames) and not sessions["undecided"]:
            break
        time.sleep(1.0)
    took = time.monotonic() - started
    time.sleep(5.0)
    run.ledger.wait_caught_up()
    return took


def _sessions(run: Run) -> set[str]:
    return run.ledger.session_ids({GATE_ID})  # type: ignore[no-any-return]


def stored_alerts(decision: str) -> set[str]:
    """The ids of every alert in decision's review store (an alert is stored before it is published)."""
    from sightline.cli.endpoints import connect
    from sightline.v1 import review_pb2, review_pb2_grpc

    stub = review_pb2_grpc.ReviewServiceStub(connect("decision", decision))
    request, ids = review_pb2.ListAlertsRequest(page_size=200), set()
    while True:
        reply = stub.ListAlerts(request, timeout=30)
        ids |= {reviewed.alert.alert_id for reviewed in reply.alerts if reviewed.alert.source_id.startswith("chaos-")}
        if not reply.next_page_token:
            return ids
        request.page_token = reply.next_page_token


# --- the report ----------------------------------------------------------------------------------------------------


def report(
    run: Run,
    cast: list[Person],
    restarts: dict[str, int],
    stored: set[str],
    streamed_s: float,
    drained_s: float,
    wall_s: float,
) -> dict[str, Any]:
    from sightline.decision.policy import Policy
    from sightline.tooling.ledger import alert_account, duplicates_before_dedup, frame_account, session_account

    ledger = run.ledger
    camera_frames = ledger.frame_ids(sources=set(run.sources))
    gate_frames = ledger.frame_ids(sessions=_sessions(run))
    # Every (source, sequence) written is published, or resent under the next source id; the rest never got there.
    not_published = len(run.shown) - sum(len(ledger.published(source)) for source in run.sources) - run.resent
    cameras_account = frame_account(ledger, camera_frames)
    gate_account = frame_account(ledger, gate_frames)
    watchlisted = {p.subject_id for p in cast if p.watchlists}
    alerts = alert_account(ledger, set(run.sources), watchlisted, Policy().alert_cooldown_seconds, stored)
    sessions = session_account(ledger, {GATE_ID})
    before = duplicates_before_dedup(ledger, camera_frames | gate_frames)
    lost = cameras_account["lost"] + gate_account["lost"] + max(0, not_published)
    doubled = cameras_account["duplicated_after_dedup"] + gate_account["duplicated_after_dedup"]
    result = {
        "frames": run.frames_sent,
        "frames_on_the_frames_topic": len(camera_frames),
        "frames_resent_after_capture_kills": run.resent,
        "ingests_broken_by_capture_kills": run.interrupted_ingests,
        "kills": len(run.kills),
        "kills_per_service": {s: sum(1 for k in run.kills if k["process"].startswith(s)) for s in CHAOS_SERVICES},
        "restarts": restarts,
        "lost": lost,
        "duplicates_before_dedup": before,
        "duplicates_after_dedup": doubled,
        "cameras": cameras_account,
        "wrong_subject": _wrong_subject(run),
        "alerts": alerts,
        "gate": {
            "sessions_started": run.gate_sessions,
            "sessions_broken_at_the_kiosk": run.gate_sessions_broken,
            "kiosk_errors": dict(run.gate_errors.most_common(5)),
            **sessions,
            "frames": gate_account,
        },
        "streamed_s": round(streamed_s, 1),
        "drained_s": round(drained_s, 1),
        "wall_s": round(wall_s, 1),
        "cameras_s": round(run.cameras_s, 1),
        "camera_fps": round(run.frames_sent / run.cameras_s, 2) if run.cameras_s else None,
        "cores": os.cpu_count(),
        "kill_log": run.kills,
    }
    result["passed"] = (
        lost == 0
        and doubled == 0
        and alerts["missing"] == 0
        and alerts["doubled"] == 0
        and sessions["decided_twice"] == 0
        and sessions["undecided"] == 0
    )
    return result


def _wrong_subject(run: Run) -> int:
    """Camera decisions naming someone other than the person the frame shows (none: the stranger, empty frames)."""
    wrong = 0
    for decision, frame in run.ledger.decisions_with_frames():
        if decision.echannel or frame is None or decision.outcome not in ("MATCH", "PENDING"):
            continue
        wrong += decision.subject_id != run.shown.get((frame.source_id, frame.sequence))
    return wrong
