"""End to end: the whole local stack as separate processes, real photos in, decisions, alerts and dead letters out.

Streams the demo's camera sequence (the watchlisted person on other photos, strangers, broken frames) plus harder bad
input (a 50-megapixel frame, a malformed event written straight to the frames topic, an RGBA frame), and checks that
the same person is matched, strangers are not, bad input lands in the dead-letter topic with its reason, good frames
keep flowing after bad ones, and nothing of the strangers is kept in the gallery.
"""

from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image

from sightline.cli.demo import WATCHLIST, Expected, build_sequence, check, sample_paths
from sightline.cli.gallery import enroll
from sightline.cli.outcomes import collect
from sightline.cli.run import ingest
from sightline.common.bus import make_producer
from sightline.common.config import KafkaSettings
from sightline.common.topics import FRAMES
from sightline.tooling.localstack import LocalStack

pytestmark = pytest.mark.e2e
SOURCE = "e2e-camera"


def add_hard_frames(frames: Path, expected: list[Expected], photos: Path) -> list[Expected]:
    next_seq = len(expected) + 1
    huge = io.BytesIO()
    Image.new("L", (10_000, 5_000), 30).save(huge, "PNG")  # 50 MP, a few hundred KB: must be refused, not decoded
    (frames / f"{next_seq:03d}-huge.png").write_bytes(huge.getvalue())
    (frames / f"{next_seq + 1:03d}-rgba.png").write_bytes((photos / "32bit.png").read_bytes())
    Image.open(photos / "obama2.jpg").convert("L").save(frames / f"{next_seq + 2:03d}-grey.png")
    return [
        *expected,
        Expected(next_seq, "huge", "broken"),
        Expected(next_seq + 1, "rgba", "watchlisted"),
        Expected(next_seq + 2, "grey", "watchlisted"),
    ]


def test_stream_matches_the_same_person_not_strangers_and_dead_letters_bad_frames(
    tmp_path: Path, models_dir: Path
) -> None:
    photos, strangers = sample_paths()
    frames = tmp_path / "frames"
    frames.mkdir()
    expected = add_hard_frames(frames, build_sequence(photos, strangers, frames), photos)
    with LocalStack(tmp_path / "run", ports="auto") as stack:
        stack.start(timeout=120)
        kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers)
        assert enroll("obama", [photos / "obama.jpg"], [WATCHLIST], address=stack.addresses["matching"]) == 1
        assert enroll("biden", [photos / "biden.jpg"], [], address=stack.addresses["matching"]) == 1
        since = int(time.time() * 1000) - 1000
        producer = make_producer(kafka)  # an integrator's malformed event, straight onto the frames topic
        producer.send(FRAMES.name, key=SOURCE.encode(), value=b"\x0a\xff\xff not a FrameCaptured")
        producer.flush()
        final = ingest(
            str(frames), source_id=SOURCE, no_pacing=True, address=stack.addresses["capture"], progress=False
        )
        assert final.frames_published == len(expected)
        outcomes = collect(kafka, SOURCE, {e.sequence for e in expected}, since, timeout_s=120)
        assert stack.poll_crashed() == []

    assert check(expected, outcomes) == []
    reasons = {int(d.frame_id.rsplit(":", 1)[1]): d.reason for d in outcomes.dead_letters}
    huge = next(e.sequence for e in expected if e.file == "huge")
    assert reasons[huge] == "image_too_large"
    assert {d.stage for d in outcomes.dead_letters} == {"detection"}
    grey = next(e.sequence for e in expected if e.file == "grey")
    assert any(d.frame.sequence == grey and d.subject_id == "obama" for d in outcomes.decisions), (
        "flow stopped after bad frames"
    )
    for decision in outcomes.decisions:
        assert decision.decision_id and decision.policy_version and list(decision.evidence_frame_ids)

    gallery = sqlite3.connect(tmp_path / "run" / "gallery.db")
    assert gallery.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 2  # strangers left nothing behind
