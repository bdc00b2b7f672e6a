"""CCTV tracks through the real services: a person walking past a camera is one track, searched on a few of its best
faces only, and raises one alert; the next person is another track.

The "camera" is one registry photo of a person pasted on a fixed background, moved a little and grown a little from
frame to frame at 5 frames per second, as someone walking towards the camera (so later faces are better), then, after
a pause longer than a track lives, another person passing on the other side of the view. Capture times are set on the
frames, so the test need not wait for them.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from sightline.cli.gallery import enroll
from sightline.cli.outcomes import collect
from sightline.common import codec
from sightline.common.bus import make_producer, read_topics
from sightline.common.config import KafkaSettings
from sightline.common.stage import InputEvent
from sightline.common.topics import FACES, FRAMES
from sightline.detection.service import Detection
from sightline.detection.settings import DetectionSettings
from sightline.tooling.localstack import LocalStack
from sightline.v1 import events_pb2, types_pb2

pytestmark = pytest.mark.e2e
SOURCE = "corridor-cam"
WATCHLIST = "wanted"
WALK = 8  # frames of the first person
PASS = 5  # frames of the second one
SIZE = (960, 720)


def frame_image(photo: Path, centre: tuple[int, int], side: int) -> bytes:
    """The person's photo, scaled to fit ``side`` pixels, centred at ``centre`` on the camera's fixed background."""
    canvas = Image.new("RGB", SIZE, (110, 112, 108))
    person = Image.open(photo).convert("RGB")
    person.thumbnail((side, side * 1.25))
    canvas.paste(person, (centre[0] - person.width // 2, centre[1] - person.height // 2))
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=92)
    return out.getvalue()


def camera_frames(photos: Path) -> list[tuple[int, float, bytes]]:
    """(sequence, seconds after the start, JPEG) of the walk-by, then of the second person after a pause."""
    frames = [
        (i + 1, 0.2 * i, frame_image(photos / "obama.jpg", (300 + 12 * i, 300), int(260 * 1.1**i))) for i in range(WALK)
    ]
    start = 0.2 * WALK + DetectionSettings().track_max_age_s + 1.0
    frames += [
        (WALK + i + 1, start + 0.2 * i, frame_image(photos / "biden.jpg", (720 - 10 * i, 380), 420))
        for i in range(PASS)
    ]
    return frames


def publish(kafka: KafkaSettings, frames: list[tuple[int, float, bytes]]) -> None:
    producer = make_producer(kafka)
    started = time.time()
    for sequence, offset, image in frames:
        ref = types_pb2.FrameRef(
            frame_id=f"{SOURCE}:walk:{sequence}", source_id=SOURCE, sequence=sequence, purpose=types_pb2.PURPOSE_CCTV
        )
        ref.captured_at.FromNanoseconds(int((started + offset) * 1e9))
        event = events_pb2.FrameCaptured(frame=ref, image=image, media_type="image/jpeg")
        producer.send(FRAMES.name, key=SOURCE.encode(), value=event.SerializeToString())
    producer.flush()
    producer.close()


def detected(kafka: KafkaSettings, since_ms: int, count: int) -> dict[int, events_pb2.FacesDetected]:
    """The faces topic's events of this camera, by frame sequence."""
    found: dict[int, events_pb2.FacesDetected] = {}
    for record in read_topics(kafka, [FACES.name], since_ms, idle_timeout_s=5.0, stop=lambda: len(found) >= count):
        event = codec.parse(events_pb2.FacesDetected, record.value)
        if event.frame.source_id == SOURCE:
            found[event.frame.sequence] = event
    return found


def test_a_walk_by_is_one_track_searched_on_its_best_faces_with_one_alert(
    tmp_path: Path, face_photos: Path, models_dir: Path
) -> None:
    frames = camera_frames(face_photos)
    sequences = {sequence for sequence, _, _ in frames}
    with LocalStack(
        tmp_path / "run", ports="auto", services=("detection", "embedding", "matching", "decision")
    ) as stack:
        stack.start(timeout=120)
        kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers)
        matching = stack.addresses["matching"]
        assert enroll("obama", [face_photos / "obama2.jpg"], [WATCHLIST], address=matching) == 1  # another photo
        assert enroll("biden", [face_photos / "biden.jpg"], [], address=matching) == 1
        since = int(time.time() * 1000) - 1000
        publish(kafka, frames)
        outcomes = collect(kafka, SOURCE, sequences, since, timeout_s=120, grace_s=2.0)
        faces = detected(kafka, since, len(frames))
        assert stack.poll_crashed() == []

    # Detection: every face of the walk-by has one track id, the second person another.
    assert sorted(faces) == sorted(sequences)
    assert all(len(faces[s].faces) == 1 for s in sequences), {s: len(faces[s].faces) for s in sequences}
    walker = {faces[s].faces[0].track_id for s in range(1, WALK + 1)}
    passer = {faces[s].faces[0].track_id for s in range(WALK + 1, WALK + PASS + 1)}
    assert len(walker) == 1 and len(passer) == 1 and walker != passer, (walker, passer)
    (walker_track,), (passer_track,) = walker, passer
    assert walker_track.startswith(f"{SOURCE}/t")

    # Only the faces worth a search went on (with their chip, to embedding and matching): the first two of each
    # track, then the walker's face once it got clearly better as he came closer, and never more than K per track.
    rule = DetectionSettings()
    with_chip = {s for s in sequences if faces[s].faces[0].chip_size}
    searched: dict[str, list[int]] = {}
    for sequence, result in sorted(outcomes.matches.items()):
        for face in result.faces:
            searched.setdefault(face.track_id, []).append(sequence)
    assert {s for seqs in searched.values() for s in seqs} == with_chip
    quality = {s: faces[s].faces[0].quality.score for s in sequences}
    assert max(quality[s] for s in range(3, WALK + 1)) >= max(quality[1], quality[2]) + rule.search_margin  # closer
    assert searched[walker_track][:2] == [1, 2] and len(searched[walker_track]) == rule.search_max_faces, searched
    assert searched[passer_track] == [WALK + 1, WALK + 2], searched  # steady: the first faces are enough
    faceless = {d.frame.sequence for d in outcomes.decisions if d.outcome == events_pb2.OUTCOME_NO_FACE}
    assert len(outcomes.decisions) - len(faceless) == len(with_chip)  # one decision per searched face
    assert faceless == set(sequences) - with_chip  # and its NO_FACE record for each frame with none searched

    # Decision: the walker is obama, agreed on by his track's searched faces, with exactly one alert for the track.
    by_track = {track: [d for d in outcomes.decisions if d.track_id == track] for track in searched}
    assert {d.subject_id for d in by_track[walker_track]} == {"obama"}
    assert any(d.outcome == events_pb2.OUTCOME_MATCH for d in by_track[walker_track])
    assert {d.subject_id for d in by_track[passer_track]} == {"biden"}
    assert [(a.subject_id, a.track_id) for a in outcomes.alerts] == [("obama", walker_track)]
    assert list(outcomes.alerts[0].watchlists) == [WATCHLIST]


def test_detection_tracks_cctv_faces_but_leaves_echannel_frames_untouched(face_photos: Path, models_dir: Path) -> None:
    detection = Detection(DetectionSettings())
    image = frame_image(face_photos / "obama.jpg", (400, 330), 400)

    def detect(purpose: int, sequence: int) -> events_pb2.FacesDetected:
        ref = types_pb2.FrameRef(
            frame_id=f"gate:{sequence}",
            source_id="gate",
            sequence=sequence,
            purpose=purpose,
            session_id="s1" if purpose == types_pb2.PURPOSE_ECHANNEL else "",
        )
        ref.captured_at.FromNanoseconds(int((1000.0 + 0.2 * sequence) * 1e9))
        value = events_pb2.FrameCaptured(frame=ref, image=image, media_type="image/jpeg").SerializeToString()
        (output,) = detection.process_event(
            InputEvent(key=b"gate", value=value, topic=FRAMES.name, partition=0, offset=sequence)
        )
        return codec.parse(events_pb2.FacesDetected, output.value)

    gate = [detect(types_pb2.PURPOSE_ECHANNEL, s).faces[0] for s in range(1, 5)]
    assert all(f.chip_size and not f.track_id for f in gate)  # every face searched, none tracked
    assert [f.liveness.frames for f in gate] == [1, 2, 3, 4]  # the session's liveness goes on as before
    cctv = [detect(types_pb2.PURPOSE_CCTV, s).faces[0] for s in range(5, 9)]
    assert len({f.track_id for f in cctv}) == 1 and cctv[0].track_id == "gate/t1001000"
    assert [bool(f.chip_size) for f in cctv] == [True, True, False, False]  # the same face again is not searched
    assert not any(f.liveness.frames for f in cctv)
