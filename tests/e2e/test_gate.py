"""E-channel gate sessions through the whole stack, as a kiosk runs them: claim, frames, outcome (KioskService).

Travellers are dlib's "johns" (11 different photos of each of 5 people): one photo enrolled, the others composed into
camera frames with small shifts. A replay attack is one still photo of the claimed traveller warped by smooth random
homographies (a print held up and moved by a hand, tests/unit/test_liveness.py). One stack serves the module.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from PIL import Image

from e2e.test_echannel_frames import frame_bytes
from integration.test_document_reading import LINE1, LINE2_BAD_CHECK, render_page
from sightline.cli.gate import SessionRun, run_session
from sightline.common.images import encode_jpeg
from sightline.common.rpc import channel
from sightline.tooling.localstack import LocalStack, client_token
from sightline.v1 import detection_pb2, detection_pb2_grpc, gallery_pb2, gallery_pb2_grpc, session_pb2, session_pb2_grpc
from unit.test_liveness import _geometry, replay_attack

pytestmark = pytest.mark.e2e

FPS = 10.0
ACCEPT, REFER = session_pb2.SESSION_OUTCOME_ACCEPT, session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
KioskStub = session_pb2_grpc.KioskServiceStub
GalleryStub = gallery_pb2_grpc.GalleryServiceStub


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("gate"), ports="auto") as running:
        running.start(timeout=180)
        yield running


@pytest.fixture(scope="module")
def kiosk(stack: LocalStack) -> KioskStub:
    return KioskStub(channel(stack.addresses["capture"]))


@pytest.fixture(scope="module")
def gallery(stack: LocalStack) -> GalleryStub:
    return GalleryStub(channel(stack.addresses["matching"]))


@pytest.fixture(scope="module")
def people(dlib_johns: Path) -> list[list[Path]]:
    return [sorted(person.glob("*.jpg")) for person in sorted(p for p in dlib_johns.iterdir() if p.is_dir())]


@pytest.fixture(scope="module")
def traveller(gallery: GalleryStub, people: list[list[Path]]) -> str:
    """An enrolled traveller (the last photo of the first person); the other photos are their camera frames."""
    request = gallery_pb2.EnrollRequest(subject_id="traveller-0", images=[frame_bytes(people[0][-1], 0, 0)])
    reply = gallery.Enroll(request, timeout=120)
    assert reply.templates_added == 1, reply
    return "traveller-0"


def camera_frames(photos: list[Path], count: int = 12) -> list[bytes]:
    """Different photos of one person moving a little in front of the camera (the enrolled photo left out)."""
    return [frame_bytes(photos[i % (len(photos) - 1)], (i % 4) * 6 - 9, (i % 3) * 4 - 4) for i in range(count)]


def session(kiosk: KioskStub, frames: list[bytes], gate: str, **claim: object) -> SessionRun:
    request = session_pb2.OpenSessionRequest(gate_id=gate, **claim)
    run = run_session(kiosk, request, frames, FPS, timeout=60)
    assert run.outcome is not None, "no outcome reached the kiosk"
    return run


def test_the_genuine_traveller_is_accepted_with_reasons_and_evidence(
    kiosk: KioskStub, traveller: str, people: list[list[Path]]
) -> None:
    run = session(kiosk, camera_frames(people[0]), "gate-1", subject_id=traveller)
    outcome = run.outcome
    assert outcome.outcome == ACCEPT, list(outcome.reasons)
    assert any("verified against the claim" in r for r in outcome.reasons), list(outcome.reasons)
    assert any(r.startswith("liveness passed") for r in outcome.reasons), list(outcome.reasons)
    assert outcome.frames_verified >= 2 and outcome.liveness_score >= 0.5 and outcome.best_similarity > 0.5
    assert set(outcome.evidence_frame_ids) <= set(run.frame_ids) and len(outcome.evidence_frame_ids) >= 2
    assert outcome.policy_version and outcome.model_version
    # Liveness needs 10 frames; sending stops once the gate has its answer.
    assert 10 <= outcome.frames_seen <= run.frames_sent <= 12


def test_another_person_is_referred_to_an_officer(kiosk: KioskStub, traveller: str, people: list[list[Path]]) -> None:
    run = session(kiosk, camera_frames(people[1]), "gate-2", subject_id=traveller)
    assert run.outcome.outcome == REFER
    assert any("does not match the claim" in r for r in run.outcome.reasons), list(run.outcome.reasons)


def test_a_replayed_still_photo_is_referred_for_liveness(
    kiosk: KioskStub, stack: LocalStack, traveller: str, people: list[list[Path]]
) -> None:
    # A print of the claimed traveller's own photo: the face matches, only liveness can tell.
    photo = cv2.copyMakeBorder(
        np.asarray(Image.open(people[0][0]).convert("RGB")), 75, 75, 75, 75, cv2.BORDER_CONSTANT, value=(128, 128, 128)
    )
    detection = detection_pb2_grpc.DetectionServiceStub(channel(stack.addresses["detection"]))
    face = detection.Detect(detection_pb2.DetectRequest(image=encode_jpeg(photo)), timeout=30).faces[0]
    centre, ied = _geometry(
        np.array([(p.x, p.y) for p in face.landmarks]), np.array([(p.x, p.y) for p in face.detector_keypoints])
    )
    frames = [encode_jpeg(f) for f in replay_attack(photo, centre, ied, np.random.default_rng(3), 12)]
    run = session(kiosk, frames, "gate-3", subject_id=traveller)
    assert run.outcome.outcome == REFER
    assert any(r.startswith("liveness failed") for r in run.outcome.reasons), list(run.outcome.reasons)


def test_a_portrait_claim_is_accepted_and_its_template_deleted_afterwards(
    kiosk: KioskStub, gallery: GalleryStub, people: list[list[Path]]
) -> None:
    run = session(kiosk, camera_frames(people[2]), "gate-4", portrait=frame_bytes(people[2][-1], 0, 0))
    assert run.opened.claim_kind == session_pb2.CLAIM_KIND_PORTRAIT
    assert run.outcome.outcome == ACCEPT, list(run.outcome.reasons)
    subject = run.opened.claim_subject_id
    assert subject == f"session-{run.session_id}"
    deadline = time.monotonic() + 10
    while True:
        try:
            gallery.GetSubject(gallery_pb2.GetSubjectRequest(subject_id=subject), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            break
        assert time.monotonic() < deadline, f"{subject} is still in the gallery after its session ended"
        time.sleep(0.2)


def test_a_document_page_with_a_wrong_check_digit_is_refused_saying_why(kiosk: KioskStub, face_photos: Path) -> None:
    page = io.BytesIO()
    Image.fromarray(render_page(face_photos / "obama.jpg", (LINE1, LINE2_BAD_CHECK))).save(page, "PNG")
    with pytest.raises(grpc.RpcError) as caught:
        kiosk.OpenSession(session_pb2.OpenSessionRequest(gate_id="gate-5", document_page=page.getvalue()), timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "document number check digit is 7, computed 6" in caught.value.details()


def test_the_gate_command_prints_one_json_object(
    stack: LocalStack, traveller: str, people: list[list[Path]], tmp_path: Path
) -> None:
    for i, frame in enumerate(camera_frames(people[0])):
        (tmp_path / f"{i:02d}.jpg").write_bytes(frame)
    env = {**os.environ, "SIGHTLINE_TOKEN": client_token(stack.run_dir)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sightline.cli.main",
            "gate",
            "--subject",
            traveller,
            str(tmp_path),
            "--gate",
            "gate-6",
            "--json",
            "--capture",
            stack.addresses["capture"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    assert set(result) == {
        "outcome",
        "reasons",
        "elapsed_ms",
        "session_id",
        "frames_sent",
        "frames_verified",
        "best_similarity",
        "liveness_score",
        "evidence_frame_ids",
        "policy_version",
        "model_version",
    }
    assert result["outcome"] == "ACCEPT" and result["elapsed_ms"] > 0 and result["frames_sent"] >= 10
    assert all(f.startswith(f"gate-6:{result['session_id']}:") for f in result["evidence_frame_ids"])
