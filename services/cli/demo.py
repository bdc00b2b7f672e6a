"""``sightline demo``: the whole system on real photos, start to finish, with a verdict.

Starts a private local stack (broker and the five services as separate processes), enrols two people from the
registry sample photos (one of them on a watchlist), streams a short "camera" sequence made from *other* photos of the
watchlisted person, photos of strangers, and two broken frames, prints every decision and alert, and checks the
outcome: the watchlisted person is matched and raises exactly one alert, strangers match nobody, the broken frames
land in the dead-letter topic, and nothing else is matched. Exits non-zero when the outcome is not the expected one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCE_ID = "demo-camera"
WATCHLIST = "demo-watchlist"


@dataclass(frozen=True)
class Expected:
    sequence: int
    file: str
    kind: str  # "watchlisted", "stranger" or "broken"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline on sample photos and check the outcome")
    parser.add_argument("--keep", action="store_true", help="keep the demo's run folder (logs, gallery) afterwards")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the stack and the results")
    parser.set_defaults(func=cmd_demo)


def sample_paths() -> tuple[Path, list[Path]]:
    from sightline.common.paths import samples_dir

    photos = samples_dir() / "face_recognition"
    strangers = sorted((samples_dir() / "dlib" / "faces").glob("*.jpg"))[:2]
    if not (photos / "obama.jpg").is_file() or len(strangers) < 2:
        raise SystemExit(
            f"error: sample photos not found in {samples_dir()}: run `make setup` "
            "(or python -m sightline.tooling.samples)"
        )
    return photos, strangers


def build_sequence(photos: Path, strangers: list[Path], dest: Path) -> list[Expected]:
    """Write the camera frames into ``dest`` (in order) and say what each should produce."""
    plan: list[tuple[str, Callable[[Path], None]]] = []
    for shift in [(0, 0), (6, 3), (12, 6)]:
        plan.append(("watchlisted", _shifted(photos / "obama2.jpg", shift)))
    for stranger in strangers:
        plan.append(("stranger", _shifted(stranger, (0, 0))))
    plan.append(("broken", _truncated(photos / "obama3.jpg")))
    plan.append(("broken", _corrupt))
    for shift in [(0, 0), (-8, 4)]:
        plan.append(("watchlisted", _shifted(photos / "obama3.jpg", shift)))
    expected = []
    for sequence, (kind, write) in enumerate(plan, start=1):
        name = f"{sequence:03d}-{kind}.jpg"
        write(dest / name)
        expected.append(Expected(sequence, name, kind))
    return expected


def _shifted(source: Path, shift: tuple[int, int]) -> Callable[[Path], None]:
    """A copy moved by a few pixels, like the same person in consecutive camera frames."""

    def write(out: Path) -> None:
        from PIL import Image, ImageOps

        image = ImageOps.exif_transpose(Image.open(source)).convert("RGB")
        canvas = Image.new("RGB", image.size, (118, 118, 118))
        canvas.paste(image, shift)
        canvas.save(out, quality=92)

    return write


def _truncated(source: Path) -> Callable[[Path], None]:
    return lambda out: out.write_bytes(source.read_bytes()[:2000])


def _corrupt(out: Path) -> None:
    """A frame that starts like a JPEG and holds nothing after: capture passes it on, detection cannot decode it.
    (A file that does not even start like an image never leaves capture: source_policy.py.)"""
    out.write_bytes(b"\xff\xd8\xff\xdb" + bytes(17))


def check(expected: list[Expected], outcomes) -> list[str]:  # type: ignore[no-untyped-def]
    """What went wrong, as sentences; empty when the outcome is the expected one."""
    from sightline.v1 import events_pb2

    problems = []
    kinds = {e.sequence: e.kind for e in expected}
    by_kind: dict[str, list[events_pb2.Decision]] = {"watchlisted": [], "stranger": [], "broken": []}
    for decision in outcomes.decisions:
        if decision.outcome == events_pb2.OUTCOME_NO_FACE:
            continue  # a frame's record that it had no face: says nothing about who was seen
        by_kind.setdefault(kinds.get(decision.frame.sequence, "stranger"), []).append(decision)
    watch = by_kind["watchlisted"]
    if not any(d.outcome == events_pb2.OUTCOME_MATCH and d.subject_id == "obama" for d in watch):
        problems.append("the watchlisted person (obama) was never matched")
    if any(d.subject_id not in ("", "obama") for d in watch):
        problems.append("a frame of obama was attributed to someone else")
    if not by_kind["stranger"]:
        problems.append("no face was found in the strangers' photos")
    if any(d.outcome != events_pb2.OUTCOME_NO_MATCH for d in by_kind["stranger"]):
        problems.append("a stranger was matched to an enrolled subject")
    if [a.subject_id for a in outcomes.alerts] != ["obama"]:
        problems.append(f"expected exactly one alert, for obama; got {[a.subject_id for a in outcomes.alerts]}")
    broken = {e.sequence for e in expected if e.kind == "broken"}
    if outcomes.dead_sequences() != broken:
        problems.append(
            f"expected frames {sorted(broken)} in the dead-letter topic, got {sorted(outcomes.dead_sequences())}"
        )
    return problems


def create_watchlist(matching: str) -> None:
    """The demo's list, with the purpose and owner every list must state, and memberships that end by themselves."""
    from sightline.cli.watchlists import watchlist_stub
    from sightline.v1 import gallery_pb2

    watchlist = gallery_pb2.Watchlist(
        name=WATCHLIST,
        purpose="demonstration on public sample photos",
        owner="sightline demo",
        default_membership_days=1,
    )
    watchlist_stub(matching).CreateWatchlist(gallery_pb2.CreateWatchlistRequest(watchlist=watchlist), timeout=30)
    print(
        f"Created watchlist {WATCHLIST!r}: purpose {watchlist.purpose!r}, owner {watchlist.owner!r}, "
        f"memberships end after {watchlist.default_membership_days} day"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from sightline.cli import render
    from sightline.cli.gallery import enroll
    from sightline.cli.outcomes import collect
    from sightline.cli.run import ingest
    from sightline.common.config import KafkaSettings
    from sightline.tooling.localstack import LocalStack, StackError

    photos, strangers = sample_paths()
    work = Path(tempfile.mkdtemp(prefix="sightline-demo-"))
    frames = work / "frames"
    frames.mkdir()
    expected = build_sequence(photos, strangers, frames)
    stack = LocalStack(work / "run", ports="auto", capture_roots=[frames])  # capture reads the demo's frames only
    try:
        print("Starting the local stack (broker + capture, detection, embedding, matching, decision)...", flush=True)
        stack.start(timeout=args.timeout)
        for name, address in stack.addresses.items():
            print(f"  {name:<10} {address}")
        matching = stack.addresses["matching"]
        create_watchlist(matching)
        print(f"Enrolling obama (on watchlist {WATCHLIST!r}) and biden (on no watchlist):")
        enroll("obama", [photos / "obama.jpg"], [WATCHLIST], "Barack Obama", matching)
        enroll("biden", [photos / "biden.jpg"], [], "Joe Biden", matching)
        print(f"Streaming {len(expected)} frames: 5 of obama (other photos), 2 of strangers, 2 broken:")
        since = int(time.time() * 1000) - 1000
        final = ingest(str(frames), source_id=SOURCE_ID, address=stack.addresses["capture"], progress=False)
        print(f"  capture published {final.frames_published} frame(s), {final.frames_failed} failed")
        outcomes = collect(
            KafkaSettings(bootstrap_servers=stack.bootstrap_servers),
            SOURCE_ID,
            {e.sequence for e in expected},
            since,
            args.timeout,
            on_message=lambda m: _print_event(render, m),
        )
    except StackError as exc:
        print(f"error: the local stack did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return _verdict(expected, outcomes, work if args.keep else None)


def _print_event(render, message) -> None:  # type: ignore[no-untyped-def]
    from sightline.v1 import events_pb2

    if not isinstance(message, events_pb2.MatchResult):
        print("  " + render.one_line(message), flush=True)


def _verdict(expected: list[Expected], outcomes, kept: Path | None) -> int:  # type: ignore[no-untyped-def]
    from sightline.v1 import events_pb2

    counts: dict[str, int] = {}
    for d in outcomes.decisions:
        name = events_pb2.Outcome.Name(d.outcome).removeprefix("OUTCOME_")
        counts[name] = counts.get(name, 0) + 1
    print(
        f"Summary: {len(outcomes.matches)} frames matched, {len(outcomes.decisions)} decisions "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}), {len(outcomes.alerts)} alert(s), "
        f"{len(outcomes.dead_letters)} dead letter(s)"
    )
    if kept:
        print(f"Run folder kept: {kept} (logs in {kept / 'run' / 'logs'})")
    problems = check(expected, outcomes)
    for problem in problems:
        print(f"UNEXPECTED: {problem}")
    print("Demo outcome: as expected" if not problems else "Demo outcome: NOT as expected")
    return 0 if not problems else 1
