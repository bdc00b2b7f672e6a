"""E-channel session fusion: ACCEPT and every way to REFER_TO_OFFICER, time-outs, evidence, state round trips.

Each frame's traveller face carries the liveness verdict detection attached to it (detection/session_liveness.py,
tested on real photos in test_session_liveness.py); here the verdicts are given, to test the fusion rules. The
results' capture times are ~100 s after the epoch, and so is the engine's clock (``Clock``), set by each test.
"""

from __future__ import annotations

from typing import Any

import pytest

from sightline.common.scores import distance_for_fmr
from sightline.decision.echannel.engine import SessionEngine, SessionState, VerifiedFrame
from sightline.decision.policy import EChannelPolicy, Policy
from sightline.v1 import events_pb2, session_pb2, types_pb2

PENDING = types_pb2.LivenessResult(assessed=False, frames=1, reasons=["need 6 frames, have 1"])
# Verdicts as detection gives them: assessed on the session's first six good frames, sequences 1 to 6.
LIVE = types_pb2.LivenessResult(assessed=True, passed=True, score=0.8, frames=6, first_sequence=1, last_sequence=6)
SPOOF = types_pb2.LivenessResult(
    assessed=True,
    passed=False,
    score=0.1,
    frames=6,
    first_sequence=1,
    last_sequence=6,
    reasons=["texture_non_planarity 0.0016 < 0.0040: the face moves as a flat picture"],
)


class Clock:
    """The engine's wall clock, as the test sets it."""

    def __init__(self, now: float = 100.5) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_engine(clock: Clock | None = None, thresholds: dict[str, Any] | None = None, **rules: Any) -> SessionEngine:
    """A session engine: policy version "policy-test" with ``thresholds`` (the policy's own fields), and the echannel
    ``rules`` (by default 2 verified frames needed, a 5 s budget)."""
    echannel = EChannelPolicy(**({"min_verified_frames": 2, "budget_seconds": 5} | rules))
    return SessionEngine(Policy(version="policy-test", echannel=echannel, **(thresholds or {})), clock or Clock())


def result(
    seq: int,
    *,
    liveness: types_pb2.LivenessResult = PENDING,
    verified: bool = True,
    quality: float = 80.0,
    distance: float = 0.35,
    stop_hit: bool = False,
    bystander: bool = False,
) -> events_pb2.MatchResult:
    frame = types_pb2.FrameRef(
        frame_id=f"gate-1:s:{seq}", source_id="gate-1", sequence=seq, session_id="s1", claim_subject_id="traveller"
    )
    frame.captured_at.FromNanoseconds(int((100 + seq * 0.1) * 1e9))
    out = events_pb2.MatchResult(frame=frame, model_name="dlib_resnet_v1", model_version="1")
    if bystander:  # a small face in the background, wanted, who is not the traveller
        far = out.faces.add(face_index=1, box=types_pb2.Box(x1=10, y1=10, x2=40, y2=40))
        far.candidates.add(subject_id="wanted", distance=0.3, watchlists=["stop"])
    face = out.faces.add(face_index=0, box=types_pb2.Box(x1=200, y1=100, x2=400, y2=300), liveness=liveness)
    face.quality.score = quality
    face.verification.CopyFrom(
        types_pb2.Verification(
            subject_id="traveller",
            subject_found=True,
            verified=verified,
            distance=distance,
            similarity=1 - distance / 1.2,
        )
    )
    if stop_hit:
        face.candidates.add(subject_id="wanted", distance=0.3, similarity=0.75, watchlists=["stop"])
    return out


def opened(engine: SessionEngine, session_id: str = "s1", at: float = 100.0) -> SessionState:
    event = session_pb2.SessionEvent(
        kind=session_pb2.SessionEvent.KIND_OPENED, session_id=session_id, gate_id="gate-1", claim_subject_id="traveller"
    )
    event.opened_at.FromNanoseconds(int(at * 1e9))
    return engine.open(event)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(clock: Clock) -> SessionEngine:
    return make_engine(clock)


def run(engine: SessionEngine, state: SessionState, results: list[events_pb2.MatchResult]) -> session_pb2.SessionUpdate:
    update = session_pb2.SessionUpdate()
    for item in results:
        update = engine.on_result(state, item)
        if state.decided:
            break
    return update


def live_session() -> list[events_pb2.MatchResult]:
    return [result(i) for i in range(1, 6)] + [result(6, liveness=LIVE)]


def test_live_traveller_matching_the_claim_is_accepted_with_evidence(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, live_session())
    assert update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT, list(update.reasons)
    assert update.frames_seen == 6 and update.frames_verified == 6 and len(update.evidence_frame_ids) == 6
    assert update.liveness_score == pytest.approx(0.8) and update.best_quality == 80
    assert update.policy_version == "policy-test" and update.model_version == "dlib_resnet_v1:1"
    assert update.reasons[1] == "liveness passed (score 0.80)"


def test_no_accept_before_liveness_passes_even_with_verified_frames(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(i) for i in range(1, 5)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_UNSPECIFIED and update.frames_verified == 4


def test_a_photo_held_up_to_the_camera_is_referred_for_liveness(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(i) for i in range(1, 6)] + [result(6, liveness=SPOOF)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert update.reasons[0].startswith("liveness failed: texture_non_planarity")


def test_mismatch_against_the_claim_is_referred(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(1, verified=False, distance=0.8), result(2, verified=False, distance=0.75)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert "does not match the claim on 2 good frames" in update.reasons[0]


def test_repeated_low_quality_is_referred_and_low_quality_frames_are_not_evidence(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(i, quality=10) for i in range(1, 13)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert "repeated low quality: 12 frames" in update.reasons[0] and update.frames_verified == 0


def test_stop_list_hit_on_the_traveller_refers_and_raises_an_alert(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(1, stop_hit=True)])
    assert (
        update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and "stop-list hit: wanted" in update.reasons[0]
    )
    alert = engine.stop_list_alert(state, ["stop"])
    assert alert is not None and alert.subject_id == "wanted" and alert.status == events_pb2.ALERT_STATUS_PENDING_REVIEW


def test_a_bystander_on_a_stop_list_does_not_decide_the_travellers_session(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(1, bystander=True)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_UNSPECIFIED and state.stop_list_hit is None


def test_time_out_refers_with_what_was_missing(engine: SessionEngine) -> None:
    state = opened(engine)
    run(engine, state, [result(1)])
    assert engine.tick(state, now=104.9) is None
    update = engine.tick(state, now=105.1)
    assert update is not None and update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert update.reasons[0] == "time-out after 5 s: 1 of 2 verified frames, liveness not yet assessed"


def test_closing_early_refers_and_decided_sessions_do_not_change(engine: SessionEngine) -> None:
    state = opened(engine)
    run(engine, state, [result(1)])
    closed = engine.close(state)
    assert closed.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and "session closed" in closed.reasons[0]
    later = engine.on_result(state, result(2, liveness=LIVE))
    assert later.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and state.frames_seen == 1


def test_state_survives_a_round_trip_mid_session(engine: SessionEngine) -> None:
    frames = live_session()
    state = opened(engine)
    run(engine, state, frames[:3])
    restored = SessionState.from_dict(state.to_dict())  # what a restart recovers from the store
    update = run(engine, restored, frames[3:])
    assert update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and update.frames_seen == 6


def test_a_replayed_frame_is_counted_once(engine: SessionEngine) -> None:
    state = opened(engine)
    engine.on_result(state, result(1))
    again = engine.on_result(state, result(1))  # redelivered after a restart, before its offset was committed
    assert again.frames_seen == 1 and again.frames_verified == 1 and state.frame_ids == ["gate-1:s:1"]


def test_a_close_waits_for_the_frames_still_in_the_pipeline(engine: SessionEngine) -> None:
    state = opened(engine)
    frames = live_session()
    run(engine, state, frames[:4])
    waiting = engine.request_close(state, at=101.0, frames_sent=6)
    assert waiting.outcome == session_pb2.SESSION_OUTCOME_UNSPECIFIED and engine.tick(state, now=101.5) is None
    # A loaded pipeline: the count is known, so the grace does not cut the traveller off; only the deadline would.
    assert engine.tick(state, now=101.0 + 3 * engine.rules.close_grace_seconds) is None
    update = run(engine, state, frames[4:])  # the last two results arrive after the close
    assert update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and update.frames_seen == 6


def test_a_close_decides_once_the_grace_has_passed_or_every_sent_frame_is_in(engine: SessionEngine) -> None:
    state = opened(engine)
    run(engine, state, [result(1)])
    engine.request_close(state, at=101.0)  # how many frames were sent is not known: wait for the grace
    assert engine.tick(state, now=101.9) is None
    closed = engine.tick(state, now=102.0)
    assert closed is not None and closed.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert closed.reasons[0] == "session closed: 1 of 2 verified frames, liveness not yet assessed"

    other = opened(engine)
    run(engine, other, [result(1)])
    at_once = engine.request_close(other, at=101.0, frames_sent=1)
    assert at_once.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and "session closed" in at_once.reasons[0]


def test_a_cancelled_session_ends_without_a_decision_and_keeps_its_reason(engine: SessionEngine) -> None:
    state = opened(engine)
    run(engine, state, [result(1)])
    cancelled = engine.cancel(state, "traveller left the gate")
    assert cancelled.outcome == session_pb2.SESSION_OUTCOME_CANCELLED
    assert list(cancelled.reasons) == ["traveller left the gate"]
    later = engine.on_result(state, result(2, liveness=LIVE))
    assert later.outcome == session_pb2.SESSION_OUTCOME_CANCELLED and list(later.reasons) == ["traveller left the gate"]


def test_a_decided_sessions_update_keeps_its_reasons_evidence_and_elapsed_time(
    engine: SessionEngine, clock: Clock
) -> None:
    state = opened(engine)
    clock.now = 100.35  # the first frame was captured at 100.1
    decided = run(engine, state, [result(1, stop_hit=True)])
    clock.now = 130.0  # later, say after a restart: the update still says when the outcome was reached
    restored = SessionState.from_dict(state.to_dict())
    again = engine.update(restored, [])
    assert decided.elapsed_ms == pytest.approx(250, abs=0.01) and again.elapsed_ms == decided.elapsed_ms
    assert list(again.reasons) == list(decided.reasons)
    assert list(again.evidence_frame_ids) == ["gate-1:s:1"]  # the stop-list hit's frame
    alert = engine.stop_list_alert(restored)  # the lists the subject is on, from the state
    assert alert is not None and list(alert.watchlists) == ["stop"] and alert.evidence_frame_ids == ["gate-1:s:1"]


def test_the_time_out_names_the_sessions_own_budget(engine: SessionEngine) -> None:
    event = session_pb2.SessionEvent(kind=session_pb2.SessionEvent.KIND_OPENED, session_id="s1", gate_id="gate-1")
    event.opened_at.FromNanoseconds(int(100 * 1e9))
    event.deadline.FromNanoseconds(int(101.5 * 1e9))  # the kiosk's budget, not the policy's default
    state = engine.open(event)
    update = engine.tick(state, now=101.6)
    assert update is not None and update.reasons[0].startswith("time-out after 1.5 s: 0 of 2 verified frames")


def test_a_stop_list_with_its_own_threshold_in_the_gallery_uses_it(engine: SessionEngine) -> None:
    strict, lenient = result(1, stop_hit=True), result(2, stop_hit=True)
    strict.faces[0].candidates[0].watchlist_thresholds["stop"] = 0.25  # the candidate at 0.3 is not a hit there
    lenient.faces[0].candidates[0].watchlist_thresholds["stop"] = 0.32
    state = opened(engine)
    assert engine.on_result(state, strict).outcome == session_pb2.SESSION_OUTCOME_UNSPECIFIED
    assert engine.on_result(state, lenient).outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert state.stop_list_hit == ("wanted", pytest.approx(0.3), "gate-1:s:2")


def test_frames_shown_after_the_liveness_window_cannot_be_accepted_on_its_verdict(
    engine: SessionEngine, clock: Clock
) -> None:
    """The verdict rests on frames 1-6 (say a live face too blurry to verify, had detection counted it); frames 7 and
    8 carry that verdict, good and verified (say a photo of the claimed person): they cannot accept on it."""
    state = opened(engine)
    blurry = [result(i, quality=10) for i in range(1, 6)] + [result(6, quality=10, liveness=LIVE)]
    photo = [result(seq, liveness=LIVE) for seq in (7, 8)]
    update = run(engine, state, blurry + photo)
    assert update.outcome == session_pb2.SESSION_OUTCOME_UNSPECIFIED and update.frames_verified == 2
    clock.now = 105.0
    timed_out = engine.tick(state, clock.now)
    assert timed_out is not None and timed_out.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert timed_out.reasons[0] == (
        "time-out after 5 s: 0 of 2 verified frames, liveness passed (2 more verified "
        "outside frames 1-6, which liveness assessed)"
    )


def test_good_verified_frames_inside_the_liveness_window_are_accepted(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(i, quality=10) for i in range(1, 5)] + [result(5), result(6, liveness=LIVE)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and update.reasons[0].startswith("2 good frames")


def test_an_impostor_then_a_photo_of_the_claimed_person_is_referred(engine: SessionEngine) -> None:
    """A live impostor's good frames are in the liveness window too, and fail verification: referred before the photo
    of the claimed person is shown."""
    state = opened(engine)
    impostor = [result(i, verified=False, distance=0.8) for i in range(1, 6)] + [
        result(6, verified=False, distance=0.8, liveness=LIVE)
    ]
    photo = [result(seq, liveness=LIVE) for seq in (7, 8, 9)]
    update = run(engine, state, impostor + photo)
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and update.frames_seen == 2
    assert "does not match the claim on 2 good frames" in update.reasons[0] and update.frames_verified == 0


def test_a_result_folded_after_the_deadline_does_not_accept(engine: SessionEngine, clock: Clock) -> None:
    state = opened(engine)
    run(engine, state, [result(i) for i in range(1, 6)])
    clock.now = 105.2  # the result that would accept arrives after the deadline (a slow pipeline, or a replay)
    update = engine.on_result(state, result(6, liveness=LIVE))
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER and update.frames_seen == 6
    assert update.reasons[0] == "time-out after 5 s: 6 of 2 verified frames, liveness passed"

    closing = opened(engine, "s2")
    run(engine, closing, live_session()[:5])
    late_close = engine.request_close(closing, at=105.1, frames_sent=5)  # a close past the deadline
    assert late_close.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert late_close.reasons[0].startswith("time-out after 5 s")


def test_a_failed_liveness_verdict_refers_even_on_a_low_quality_frame(engine: SessionEngine) -> None:
    state = opened(engine)
    update = run(engine, state, [result(1), result(2, quality=10, liveness=SPOOF)])
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert update.reasons[0].startswith("liveness failed")


def test_stop_list_hits_use_the_thresholds_cctv_uses(clock: Clock) -> None:
    strict = make_engine(clock, {"match_max_distance": 0.25})  # the candidate at 0.3 is no hit
    state = opened(strict)
    assert strict.on_result(state, result(1, stop_hit=True)).outcome == session_pb2.SESSION_OUTCOME_UNSPECIFIED
    assert state.stop_list_hit is None

    per_list = make_engine(clock, {"match_max_distance": 0.25, "watchlist_target_fmr": {"stop": 1e-4}})
    state = opened(per_list)
    update = per_list.on_result(state, result(1, stop_hit=True))
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER
    assert f"(distance 0.300 <= {distance_for_fmr(1e-4):.3f} (watchlist stop: target FMR" in update.reasons[0]


def test_a_state_saved_before_frame_sequences_were_kept_accepts_only_on_new_frames(engine: SessionEngine) -> None:
    state = opened(engine)
    run(engine, state, [result(1), result(2)])
    data = state.to_dict()
    data["verified"] = [list(v[:3]) for v in data["verified"]]  # the earlier JSON shape: no sequence, no window
    del data["liveness_window"]
    restored = SessionState.from_dict(data)
    assert restored.verified[0] == VerifiedFrame("gate-1:s:1", pytest.approx(1 - 0.35 / 1.2), 80.0, -1)
    assert engine.on_result(restored, result(3, liveness=LIVE)).outcome == session_pb2.SESSION_OUTCOME_UNSPECIFIED
    update = engine.on_result(restored, result(4, liveness=LIVE))
    assert update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT and update.frames_verified == 4
