"""The decision engine's rules: agreement over frames (per track for CCTV faces), windows, quality gate, claims,
alerts (one per track and subject), cool-down, suppression, replays."""

from __future__ import annotations

from pathlib import Path

import pytest

from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import Policy, load_policy
from sightline.decision.review.store import ReviewStore
from sightline.v1 import events_pb2, types_pb2


def match_result(
    seq: int,
    t: float,
    subject: str = "alice",
    distance: float = 0.3,
    quality: float = 80.0,
    source: str = "cam",
    watchlists: tuple[str, ...] = ("wl",),
    claim: str = "",
    verified_distance: float | None = None,
    track: str = "",
) -> events_pb2.MatchResult:
    frame = types_pb2.FrameRef(frame_id=f"{source}:{seq}", source_id=source, sequence=seq, claim_subject_id=claim)
    frame.captured_at.FromNanoseconds(int(t * 1e9))
    result = events_pb2.MatchResult(frame=frame, model_name="m", model_version="1")
    face = result.faces.add(face_index=0, track_id=track)
    face.quality.score = quality
    if subject:
        face.candidates.add(subject_id=subject, distance=distance, similarity=1 - distance / 1.2, watchlists=watchlists)
    if claim:
        found = verified_distance is not None
        face.verification.CopyFrom(
            types_pb2.Verification(subject_id=claim, subject_found=found, distance=verified_distance or 0.0)
        )
    return result


def outcome_names(decisions: list[events_pb2.Decision]) -> list[str]:
    return [events_pb2.Outcome.Name(d.outcome) for d in decisions]


def test_pending_until_enough_frames_agree_then_match_with_one_alert() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=2, alert_cooldown_seconds=60))
    d1, a1 = engine.decide(match_result(1, 100.0))
    d2, a2 = engine.decide(match_result(2, 100.2))
    d3, a3 = engine.decide(match_result(3, 100.4))
    assert outcome_names(d1 + d2 + d3) == ["OUTCOME_PENDING", "OUTCOME_MATCH", "OUTCOME_MATCH"]
    assert a1 == [] and len(a2) == 1 and a3 == []
    assert a2[0].subject_id == "alice" and a2[0].status == events_pb2.ALERT_STATUS_PENDING_REVIEW
    assert d2[0].alert_id == a2[0].alert_id
    assert list(d2[0].evidence_frame_ids) == ["cam:1", "cam:2"]
    assert any("cool-down" in r for r in d3[0].reasons)


def test_frames_outside_the_window_do_not_agree() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=2, window_seconds=1.0))
    engine.decide(match_result(1, 100.0))
    decisions, _ = engine.decide(match_result(2, 102.0))
    assert outcome_names(decisions) == ["OUTCOME_PENDING"]


def test_a_replayed_frame_counts_once_and_keeps_its_decision_id() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=2))
    first, _ = engine.decide(match_result(1, 100.0))
    again, _ = engine.decide(match_result(1, 100.0))
    assert outcome_names(again) == ["OUTCOME_PENDING"]
    assert first[0].decision_id == again[0].decision_id


def test_distance_over_threshold_is_no_match_and_names_the_reason() -> None:
    engine = DecisionEngine(Policy(match_max_distance=0.5))
    decisions, alerts = engine.decide(match_result(1, 1.0, distance=0.55))
    assert outcome_names(decisions) == ["OUTCOME_NO_MATCH"] and alerts == []
    assert decisions[0].subject_id == ""
    assert "no candidate within distance 0.500 (best 0.550)" in decisions[0].reasons[0]


def test_empty_gallery_is_no_match() -> None:
    decisions, _ = DecisionEngine(Policy()).decide(match_result(1, 1.0, subject=""))
    assert outcome_names(decisions) == ["OUTCOME_NO_MATCH"]
    assert "no subject" in decisions[0].reasons[0]


def test_low_quality_gets_no_identity_decision() -> None:
    decisions, _ = DecisionEngine(Policy(min_quality=50)).decide(match_result(1, 1.0, quality=20))
    assert outcome_names(decisions) == ["OUTCOME_LOW_QUALITY"]
    assert decisions[0].subject_id == ""


def test_subject_on_no_alerting_watchlist_matches_without_alert() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1, alert_watchlists=("stoplist",)))
    decisions, alerts = engine.decide(match_result(1, 1.0, watchlists=("vip",)))
    assert outcome_names(decisions) == ["OUTCOME_MATCH"] and alerts == []


def test_claim_verification_decides_one_to_one() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1))
    ok, _ = engine.decide(match_result(1, 1.0, subject="", claim="bob", verified_distance=0.4))
    far, _ = engine.decide(match_result(2, 1.1, subject="", claim="bob", verified_distance=0.7))
    unknown, _ = engine.decide(match_result(3, 1.2, subject="", claim="carol", verified_distance=None))
    assert outcome_names(ok + far + unknown) == ["OUTCOME_MATCH", "OUTCOME_NO_MATCH", "OUTCOME_NO_MATCH"]
    assert ok[0].subject_id == "bob"
    assert "not enrolled" in unknown[0].reasons[0]


def test_sources_are_independent() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=2))
    engine.decide(match_result(1, 1.0, source="a"))
    decisions, _ = engine.decide(match_result(1, 1.1, source="b"))
    assert outcome_names(decisions) == ["OUTCOME_PENDING"]


def test_policy_file_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "policy.yaml"
    good.write_text("version: v7\nmin_agreeing_frames: 3\n")
    assert load_policy(good).min_agreeing_frames == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("min_agreeing_frame: 3\n")  # a typo must not be silently ignored
    with pytest.raises(ValueError, match="min_agreeing_frame"):
        load_policy(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_policy(tmp_path / "missing.yaml")


def test_example_policy_file_is_valid() -> None:
    policy = load_policy(Path(__file__).parents[2] / "examples" / "policy.yaml")
    assert policy.version == "example-1"


def test_watchlists_set_their_own_thresholds_by_target_fmr() -> None:
    from sightline.common.scores import distance_for_fmr

    policy = Policy(min_agreeing_frames=1, watchlist_target_fmr={"strict": 1e-4, "lenient": 1e-2})
    strict, lenient = distance_for_fmr(1e-4), distance_for_fmr(1e-2)
    between = (strict + lenient) / 2
    engine = DecisionEngine(policy)
    on_strict, _ = engine.decide(match_result(1, 1.0, distance=between, watchlists=("strict",)))
    on_lenient, _ = engine.decide(match_result(2, 1.1, distance=between, watchlists=("lenient",), source="b"))
    on_both, _ = engine.decide(match_result(3, 1.2, distance=between, watchlists=("strict", "lenient"), source="c"))
    assert outcome_names(on_strict + on_lenient + on_both) == ["OUTCOME_NO_MATCH", "OUTCOME_MATCH", "OUTCOME_MATCH"]
    assert "watchlist lenient: target FMR" in on_lenient[0].reasons[0]
    with pytest.raises(ValueError, match="watchlist_target_fmr"):
        Policy(watchlist_target_fmr={"x": 2.0})


def test_a_not_this_person_suppression_stops_alerts_for_that_subject_on_that_source() -> None:
    suppressions = {("cam", "alice")}
    engine = DecisionEngine(
        Policy(min_agreeing_frames=1), suppressed=lambda source, subject, track: (source, subject) in suppressions
    )
    decisions, alerts = engine.decide(match_result(1, 1.0))
    assert outcome_names(decisions) == ["OUTCOME_MATCH"] and alerts == []
    assert "alert suppressed" in decisions[0].reasons[-1]
    _, elsewhere = engine.decide(match_result(1, 1.0, source="other-cam"))
    assert len(elsewhere) == 1


def test_reasons_mark_a_false_match_rate_below_what_the_table_measured() -> None:
    decisions, _ = DecisionEngine(Policy(min_agreeing_frames=1)).decide(match_result(1, 1.0, distance=0.30))
    assert "(extrapolated)" in decisions[0].reasons[0]
    measured, _ = DecisionEngine(Policy(match_max_distance=0.7)).decide(match_result(1, 1.0, distance=0.65))
    assert "FMR at this score" in measured[0].reasons[0] and "(extrapolated)" not in measured[0].reasons[0]


def test_a_gate_frame_gets_its_decision_but_no_alert_and_leaves_no_cool_down() -> None:
    """A stop-list hit at a gate is alerted by its session (decision/echannel/engine.py); the per-frame decision
    names none."""
    engine = DecisionEngine(Policy(min_agreeing_frames=1, alert_cooldown_seconds=60))
    gate = match_result(1, 100.0, source="gate-1")
    gate.frame.purpose = types_pb2.PURPOSE_ECHANNEL
    decisions, alerts = engine.decide(gate)
    assert outcome_names(decisions) == ["OUTCOME_MATCH"] and alerts == [] and decisions[0].alert_id == ""
    assert decisions[0].subject_id == "alice" and not any("alert" in reason for reason in decisions[0].reasons)
    _, on_cctv = engine.decide(match_result(2, 101.0, source="gate-1"))  # the gate's frame set no cool-down
    assert len(on_cctv) == 1


# --- CCTV tracks -----------------------------------------------------------------------------------------------


def test_agreement_counts_the_searched_faces_of_one_track_not_other_tracks() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=2))
    first, _ = engine.decide(match_result(1, 100.0, track="cam/t1"))
    other, _ = engine.decide(match_result(2, 100.2, track="cam/t2"))  # someone else, also near alice
    second, _ = engine.decide(match_result(3, 100.4, track="cam/t1"))
    assert outcome_names(first + other + second) == ["OUTCOME_PENDING", "OUTCOME_PENDING", "OUTCOME_MATCH"]
    assert [d.track_id for d in first + other + second] == ["cam/t1", "cam/t2", "cam/t1"]
    assert list(second[0].evidence_frame_ids) == ["cam:1", "cam:3"]
    assert "2 searched face(s) of track cam/t1 agree" in second[0].reasons[1]


def test_one_alert_per_track_and_subject_whatever_the_cool_down() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1, alert_cooldown_seconds=0))
    alerts = [engine.decide(match_result(seq, 100.0 + seq, track="cam/t1"))[1] for seq in range(1, 4)]
    assert [len(a) for a in alerts] == [1, 0, 0]
    assert alerts[0][0].track_id == "cam/t1"
    decisions, _ = engine.decide(match_result(4, 104.0, track="cam/t1"))
    assert "alert already raised for track cam/t1" in decisions[0].reasons[-1]
    _, without_track = engine.decide(match_result(5, 105.0))  # no track: the cool-down alone rules, and it is 0
    assert len(without_track) == 1 and without_track[0].track_id == ""


def test_an_alert_of_another_track_within_the_cool_down_is_merged() -> None:
    engine = DecisionEngine(Policy(min_agreeing_frames=1, alert_cooldown_seconds=60))
    (_, (raised,)) = engine.decide(match_result(1, 100.0, track="cam/t1"))
    merged, none = engine.decide(match_result(2, 130.0, track="cam/t2"))
    assert none == [] and merged[0].outcome == events_pb2.OUTCOME_MATCH and merged[0].alert_id == ""
    assert f"alert merged into {raised.alert_id[:12]}" in merged[0].reasons[-1]
    _, again = engine.decide(match_result(3, 135.0, track="cam/t2"))
    assert again == []  # the track's alert is the one it was merged into
    _, later = engine.decide(match_result(4, 170.0, track="cam/t3"))  # after the cool-down, a new track alerts
    _, elsewhere = engine.decide(match_result(5, 131.0, track="lobby/t9", source="lobby"))
    assert len(later) == 1 and later[0].track_id == "cam/t3" and len(elsewhere) == 1


def test_not_this_person_on_a_tracks_alert_suppresses_that_subject_on_that_track_only(tmp_path: Path) -> None:
    with ReviewStore.open(f"sqlite:///{tmp_path / 'review.db'}", suppression_seconds=600) as reviews:
        engine = DecisionEngine(Policy(min_agreeing_frames=1, alert_cooldown_seconds=0), suppressed=reviews.suppressed)
        (_, (alert,)) = engine.decide(match_result(1, 100.0, track="cam/t1"))
        reviews.record_alert(alert)
        reviews.review(alert.alert_id, "alice", "REJECT", "lookalike", not_this_person=True)
        assert [f.track_id for f in reviews.feedback()] == ["cam/t1"]  # the alert's track, kept with the feedback

        restarted = DecisionEngine(engine.policy, suppressed=reviews.suppressed)  # in-memory state lost
        suppressed, none = restarted.decide(match_result(2, 101.0, track="cam/t1"))
        assert none == [] and "alert suppressed" in suppressed[0].reasons[-1] and "cam/t1" in suppressed[0].reasons[-1]
        _, other_track = restarted.decide(match_result(3, 102.0, track="cam/t2"))
        assert len(other_track) == 1 and other_track[0].track_id == "cam/t2"
