"""Scores a user can reason about: similarity, the shipped calibration table, FMR lookups, thresholds by target FMR
in the decision policy and the matching settings."""

from __future__ import annotations

import base64
import json
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from sightline.common import scores
from sightline.decision.engine import DecisionEngine
from sightline.decision.policy import Policy

ROOT = Path(__file__).parents[2]


def test_similarity_is_unchanged() -> None:
    assert scores.similarity(0.0) == 1.0 and scores.similarity(scores.DEFAULT_MAX_DISTANCE) == 0.5
    assert scores.similarity(5.0) == 0.0
    assert scores.distance_for_similarity(0.5) == pytest.approx(0.6)


def test_shipped_table_is_package_data_with_provenance() -> None:
    assert scores.CALIBRATION_FILE.is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(scores.CALIBRATION_FILE.match(p) for p in package_data["sightline.common.models"])
    document = json.loads(scores.CALIBRATION_FILE.read_text())
    provenance = document["provenance"]
    for key in ("data", "impostor_pairs", "genuine_pairs", "created", "tool", "command", "lowest_measured_fmr"):
        assert provenance[key], key
    assert provenance["impostor_pairs"] >= 3000


def test_fmr_lookup_is_monotonic_and_flags_extrapolation() -> None:
    table = scores.calibration()
    distances = [0.1 + 0.01 * i for i in range(120)]
    values = [table.fmr(d) for d in distances]
    assert values == sorted(values)
    assert 1e-3 < scores.fmr(0.6) < 2e-2  # dlib's rule: about 0.5% of impostor pairs on the registry photos
    assert scores.fmr(0.3) < 1e-6 and scores.fmr_is_extrapolated(0.3)
    assert not scores.fmr_is_extrapolated(0.7)


@pytest.mark.parametrize("target", [1e-2, 1e-3, 1e-4, 1e-6])
def test_distance_for_fmr_inverts_fmr(target: float) -> None:
    distance = scores.distance_for_fmr(target)
    assert scores.fmr(distance) == pytest.approx(target, rel=1e-6)
    assert scores.fmr(distance + 0.01) > target


def test_distance_for_fmr_out_of_range() -> None:
    for bad in (0.0, 1.0, -1e-3):
        with pytest.raises(scores.CalibrationError, match=r"in \(0, 1\)"):
            scores.distance_for_fmr(bad)
    with pytest.raises(scores.CalibrationError, match="below the calibration table's range"):
        scores.distance_for_fmr(1e-30)


def test_a_user_table_is_used_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"rows": [{"distance": 0.4, "fmr": 1e-4}, {"distance": 0.6, "fmr": 1e-2}]}))
    monkeypatch.setenv("SIGHTLINE_CALIBRATION_FILE", str(path))
    scores._configured_file.cache_clear()  # a service reads its configuration once, at start
    assert scores.fmr(0.5) == pytest.approx(1e-3)  # log-linear halfway
    assert scores.distance_for_fmr(1e-3) == pytest.approx(0.5)
    path2 = tmp_path / "bad.json"
    path2.write_text(json.dumps({"rows": [{"distance": 0.4, "fmr": 1e-2}, {"distance": 0.6, "fmr": 1e-4}]}))
    with pytest.raises(scores.CalibrationError, match="non-decreasing"):
        scores.calibration(path2)
    monkeypatch.delenv("SIGHTLINE_CALIBRATION_FILE")
    scores._configured_file.cache_clear()


def test_policy_by_target_fmr_overrides_the_distance_and_reasons_quote_it() -> None:
    from test_decision_engine import match_result  # a sibling module: tests/unit is on sys.path

    policy = Policy(match_target_fmr=1e-3, match_max_distance=0.9)
    assert policy.match_max_distance == pytest.approx(scores.distance_for_fmr(1e-3))
    assert "target FMR 1.0e-03" in policy.describe_threshold()
    engine = DecisionEngine(policy.model_copy(update={"min_agreeing_frames": 1}))
    hit, _ = engine.decide(match_result(1, 1.0, distance=0.3))
    assert any("target FMR" in r and "FMR at this score" in r for r in hit[0].reasons)
    miss, _ = engine.decide(match_result(2, 2.0, distance=0.8))
    assert "FMR at this score" in miss[0].reasons[0]


@pytest.mark.parametrize("bad", [0.0, 1.0, 2.0, 1e-30])
def test_policy_rejects_an_impossible_target_fmr(bad: float) -> None:
    with pytest.raises(ValidationError):
        Policy(match_target_fmr=bad)


def test_matching_settings_by_target_fmr(monkeypatch: pytest.MonkeyPatch) -> None:
    from sightline.matching.settings import MatchingSettings

    monkeypatch.setenv("SIGHTLINE_MATCHING_TEMPLATE_KEY", base64.b64encode(bytes(32)).decode())
    monkeypatch.setenv("SIGHTLINE_MATCHING_MATCH_TARGET_FMR", "1e-4")
    settings = MatchingSettings()
    assert settings.match_max_distance == pytest.approx(scores.distance_for_fmr(1e-4))
    monkeypatch.setenv("SIGHTLINE_MATCHING_MATCH_TARGET_FMR", "5")
    with pytest.raises(ValidationError):
        MatchingSettings()
