"""The policy's own 1:1 threshold decides claims, at gates and on single frames alike: matching's ``verified`` flag
follows matching's threshold, so the tests set distance and ``verified`` independently, each against the other."""

from __future__ import annotations

from test_decision_engine import match_result
from test_sessions import LIVE, make_engine, opened, result, run

from sightline.common.scores import distance_for_fmr
from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import Policy
from sightline.v1 import events_pb2, session_pb2

STRICT = {"match_target_fmr": 1e-4}  # the operator tightened the threshold to ~0.48
BETWEEN = 0.52  # within matching's default threshold (0.6), beyond the strict policy's


def gate_run(thresholds: dict[str, float], distance: float, verified: bool) -> session_pb2.SessionUpdate:
    engine = make_engine(thresholds=thresholds)
    frames = [result(i, distance=distance, verified=verified) for i in range(1, 6)]
    return run(engine, opened(engine), [*frames, result(6, liveness=LIVE, distance=distance, verified=verified)])


def test_a_gate_does_not_accept_a_distance_beyond_the_policys_threshold_that_matching_verified() -> None:
    assert distance_for_fmr(1e-4) < BETWEEN < 0.6
    update = gate_run(STRICT, BETWEEN, verified=True)
    assert update.outcome == session_pb2.SESSION_OUTCOME_REFER_TO_OFFICER, list(update.reasons)
    assert update.frames_verified == 0 and "does not match the claim on 2 good frames" in update.reasons[0]
    assert "target FMR" in update.reasons[0]  # the reason quotes the policy's threshold


def test_a_gate_accepts_a_distance_within_the_policys_threshold_that_matching_did_not_verify() -> None:
    lenient = {"match_max_distance": 0.7}  # the policy is looser than matching's own threshold
    update = gate_run(lenient, 0.65, verified=False)
    assert update.outcome == session_pb2.SESSION_OUTCOME_ACCEPT, list(update.reasons)
    assert update.frames_verified == 6


def test_a_single_frame_claim_follows_the_policy_not_matchings_flag() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1, **STRICT))
    claimed = match_result(1, 1.0, subject="", claim="bob", verified_distance=BETWEEN)
    claimed.faces[0].verification.verified = True  # matching's looser threshold passed it
    decisions, _ = engine.decide(claimed)
    assert decisions[0].outcome == events_pb2.OUTCOME_NO_MATCH and decisions[0].subject_id == ""
    assert "claim not verified: distance 0.520 >" in decisions[0].reasons[0]
    close = match_result(2, 1.1, subject="", claim="bob", verified_distance=0.4)  # verified left False
    decisions, _ = engine.decide(close)
    assert decisions[0].outcome == events_pb2.OUTCOME_MATCH and decisions[0].subject_id == "bob"
