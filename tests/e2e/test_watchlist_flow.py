"""The CCTV watchlist use, end to end on registry photos: a watchlist with its purpose, owner and threshold; a camera
where listed people, an enrolled person on no list and a stranger walk by; one alert per track; two-person review;
erasure; the audit chain over all of it.

People are the dlib "johns" (several photos each): two are put on the list from two photos each, and the camera
shows other photos of them, each repeated over several frames with small shifts and growth, like someone walking
towards the camera, with a pause between people longer than a track lives. Capture times are set on the frames, so
the test need not wait for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_tracks import frame_image

from sightline.cli.gallery import enroll
from sightline.cli.outcomes import Outcomes, collect
from sightline.common.auth import AUTHORIZATION_KEY, Principal, Role, dump_principals, hash_token, new_token
from sightline.common.bus import make_producer, read_topics
from sightline.common.config import KafkaSettings
from sightline.common.rpc import channel
from sightline.common.topics import ALERTS, FRAMES
from sightline.detection.settings import DetectionSettings
from sightline.tooling.localstack import LocalStack
from sightline.v1 import events_pb2, gallery_pb2, gallery_pb2_grpc, review_pb2, review_pb2_grpc, types_pb2

pytestmark = pytest.mark.e2e
CAMERA = "lobby-cam"
WATCHLIST = "persons-of-interest"
LISTED = ("John_Salley", "John_Savage")
ON_NO_LIST = "John_Shimkus"  # enrolled, but on no watchlist
STRANGER = "John_Simm"  # never enrolled
WALK = 5  # frames per person
REVIEWERS = ("alice", "bob")
TOKENS = {name: new_token() for name in REVIEWERS}


def photos(johns: Path, person: str) -> list[Path]:
    return sorted((johns / person).glob("*.jpg"))


def portraits(johns: Path, person: str, folder: Path) -> list[Path]:
    """Two enrolment images of the person: registry photos (tight 150 px crops) centred on a plain background, as a
    photographer would frame them, so the detector sees the whole head."""
    made = []
    for index, photo in enumerate(photos(johns, person)[:2]):
        made.append(folder / f"{person}-{index}.jpg")
        made[-1].write_bytes(frame_image(photo, (480, 360), 300))
    return made


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    run_dir = tmp_path_factory.mktemp("watchlist")
    reviewers = run_dir / "reviewers.yaml"
    reviewers.write_text(
        dump_principals([Principal(name, frozenset({Role.REVIEWER}), hash_token(TOKENS[name])) for name in REVIEWERS])
    )
    env = {"SIGHTLINE_AUTH_TOKENS_FILE": str(reviewers), "SIGHTLINE_MATCHING_STREAM_AUDIT_INTERVAL_S": "1"}
    with LocalStack(run_dir, ports="auto", env=env) as running:
        running.start(timeout=120)
        yield running


def walk_by(people: list[Path], first_sequence: int, start: float) -> list[tuple[int, float, bytes]]:
    """(sequence, capture time, JPEG): each photo walked past the camera over WALK frames, one person at a time."""
    pause = DetectionSettings().track_max_age_s + 1.0
    frames, at, sequence = [], start, first_sequence
    for index, photo in enumerate(people):
        x = 320 + 320 * (index % 2)
        for step in range(WALK):
            frames.append((sequence, at, frame_image(photo, (x + 10 * step, 330 + 4 * step), int(230 * 1.08**step))))
            sequence, at = sequence + 1, at + 0.2
        at += pause
    return frames


def publish(kafka: KafkaSettings, frames: list[tuple[int, float, bytes]]) -> None:
    producer = make_producer(kafka)
    for sequence, at, image in frames:
        ref = types_pb2.FrameRef(
            frame_id=f"{CAMERA}:{sequence}", source_id=CAMERA, sequence=sequence, purpose=types_pb2.PURPOSE_CCTV
        )
        ref.captured_at.FromNanoseconds(int(at * 1e9))
        event = events_pb2.FrameCaptured(frame=ref, image=image, media_type="image/jpeg")
        producer.send(FRAMES.name, key=CAMERA.encode(), value=event.SerializeToString())
    producer.flush()
    producer.close()


def run_camera(stack: LocalStack, frames: list[tuple[int, float, bytes]]) -> Outcomes:
    kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers)
    since = int(time.time() * 1000) - 1000
    publish(kafka, frames)
    return collect(kafka, CAMERA, {sequence for sequence, _, _ in frames}, since, timeout_s=120, grace_s=2.0)


def sightline(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    """The command line against this stack, as its local administrator (the token the stack wrote for the CLI)."""
    env = {**os.environ, "SIGHTLINE_RUN_DIR": str(stack.run_dir)}
    env.pop("SIGHTLINE_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "sightline.cli.main", *args], capture_output=True, text=True, timeout=120, env=env
    )


def review(
    stub: review_pb2_grpc.ReviewServiceStub, reviewer: str, alert_id: str, action: int, not_this_person: bool = False
) -> review_pb2.ReviewedAlert:
    request = review_pb2.ReviewAlertRequest(
        alert_id=alert_id, action=action, not_this_person=not_this_person, comment=f"reviewed by {reviewer}"
    )
    return stub.ReviewAlert(request, metadata=[(AUTHORIZATION_KEY, f"Bearer {TOKENS[reviewer]}")], timeout=30)


def test_watchlist_alerts_review_and_erasure(
    stack: LocalStack, dlib_johns: Path, models_dir: Path, tmp_path: Path
) -> None:
    matching = stack.addresses["matching"]
    watchlists = gallery_pb2_grpc.WatchlistServiceStub(channel(matching))
    gallery = gallery_pb2_grpc.GalleryServiceStub(channel(matching))
    reviews = review_pb2_grpc.ReviewServiceStub(channel(stack.addresses["decision"]))

    # The list, with its purpose, owner and own threshold; two people on it, one enrolled on no list.
    created = watchlists.CreateWatchlist(
        gallery_pb2.CreateWatchlistRequest(
            watchlist=gallery_pb2.Watchlist(
                name=WATCHLIST,
                purpose="court-ordered search, case 2026/114",
                owner="unit-7",
                target_fmr=1e-3,
                default_membership_days=30,
            )
        ),
        timeout=30,
    )
    assert created.threshold_distance > 0 and created.purpose.startswith("court-ordered")
    for person in LISTED:
        assert (
            enroll(
                person, portraits(dlib_johns, person, tmp_path), [WATCHLIST], address=matching, purpose="case 2026/114"
            )
            == 2
        )
    assert enroll(ON_NO_LIST, portraits(dlib_johns, ON_NO_LIST, tmp_path), [], address=matching) == 2
    enrolled = {
        s.subject_id: s.template_count for s in gallery.ListSubjects(gallery_pb2.ListSubjectsRequest()).subjects
    }
    assert enrolled == {LISTED[0]: 2, LISTED[1]: 2, ON_NO_LIST: 2}

    # The camera: each person walks by on other photos of them.
    order = [LISTED[0], STRANGER, ON_NO_LIST, LISTED[1]]
    frames = walk_by([photos(dlib_johns, person)[5] for person in order], 1, time.time())
    outcomes = run_camera(stack, frames)
    assert stack.poll_crashed() == []
    tracks = {}
    for index, person in enumerate(order):
        seen = {f.track_id for s in range(index * WALK + 1, (index + 1) * WALK + 1) for f in outcomes.matches[s].faces}
        assert len(seen) == 1, (person, seen)  # one track per walk-by
        tracks[person] = seen.pop()
    assert len(set(tracks.values())) == len(order)

    # One alert per (track, listed subject); none for the stranger or the person on no list.
    raised = sorted((a.subject_id, a.track_id) for a in outcomes.alerts)
    assert raised == sorted((person, tracks[person]) for person in LISTED), raised
    assert all(list(a.watchlists) == [WATCHLIST] for a in outcomes.alerts)
    assert {d.subject_id for d in outcomes.decisions if d.track_id == tracks[STRANGER]} <= {""}
    assert not any(d.outcome == events_pb2.OUTCOME_MATCH and d.subject_id == STRANGER for d in outcomes.decisions)
    # The passers-by left nothing behind in the gallery.
    after = {s.subject_id: s.template_count for s in gallery.ListSubjects(gallery_pb2.ListSubjectsRequest()).subjects}
    assert after == enrolled

    # Two-person review: alice confirms, alice cannot confirm twice, bob confirms -> CONFIRMED; the other alert is
    # rejected as "not this person".
    alert_of = {a.subject_id: a.alert_id for a in outcomes.alerts}
    first = review(reviews, "alice", alert_of[LISTED[0]], review_pb2.REVIEW_ACTION_CONFIRM)
    assert first.alert.status == events_pb2.ALERT_STATUS_PENDING_REVIEW and first.confirmations == 1
    with pytest.raises(grpc.RpcError) as twice:
        review(reviews, "alice", alert_of[LISTED[0]], review_pb2.REVIEW_ACTION_CONFIRM)
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    second = review(reviews, "bob", alert_of[LISTED[0]], review_pb2.REVIEW_ACTION_CONFIRM)
    assert second.alert.status == events_pb2.ALERT_STATUS_CONFIRMED
    assert [r.reviewer for r in second.reviews] == ["alice", "bob"]
    rejected = review(reviews, "bob", alert_of[LISTED[1]], review_pb2.REVIEW_ACTION_REJECT, not_this_person=True)
    assert rejected.alert.status == events_pb2.ALERT_STATUS_REJECTED
    # The "not this person" feedback is in the false-alert report, for that subject, camera and track.
    report = sightline(stack, "review", "feedback", "--json")
    assert report.returncode == 0, report.stderr
    feedback = json.loads(report.stdout)
    assert feedback["counts"] == [{"subject_id": LISTED[1], "source_id": CAMERA, "rejections": 1}]
    assert [(f["track_id"], f["reviewer"]) for f in feedback["feedback"]] == [(tracks[LISTED[1]], "bob")]
    # Integrators saw each status change on the alerts topic.
    kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers)
    statuses = [
        (a.subject_id, a.status)
        for a in (events_pb2.Alert.FromString(r.value) for r in read_topics(kafka, [ALERTS.name], idle_timeout_s=3.0))
    ]
    assert (LISTED[0], events_pb2.ALERT_STATUS_CONFIRMED) in statuses
    assert (LISTED[1], events_pb2.ALERT_STATUS_REJECTED) in statuses

    # Erasure: the first listed person is erased on request; nothing of them is searchable, and walking by again
    # raises nothing.
    erased = sightline(stack, "erase", LISTED[0], "--reference", "DSR-2026-0042", "--yes")
    assert erased.returncode == 0, erased.stderr
    probe = photos(dlib_johns, LISTED[0])[5].read_bytes()
    found = gallery.Search(gallery_pb2.SearchRequest(probe_image=probe, top_k=10), timeout=60)
    assert LISTED[0] not in {c.subject_id for c in found.candidates}
    again = run_camera(stack, walk_by([photos(dlib_johns, LISTED[0])[6]], len(frames) + 1, time.time() + 60))
    assert again.alerts == [] and not any(d.subject_id == LISTED[0] for d in again.decisions)

    # The audit trail holds every kind of action, and its chain is intact.
    listed = sightline(stack, "audit", "list", "--max", "1000", "--json")
    assert listed.returncode == 0, listed.stderr
    actions = {line.split('"action": "')[1].split('"')[0] for line in listed.stdout.splitlines() if '"action"' in line}
    assert {"WATCHLIST", "ENROL", "STREAM_SEARCH", "SEARCH", "ALERT", "REVIEW", "ERASE"} <= actions, actions
    verified = sightline(stack, "audit", "verify")
    assert verified.returncode == 0 and "intact" in verified.stdout, verified.stdout + verified.stderr
