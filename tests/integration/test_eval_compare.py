"""``sightline eval``, ``compare`` and ``calibrate`` on the registry photos (none is committed: they come from the
set-up step): a folder-per-identity dataset and an LFW-style pairs file built in a temp folder, bad files included."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from sightline.cli.main import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def identity_dataset(
    tmp_path_factory: pytest.TempPathFactory, dlib_johns: Path, face_photos: Path, dlib_example_faces: Path
) -> Path:
    root = tmp_path_factory.mktemp("identities")
    for person in sorted(p for p in dlib_johns.iterdir() if p.is_dir()):
        shutil.copytree(person, root / person.name)
    for name, files in {"obama": ("obama.jpg", "obama2.jpg", "obama3.jpg"), "biden": ("biden.jpg",)}.items():
        (root / name).mkdir()
        for f in files:
            shutil.copy(face_photos / f, root / name / f)
    (root / "broken").mkdir()
    (root / "broken" / "unreadable.jpg").write_bytes(b"this is not an image")
    shutil.copy(dlib_example_faces / "dogs.jpg", root / "broken" / "dogs.jpg")
    return root


@pytest.fixture(scope="module")
def folder_report(identity_dataset: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    out = tmp_path_factory.mktemp("report")
    code, stdout, stderr = run(
        "eval", str(identity_dataset), "--out", str(out), "--models-dir", str(models_dir), "--no-progress"
    )
    return code, stdout, stderr, out


def test_eval_on_identity_folders_reports_every_figure(folder_report: tuple) -> None:
    code, stdout, stderr, out = folder_report
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    acq = report["acquisition"]
    assert (acq["samples"], acq["failures"]) == (61, 2) and acq["fta_rate"] == pytest.approx(2 / 61)
    assert {f["reason"] for f in acq["failed_files"]} == {"undecodable_image", "no_face"}
    assert "unreadable.jpg: not a recognised image format" in stderr and "dogs.jpg: no face found" in stderr
    assert report["pairs"]["genuine"] == 5 * 55 + 3 and report["pairs"]["impostor"] > 1000
    assert report["distances"]["genuine"]["mean"] < report["distances"]["impostor"]["mean"]
    assert [t["distance"] for t in report["thresholds"]] == [0.4, 0.5, 0.6]
    at_06 = report["thresholds"][2]
    assert at_06["fmr"] < 0.01 and at_06["fnmr"] < 0.02 and 0 < at_06["calibrated_fmr"] < 0.02
    assert report["eer"]["value"] < 0.02
    far2, far3 = report["tar_at_far"]
    assert far2["far"] == 0.01 and far2["value"] > 0.95
    assert far3["value"] is None and "need >= 3000, have" in far3["note"]
    assert report["rank1"]["value"] > 0.95 and report["rank1"]["count"] == 58
    assert "TAR at FAR 0.001: n/a (too few impostor pairs" in stdout


def test_eval_writes_real_pngs_and_a_self_contained_html(folder_report: tuple) -> None:
    _, _, _, out = folder_report
    for name in ("det.png", "histogram.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert "dogs.jpg: no face found" in page


def test_eval_on_an_lfw_pairs_file(tmp_path: Path, dlib_johns: Path, face_photos: Path, models_dir: Path) -> None:
    images = {
        "Barack_Obama": [face_photos / f for f in ("obama.jpg", "obama2.jpg", "obama3.jpg")],
        "Joe_Biden": [face_photos / "biden.jpg"],
        "John_Simm": sorted((dlib_johns / "John_Simm").iterdir())[:2],
    }
    for name, files in images.items():
        (tmp_path / "lfw" / name).mkdir(parents=True)
        for n, f in enumerate(files, 1):
            shutil.copy(f, tmp_path / "lfw" / name / f"{name}_{n:04d}.jpg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        "1\t4\n"
        "Barack_Obama\t1\t2\n"
        "Barack_Obama\t2\t3\n"
        "John_Simm\t1\t2\n"
        "Barack_Obama\t1\t9\n"  # no such image: a failure to acquire, and a skipped pair
        "Barack_Obama\t1\tJoe_Biden\t1\n"
        "John_Simm\t1\tJoe_Biden\t1\n"
        "Barack_Obama\t3\tJohn_Simm\t2\n"
    )
    out = tmp_path / "out"
    code, stdout, stderr = run(
        "eval",
        str(pairs),
        "--images",
        str(tmp_path / "lfw"),
        "--out",
        str(out),
        "--models-dir",
        str(models_dir),
        "--no-progress",
    )
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["format"] == "pairs"
    assert report["pairs"] == {
        "genuine": 3,
        "impostor": 3,
        "listed": 7,
        "skipped_after_failure_to_acquire": 1,
        "impostor_subsampled_from": None,
    }
    assert report["acquisition"]["failures"] == 1 and "Barack_Obama_0009.jpg: cannot read the file" in stderr
    assert report["thresholds"][2]["fmr"] == 0.0 and report["thresholds"][2]["fnmr"] == 0.0
    assert report["tar_at_far"][0]["value"] is None  # 3 impostor pairs: far too few, and it says so
    assert (out / "det.png").read_bytes().startswith(PNG_SIGNATURE)


def test_eval_fails_only_when_nothing_could_be_evaluated(tmp_path: Path, models_dir: Path) -> None:
    (tmp_path / "data" / "someone").mkdir(parents=True)
    (tmp_path / "data" / "someone" / "a.jpg").write_bytes(b"")
    code, _, stderr = run(
        "eval", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--models-dir", str(models_dir), "--no-progress"
    )
    assert code == 1
    assert "a.jpg: the image is empty" in stderr and "nothing could be evaluated" in stderr
    assert run("eval", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))[0] == 2


def test_compare_same_and_different_people(face_photos: Path, models_dir: Path) -> None:
    code, stdout, _ = run(
        "compare",
        str(face_photos / "obama.jpg"),
        str(face_photos / "obama2.jpg"),
        "--json",
        "--models-dir",
        str(models_dir),
    )
    same = json.loads(stdout)
    assert code == 0 and same["same"] is True and same["distance"] < 0.5
    assert {"distance", "similarity", "fmr", "same"} <= same.keys() and 0 < same["fmr"] < 1e-3
    code, stdout, _ = run(
        "compare",
        str(face_photos / "obama.jpg"),
        str(face_photos / "biden.jpg"),
        "--json",
        "--models-dir",
        str(models_dir),
    )
    different = json.loads(stdout)
    assert code == 0 and different["same"] is False and different["fmr"] > 0.01


def test_compare_an_image_without_a_face(face_photos: Path, dlib_example_faces: Path, models_dir: Path) -> None:
    code, stdout, stderr = run(
        "compare",
        str(face_photos / "obama.jpg"),
        str(dlib_example_faces / "dogs.jpg"),
        "--json",
        "--models-dir",
        str(models_dir),
    )
    assert code == 1 and stdout == "" and "dogs.jpg: no face found" in stderr


def test_compare_a_group_photo_uses_its_largest_face(
    face_photos: Path, dlib_example_faces: Path, models_dir: Path
) -> None:
    code, stdout, stderr = run(
        "compare",
        str(dlib_example_faces / "bald_guys.jpg"),
        str(face_photos / "obama.jpg"),
        "--json",
        "--target-fmr",
        "1e-3",
        "--models-dir",
        str(models_dir),
    )
    result = json.loads(stdout)
    group = result["faces"][0]
    assert code == 0 and group["faces"] > 1 and result["same"] is False
    x1, y1, x2, y2 = group["box"]
    assert (x2 - x1) > 300  # the large portrait (about 316 px wide); every other face of the collage is under 260
    assert f"bald_guys.jpg: {group['faces']} faces; compared the largest (face {group['used']})" in stderr


def test_calibrate_regenerates_a_usable_table(identity_dataset: Path, models_dir: Path, tmp_path: Path) -> None:
    from sightline.common.scores import CalibrationTable

    out = tmp_path / "table.json"
    code, stdout, stderr = run(
        "calibrate", str(identity_dataset), "--out", str(out), "--models-dir", str(models_dir), "--no-progress"
    )
    assert code == 0, stderr
    table = CalibrationTable.load(out)
    assert 0 < table.fmr(0.6) < 0.05 and table.provenance["impostor_pairs"] > 1000
    assert "dogs.jpg: no face found" in stderr and "impostor" in stdout
