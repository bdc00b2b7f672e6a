"""Evaluation metrics on synthetic score sets with known answers: FMR/FNMR, EER, TAR@FAR, the too-few rule, rank-1,
pair generation, the LFW pairs format and the calibration table builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sightline.tooling import evaluation as ev


def test_fmr_and_fnmr_count_at_or_under_the_threshold_as_a_match() -> None:
    genuine, impostor = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.3, 0.5, 0.6, 0.7])
    assert ev.fmr_at(impostor, 0.3) == 0.25  # the impostor at exactly 0.3 is a match
    assert ev.fnmr_at(genuine, 0.3) == 0.25  # only 0.4 is over
    assert ev.fmr_at(impostor, 0.29) == 0.0 and ev.fnmr_at(genuine, 0.45) == 0.0


def test_eer_where_the_curves_cross() -> None:
    eer = ev.equal_error_rate(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.6, 0.7]))
    assert eer.value == pytest.approx(0.25) and eer.threshold == pytest.approx(0.35)
    assert eer.note == ""


def test_eer_of_separable_scores_is_zero_and_says_what_that_means() -> None:
    eer = ev.equal_error_rate(np.array([0.1, 0.2]), np.array([0.8, 0.9, 1.0]))
    assert eer.value == 0.0 and 0.2 <= eer.threshold < 0.8
    assert "no error observed" in eer.note


def test_eer_without_impostors_is_not_estimated() -> None:
    eer = ev.equal_error_rate(np.array([0.1]), np.array([]))
    assert eer.value is None and eer.note == "no impostor pairs"


def test_tar_at_far_uses_the_largest_threshold_within_the_far() -> None:
    impostor = np.linspace(0.5, 1.5, 1000)
    genuine = np.array([0.4, 0.505, 0.52, 0.6])
    tar = ev.tar_at_far(genuine, impostor, 1e-2)
    assert tar.value == pytest.approx(0.5)
    assert ev.fmr_at(impostor, tar.threshold) == pytest.approx(0.01)  # exactly 10 impostors accepted, no more
    assert ev.fmr_at(impostor, np.nextafter(tar.threshold, 2.0)) > 0.01


def test_tar_at_far_with_ties_never_exceeds_the_far() -> None:
    impostor = np.array([0.5] * 50 + [1.0] * 950)
    tar = ev.tar_at_far(np.array([0.3, 0.5]), impostor, 1e-2)
    assert ev.fmr_at(impostor, tar.threshold) == 0.0 and tar.value == 0.5


def test_too_few_impostor_pairs_rule() -> None:
    assert ev.min_impostor_pairs(1e-3) == 3000 and ev.min_impostor_pairs(1e-2) == 300
    tar = ev.tar_at_far(np.array([0.3]), np.linspace(0.5, 1.5, 1000), 1e-3)
    assert tar.value is None
    assert tar.note == "too few impostor pairs to estimate TAR at FAR 0.001: need >= 3000, have 1000"
    assert ev.tar_at_far(np.array([0.3]), np.linspace(0.5, 1.5, 3000), 1e-3).value == 1.0


def acquired(identities: list[str], vectors: list[list[float]]) -> list[ev.Acquired]:
    pairs = enumerate(zip(identities, vectors, strict=True))
    return [ev.Acquired(i, who, np.array(v, dtype=np.float32), 0) for i, (who, v) in pairs]


def test_all_pairs_split_by_identity() -> None:
    items = acquired(["a", "a", "b", "c"], [[0, 0], [0, 0.3], [1, 0], [0, 2]])
    scores = ev.all_pairs_scores(items)
    assert sorted(scores.genuine) == pytest.approx([0.3])
    assert len(scores.impostor) == 5


def test_rank1_leave_one_out() -> None:
    # a's two samples are mutual nearest neighbours; b1's nearest is c (a distractor with one sample): a miss.
    items = acquired(["a", "a", "b", "b", "c"], [[0, 0], [0, 0.1], [5, 0], [7, 0], [5.5, 0]])
    rank1 = ev.rank1_rate(items)
    assert rank1.count == 4 and rank1.value == pytest.approx(0.5)  # a, a hit; b(5) -> c miss; b(7) -> c miss
    assert ev.rank1_rate(acquired(["a", "b"], [[0, 0], [1, 1]])).value is None


def test_listed_pairs_skip_samples_that_failed() -> None:
    items = acquired(["a", "a", "b"], [[0, 0], [0, 0.2], [1, 0]])
    scores = ev.listed_pairs_scores(items, [(0, 1, True), (0, 2, False), (0, 7, True)])
    assert list(scores.genuine) == pytest.approx([0.2]) and list(scores.impostor) == pytest.approx([1.0])
    assert scores.skipped_pairs == 1


def test_lfw_pairs_file(tmp_path: Path) -> None:
    (tmp_path / "Ann").mkdir()
    (tmp_path / "Ann" / "Ann_0002.png").write_bytes(b"x")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t2\nAnn\t1\t2\nAnn\t1\tBob\t3\nnonsense line\n")
    dataset = ev.load_dataset(pairs)
    assert dataset.kind == "pairs" and dataset.identities == 2
    assert [s.path.name for s in dataset.samples] == ["Ann_0001.jpg", "Ann_0002.png", "Bob_0003.jpg"]
    assert dataset.pairs == [(0, 1, True), (0, 2, False)]
    assert len(dataset.problems) == 1 and "nonsense" in dataset.problems[0]


def test_calibration_table_is_measured_then_modelled_and_monotonic() -> None:
    rng = np.random.default_rng(1)
    impostor, genuine = rng.normal(0.9, 0.1, 5000), rng.normal(0.35, 0.07, 200)
    table = ev.build_calibration_table(impostor, genuine, {"data": ["synthetic"]})
    rows = table["rows"]
    fmrs = [r["fmr"] for r in rows]
    assert fmrs == sorted(fmrs) and all(0 < f <= 1 for f in fmrs)
    assert {r["source"] for r in rows if r["impostor_matches"] < ev.MIN_MEASURED_MATCHES} == {"model"}
    measured = [r for r in rows if r["source"] == "measured"]
    assert all(r["fmr"] == pytest.approx(r["impostor_matches"] / 5000, rel=1e-3) for r in measured)
    assert table["tail_model"]["mean"] == pytest.approx(0.9, abs=0.05)
    assert table["provenance"]["impostor_pairs"] == 5000 and table["provenance"]["data"] == ["synthetic"]
    with pytest.raises(ValueError, match="too few impostor pairs"):
        ev.build_calibration_table(impostor[:50], genuine, {})
