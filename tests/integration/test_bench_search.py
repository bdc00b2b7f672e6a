"""``sightline bench search`` end to end at 20,000 templates: the real fitted descriptor model, both indexes, one JSON
object. Run as a separate process: the command sets faiss and OpenBLAS to one thread for the whole process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_search_prints_sane_figures(face_photos: Path, dlib_johns: Path, dlib_example_faces: Path) -> None:
    command = [sys.executable, "-m", "sightline.cli.main", "bench", "search", "--gallery", "20000", "--probes", "300"]
    run = subprocess.run([*command, "--exact-probes", "50", "--json"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert "[bench search]" in run.stderr  # progress goes to stderr, the JSON alone to stdout

    assert result["gallery"] == result["subjects"] == 20_000 and result["threads"] == 1
    assert result["probes"] == {"mated": 300, "non_mated": 300}
    assert {"ann", "exact", "watchlists", "replica", "goal", "planned_10m", "distribution"} <= set(result)
    # The synthetic distances follow the real ones (medians are fitted; the 1e-3 points are not, yet agree).
    fit = result["distribution"]
    assert fit["genuine"]["model"]["p50"] == pytest.approx(fit["genuine"]["real"]["p50"], abs=0.01)
    assert fit["impostor"]["model"]["p50"] == pytest.approx(fit["impostor"]["real"]["p50"], abs=0.01)
    thresholds = result["threshold_fmr_1e-3"]
    assert thresholds["model"] == pytest.approx(thresholds["calibrated"], abs=0.05)

    ann, exact = result["ann"], result["exact"]
    assert ann["lists"] == 512 and ann["trained_on"] == 20_000
    assert ann["recall_at_1_mated"] >= 0.97
    assert 0 <= ann["recall_at_1_non_mated"] <= 1 and 0 <= ann["top_k_agreement_mated"] <= 1
    assert ann["mated_hit_rate"] >= 0.9 and exact["mated_hit_rate"] >= 0.9
    # Exact re-ranking: the ANN index can miss an impostor, never invent one.
    assert 0 <= ann["false_candidate_rate"] <= exact["false_candidate_rate"] <= 1
    for block in (ann, exact):
        assert 0 < block["single_probe_p50_ms"] <= block["single_probe_p99_ms"]
        assert block["batched_ms_per_probe"] > 0 and block["build_s"] > 0
        assert 300 < block["nbytes_per_template"] < 2048
        assert block["enrol_to_searchable"]["found_right_after_add"] == 1.0
        assert block["enrol_to_searchable"]["removed_returned"] == 0
    assert ann["load_round_trip_ok"] and ann["dump_bytes_per_template"] > 512
    for name, share in (("wide", 0.10), ("narrow", 0.005)):
        block = result["watchlists"][name]
        assert block["subjects"] == pytest.approx(share * 20_000, rel=0.2)
        assert block["ann"]["recall_at_1"] >= 0.95
    assert result["watchlists"]["narrow"]["ann"]["recall_at_1"] == 1.0  # exact over the few allowed rows

    planned = result["planned_10m"]
    assert planned["templates"] == 10_000_000 and planned["shards"] >= 1
    assert planned["total_gib"] == pytest.approx(planned["bytes_per_template"] * 1e7 / 2**30, rel=0.01)
    assert set(result["goal"]["met"]) == {
        "recall_at_1",
        "single_probe_p99",
        "bytes_per_template",
        "ready_from_snapshot",
        "enrol_to_searchable",
    }

    # A replica started from the encrypted snapshot holds the whole index and follows another replica's writes.
    replica = result["replica"]
    assert replica["started_from_snapshot"] and replica["templates"] == 20_000
    assert 300 < replica["snapshot_bytes_per_template"] < 2048
    assert 0 < replica["ready_from_snapshot_s"]["wall"] and 0 < replica["ready_from_snapshot_s"]["cpu"]
    for follow in (replica["enrol_to_searchable"], replica["removal_to_gone"]):
        assert follow["never"] == 0 and 0 < follow["p50_ms"] <= follow["p99_ms"] <= follow["max_ms"]
