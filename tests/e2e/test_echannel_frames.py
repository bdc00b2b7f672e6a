"""E-channel frames through the real services: the traveller's geometry and detection's per-session liveness verdict
reach the match results, next to the verification against the claim (what the session engine fuses)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from sightline.cli.gallery import enroll
from sightline.cli.outcomes import collect
from sightline.common import codec
from sightline.common.bus import make_producer
from sightline.common.config import KafkaSettings
from sightline.common.topics import FRAMES
from sightline.tooling.localstack import LocalStack
from sightline.v1 import events_pb2, types_pb2

pytestmark = pytest.mark.e2e


def frame_bytes(chip: Path, dx: int, dy: int) -> bytes:
    canvas = Image.new("RGB", (480, 400), (96, 100, 104))
    canvas.paste(Image.open(chip).convert("RGB").resize((240, 240)), (120 + dx, 80 + dy))
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=92)
    return out.getvalue()


def test_session_frames_carry_liveness_and_verification(tmp_path: Path, dlib_johns: Path, models_dir: Path) -> None:
    person = sorted(p for p in dlib_johns.iterdir() if p.is_dir())[0]
    chips = sorted(person.glob("*.jpg"))
    with LocalStack(tmp_path / "run", ports="auto") as stack:
        stack.start(timeout=120)
        kafka = KafkaSettings(bootstrap_servers=stack.bootstrap_servers)
        enrol_image = tmp_path / "enrol.jpg"
        enrol_image.write_bytes(frame_bytes(chips[-1], 0, 0))
        assert enroll("traveller-1", [enrol_image], [], address=stack.addresses["matching"]) == 1
        since = int(time.time() * 1000) - 1000
        producer = make_producer(kafka)
        for seq, chip in enumerate(chips[:10], start=1):
            ref = types_pb2.FrameRef(
                frame_id=f"gate-7:s1:{seq}",
                source_id="gate-7",
                sequence=seq,
                session_id="s1",
                claim_subject_id="traveller-1",
                purpose=types_pb2.PURPOSE_ECHANNEL,
                captured_at=codec.now(),
            )
            event = events_pb2.FrameCaptured(
                frame=ref, image=frame_bytes(chip, (seq % 3) * 7, (seq % 2) * 5), media_type="image/jpeg"
            )
            producer.send(FRAMES.name, key=b"gate-7", value=event.SerializeToString())
        producer.flush()
        outcomes = collect(kafka, "gate-7", set(range(1, 11)), since, timeout_s=90)
    assert sorted(outcomes.matches) == list(range(1, 11))
    faces = [outcomes.matches[seq].faces[0] for seq in range(1, 11)]
    assert all(len(f.landmarks) == 5 and len(f.detector_keypoints) == 6 for f in faces)
    assert all(f.verification.subject_found and f.verification.verified for f in faces)
    assert [f.liveness.assessed for f in faces] == [False] * 9 + [True]
    assert faces[-1].liveness.passed and faces[-1].liveness.frames == 10, list(faces[-1].liveness.reasons)
