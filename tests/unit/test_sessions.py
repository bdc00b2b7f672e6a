"""E-channel session fusion: ACCEPT and every way to REFER_TO_OFFICER, time-outs, evidence, state round trips.

Landmarks come from a rigid 3D head model projected through a pinhole camera: a real head turning shows parallax
(ears and nose tip move differently from the eye plane); a printed photo moved by hand is a plane, so its points
follow one homography.
"""

from __future__ import annotations

import numpy as np
import pytest

from sightline.common.liveness import LivenessSettings
from sightline.decision.sessions import EChannelPolicy, SessionEngine, SessionState
from sightline.v1 import events_pb2, session_pb2, types_pb2

# 5 landmarks then 6 keypoints, millimetres: x right, y down, z towards the camera.
HEAD = np.array([
    [-45, 0, -5], [-15, 0, 0], [45, 0, -5], [15, 0, 0], [0, 45, 15],
    [-30, 0, -2], [30, 0, -2], [0, 35, 30], [0, 70, 5], [-75, 20, -80], [75, 20, -80],
], dtype=np.float64)  # fmt: skip


def project(points: np.ndarray, yaw_deg: float, pitch_deg: float, shift: tuple[float, float]) -> np.ndarray:
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    ry = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    moved = points @ (rx @ ry).T
    depth = 600.0 - moved[:, 2]
    return np.stack([320 + shift[0] + 800 * moved[:, 0] / depth, 240 + shift[1] + 800 * moved[:, 1] / depth], axis=1)


def live_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [project(HEAD, 12 * np.sin(i / 2), 5 * np.cos(i / 3), (i * 2.0, 0)) + rng.normal(0, 0.4, (11, 2))
            for i in range(count)]  # fmt: skip


def flat_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """A still photo of the head, held up and moved: one homography per frame applied to the frontal view."""
    rng = np.random.default_rng(seed)
    frontal = project(HEAD, 0, 0, (0, 0))
    frames = []
    for i in range(count):
        h = np.eye(3) + np.array([[0.02 * np.sin(i), 0.05 * np.sin(i / 2), 3 * i],
                                  [-0.05 * np.sin(i / 2), 0.02 * np.cos(i), 1.5 * i],
                                  [2e-4 * np.sin(i / 2), 1e-4 * np.cos(i / 3), 0]])  # fmt: skip
        lifted = np.c_[frontal, np.ones(11)] @ h.T
        frames.append(lifted[:, :2] / lifted[:, 2:] + rng.normal(0, 0.4, (11, 2)))
    return frames


def result(seq: int, points: np.ndarray, *, verified: bool = True, quality: float = 80.0, distance: float = 0.35,
           stop_hit: bool = False) -> events_pb2.MatchResult:  # fmt: skip
    frame = types_pb2.FrameRef(frame_id=f"gate-1:s:{seq}", source_id="gate-1", sequence=seq, session_id="s1",
                               claim_subject_id="traveller")  # fmt: skip
    frame.captured_at.FromNanoseconds(int((100 + seq * 0.1) * 1e9))
    out = events_pb2.MatchResult(frame=frame, model_name="dlib_resnet_v1", model_version="1")
    xs, ys = points[:, 0], points[:, 1]
    face = out.faces.add(face_index=0, box=types_pb2.Box(x1=xs.min() - 20, y1=ys.min() - 40, x2=xs.max() + 20, y2=ys.max() + 20))
    face.quality.score = quality
    face.landmarks.extend(types_pb2.Point(x=x, y=y) for x, y in points[:5])
    face.detector_keypoints.extend(types_pb2.Point(x=x, y=y) for x, y in points[5:])
    face.verification.CopyFrom(types_pb2.Verification(subject_id="traveller", subject_found=True, verified=verified,
                                                      distance=distance, similarity=1 - distance / 1.2))  # fmt: skip
    if stop_hit:
        face.candidates.add(subject_id="wanted", distance=0.3, similarity=0.75, watchlists=["stop"])
    return out


def opened(engine: SessionEngine) -> SessionState:
    event = session_pb2.SessionEvent(kind=session_pb2.SessionEvent.KIND_OPENED, session_id="s1", gate_id="gate-1",
                                     claim_subject_id="traveller")  # fmt: skip
    event.opened_at.FromNanoseconds(int(100 * 1e9))
    return engine.open(event)


@pytest.fixture
def engine() -> SessionEngine:
    policy = EChannelPolicy(min_verified_frames=2, liveness=LivenessSettings(min_frames=6), budget_seconds=5)
    return SessionEngine(policy, "policy-test")


def run(engine: SessionEngine, state: SessionState, results: list[events_pb2.MatchResult]) -> session_pb2.SessionUpdate:
    update = session_pb2.SessionUpdate()
    for item in results:
        update = engine.on_result(state, item)
        if state.decided:
            break
    return update


def test_live_traveller_matching_the_claim_is_accepted_with_evidence(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(i, p) for i, p in enumerate(live_frames(10), start=1)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT, list(update.reasons)
    assert update.frames_seen == 6 and update.frames_verified == 6
    assert len(update.evidence_frame_ids) == 6 and update.liveness_score >= 0.5
    assert update.policy_version == "policy-test" and update.model_version == "dlib_resnet_v1:1"
    assert any("liveness passed" in r for r in update.reasons)


@pytest.mark.parametrize("seed", range(5))
def test_a_photo_held_up_to_the_camera_is_referred_for_liveness(engine: SessionEngine, seed: int) -> None:
    state = opened(engine)
    update = run(engine, state, [result(i, p) for i, p in enumerate(flat_frames(10, seed), start=1)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert update.reasons[0].startswith("liveness failed")


def test_mismatch_against_the_claim_is_referred(engine: SessionEngine) -> None:
    state = opened(engine)
    frames = live_frames(3)
    update = run(engine, state, [result(1, frames[0], verified=False, distance=0.8),
                                 result(2, frames[1], verified=False, distance=0.75)])  # fmt: skip
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert "does not match the claim on 2 good frames" in update.reasons[0]


def test_repeated_low_quality_is_referred_and_low_quality_frames_are_not_evidence(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(i, p, quality=10) for i, p in enumerate(live_frames(12), start=1)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert "repeated low quality: 12 frames" in update.reasons[0] and update.frames_verified == 0


def test_stop_list_hit_refers_and_raises_an_alert(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(1, live_frames(1)[0], stop_hit=True)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and "stop-list hit: wanted" in update.reasons[0]
    alert = engine.stop_list_alert(state, ["stop"])
    assert alert is not None and alert.subject_id == "wanted" and alert.status == events_pb2.ALERT_STATUS_PENDING_REVIEW


def test_time_out_refers_with_what_was_missing(engine: SessionEngine) -> None:
    state = opened(engine)
    run(engine, state, [result(1, live_frames(1)[0])])
    assert engine.tick(state, now=104.9) is None
    update = engine.tick(state, now=105.1)
    assert update is not None and update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert update.reasons[0] == "time-out after 5 s: 1 of 2 verified frames, 1 of 6 frames for liveness"


def test_closing_early_refers_and_decided_sessions_do_not_change(engine: SessionEngine) -> None:
    state = opened(engine)
    run(engine, state, [result(1, live_frames(1)[0])])
    closed = engine.close(state)
    assert closed.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and "session closed" in closed.reasons[0]
    later = engine.on_result(state, result(2, live_frames(2)[1]))
    assert later.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and state.frames_seen == 1


def test_state_survives_a_round_trip_mid_session(engine: SessionEngine) -> None:
    frames = [result(i, p) for i, p in enumerate(live_frames(10), start=1)]
    state = opened(engine)
    run(engine, state, frames[:3])
    restored = SessionState.from_dict(state.to_dict())  # what a restart recovers from the table
    update = run(engine, restored, frames[3:])
    assert update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and update.frames_seen == 6
