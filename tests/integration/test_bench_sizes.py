"""``sightline bench sizes`` end to end on two face widths: real photos downscaled, real models, one JSON object."""

from __future__ import annotations

import json
import time

import pytest

from sightline.cli.main import main
from sightline.common.scores import DEFAULT_MAX_DISTANCE


@pytest.mark.slow
def test_bench_sizes_prints_the_table_and_recognises_full_size_faces(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    assert main(["bench", "sizes", "--json", "--sizes", "40,150"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert time.monotonic() - start < 60

    assert result["face_widths_px"] == [40, 150]
    assert result["threads"] == 1
    assert result["threshold"]["match_max_distance"] == DEFAULT_MAX_DISTANCE
    assert result["sources"]["johns"]["photos"] == 55 and result["sources"]["johns"]["people"] == 5
    assert result["sources"]["face_recognition"]["photos"] == 4 and result["sources"]["face_recognition"]["people"] == 2
    assert set(result["sizes"]) == {"40", "150"}
    for block in result["sizes"].values():
        assert set(block) == {"all", "johns", "face_recognition"}
        pooled = block["all"]
        assert pooled["probes"] == 59
        assert 0.0 <= pooled["detected_fraction"] <= 1.0
        for rate in ("fnmr", "fnmr_with_misses", "fmr"):
            assert 0.0 <= pooled[rate] <= 1.0
        assert pooled["fnmr_with_misses"] >= pooled["fnmr"]
        assert pooled["genuine"]["p5"] <= pooled["genuine"]["p50"] <= pooled["genuine"]["p95"]

    full, small = result["sizes"]["150"], result["sizes"]["40"]
    johns = full["johns"]
    assert johns["detected_fraction"] == 1.0
    assert johns["rank1"]["probes"] == 55 and johns["rank1"]["rate_with_misses"] >= 0.9
    assert johns["genuine"]["p50"] < johns["impostor"]["p50"]
    assert full["all"]["genuine"]["p50"] < full["all"]["impostor"]["p50"]
    assert full["all"]["self_distance"]["p95"] == 0.0  # the gallery is the photos at 150 px: a probe there is itself
    # Face width is the detector's box: at 150 px the box it finds again is within a fifth of that.
    assert 120 <= full["all"]["box_px"]["p50"] <= 180
    # Downscaling moves a face away from its own full-size descriptor and shrinks the eyes it is measured by.
    assert small["all"]["self_distance"]["p50"] > 0.05
    assert small["all"]["inter_eye_px"]["p50"] < full["all"]["inter_eye_px"]["p50"] / 2

    recommendation = result["recommendation"]
    assert "rank-1" in recommendation["rule"]
    assert recommendation["min_face_px"] in (None, 40, 150)
