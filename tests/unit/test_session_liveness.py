"""Detection's per-session liveness: verdicts accumulate per session, on the real models and real photos; and the
attack it must not let through: a live but blurry face earning the verdict for a good photo shown after it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from test_sessions import Clock, make_engine, opened

from sightline.common.images import decode_image
from sightline.common.models.pipeline import AnalyzedFace, FaceAnalyzer
from sightline.common.models.registry import model_files
from sightline.detection.liveness import LivenessSettings
from sightline.detection.session_liveness import SessionLiveness, traveller
from sightline.v1 import events_pb2, session_pb2, types_pb2


@pytest.fixture(scope="module")
def analyzer(models_dir: Path) -> FaceAnalyzer:
    return FaceAnalyzer(model_files(models_dir))


def on_canvas(chip: Path, dx: int, dy: int, blur: float = 0.0) -> np.ndarray:
    canvas = Image.new("RGB", (480, 400), (96, 100, 104))
    face = Image.open(chip).convert("RGB").resize((240, 240))
    canvas.paste(face.filter(ImageFilter.GaussianBlur(blur)) if blur else face, (120 + dx, 80 + dy))
    return np.asarray(canvas)


def live_frames(dlib_johns: Path, blur: float = 0.0) -> list[np.ndarray]:
    """A live traveller, as far as still images go: different photos of one person, moving a little."""
    person = sorted(p for p in dlib_johns.iterdir() if p.is_dir())[0]
    return [on_canvas(chip, (i % 3) * 7, (i % 2) * 5, blur) for i, chip in enumerate(sorted(person.glob("*.jpg"))[:8])]


def feed(
    liveness: SessionLiveness, analyzer: FaceAnalyzer, session: str, frames: list[np.ndarray]
) -> list[tuple[AnalyzedFace, types_pb2.LivenessResult]]:
    """Each frame's traveller face and the verdict detection attaches to it (frame sequences from 1)."""
    results = []
    for i, rgb in enumerate(frames):
        face = traveller(analyzer.analyze(rgb))
        assert face is not None
        results.append((face, liveness.observe(session, face, at=100.0 + i * 0.1, sequence=i + 1)))
    return results


def verdicts(fed: list[tuple[AnalyzedFace, types_pb2.LivenessResult]]) -> list[types_pb2.LivenessResult]:
    return [verdict for _, verdict in fed]


def test_verdicts_come_once_enough_frames_are_in_and_follow_the_evidence(
    analyzer: FaceAnalyzer, dlib_johns: Path, face_photos: Path
) -> None:
    liveness = SessionLiveness(LivenessSettings(min_frames=6))
    still = [decode_image((face_photos / "obama.jpg").read_bytes())] * 8

    live_results = verdicts(feed(liveness, analyzer, "real", live_frames(dlib_johns)))
    still_results = verdicts(feed(liveness, analyzer, "still", still))

    assert [r.assessed for r in live_results[:5]] == [False] * 5 and "need 6 frames, have 1" in live_results[0].reasons[
        0
    ]
    assert live_results[-1].assessed and live_results[-1].passed, list(live_results[-1].reasons)
    assert still_results[-1].assessed and not still_results[-1].passed
    assert any("motion" in reason for reason in still_results[-1].reasons)
    assert live_results[-1].frames == 6 and still_results[-1].frames == 6  # sessions do not mix
    # Assessed once, on the first six frames: later frames carry that verdict, and the window it rests on, without
    # the checks running again.
    assert live_results[5] == live_results[6] == live_results[7] and still_results[5] == still_results[7]
    assert (live_results[7].first_sequence, live_results[7].last_sequence) == (1, 6)


def gate_result(seq: int, face: AnalyzedFace, verdict: types_pb2.LivenessResult) -> events_pb2.MatchResult:
    """What matching would put on the topic for this frame: detection's face and verdict, and a face verified against
    the claim (the photo shown is of the claimed person)."""
    frame = types_pb2.FrameRef(
        frame_id=f"gate-1:s1:{seq}",
        source_id="gate-1",
        sequence=seq,
        session_id="s1",
        claim_subject_id="traveller",
        purpose=types_pb2.PURPOSE_ECHANNEL,
    )
    frame.captured_at.FromNanoseconds(int((100 + seq * 0.1) * 1e9))
    result = events_pb2.MatchResult(frame=frame, model_name="dlib_resnet_v1", model_version="1")
    x1, y1, x2, y2 = (float(v) for v in face.box)
    match = result.faces.add(face_index=0, box=types_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2), liveness=verdict)
    match.quality.score = face.quality.score
    match.verification.CopyFrom(
        types_pb2.Verification(subject_id="traveller", subject_found=True, verified=True, distance=0.35, similarity=0.7)
    )
    return result


def decide(fed: list[tuple[AnalyzedFace, types_pb2.LivenessResult]]) -> session_pb2.SessionUpdate:
    """The session decision on these frames, and at its deadline when they did not decide it."""
    clock = Clock()
    engine = make_engine(clock, min_verified_frames=2)
    state = opened(engine)
    for seq, (face, verdict) in enumerate(fed, start=1):
        update = engine.on_result(state, gate_result(seq, face, verdict))
        if state.decided:
            return update
    clock.now = state.deadline
    timed_out = engine.tick(state, clock.now)
    assert timed_out is not None
    return timed_out


@pytest.mark.parametrize("liveness_min_quality", [40.0, 0.0])
def test_a_live_blurry_face_cannot_earn_the_verdict_for_a_photo_shown_after_it(
    analyzer: FaceAnalyzer, dlib_johns: Path, face_photos: Path, liveness_min_quality: float
) -> None:
    """The attack: a live face too blurry to verify (quality < 40) for the liveness frames, then a good photo of the
    claimed person. With detection's quality bar (40) the blurry faces do not count, and the photo fails liveness;
    with no bar at all (0, as before), the verdict passes on the blurry frames, but the photo's frames lie outside
    the window it was assessed on and cannot be accepted on it."""
    liveness = SessionLiveness(LivenessSettings(min_frames=6, min_quality=liveness_min_quality))
    photo = [decode_image((face_photos / "obama.jpg").read_bytes())] * 8
    fed = feed(liveness, analyzer, "attack", live_frames(dlib_johns, blur=4) + photo)
    assert max(face.quality.score for face, _ in fed[:8]) < 40 <= min(face.quality.score for face, _ in fed[8:])

    outcome = decide(fed)

    assert outcome.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER, list(outcome.reasons)
    if liveness_min_quality:
        assert outcome.reasons[0].startswith("liveness failed: motion")
    else:
        assert (fed[-1][1].passed, fed[-1][1].first_sequence, fed[-1][1].last_sequence) == (True, 1, 6)
        assert "0 of 2 verified frames, liveness passed (8 more verified outside frames 1-6" in outcome.reasons[0]


def test_good_live_frames_of_the_claimed_person_are_accepted(analyzer: FaceAnalyzer, dlib_johns: Path) -> None:
    fed = feed(SessionLiveness(LivenessSettings(min_frames=6)), analyzer, "genuine", live_frames(dlib_johns))
    outcome = decide(fed)
    assert outcome.outcome == session_pb2.SESSION_OUTCOME_ACCEPT, list(outcome.reasons)
    assert outcome.frames_seen == 6 and outcome.reasons[0] == "6 good frames verified against the claim (2 needed)"
