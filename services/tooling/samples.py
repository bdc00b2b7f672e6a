"""Fetch the sample face photos used by tests, demos and benchmarks, from package registries only.

Run as ``python -m sightline.tooling.samples [--dest DIR]`` (default :func:`sightline.common.paths.samples_dir`).

- ``<dest>/face_recognition/``: the test photos of the ``face_recognition==1.3.0`` sdist (PyPI): obama.jpg,
  obama2.jpg, obama3.jpg, obama_partial_face.jpg, obama_partial_face2.jpg, 32bit.png (RGBA) and biden.jpg.
- ``<dest>/dlib/johns/`` and ``<dest>/dlib/faces/``: ``examples/johns`` (aligned 150x150 chips of 5 people) and
  ``examples/faces`` (photos with face boxes in testing.xml / training.xml) from Debian's ``dlib`` source package.

The Debian source is fetched with ``apt-get source`` against a private sources list, lists directory and cache, so the
machine's own apt configuration and state are left untouched. Archives are checked against recorded sha256 values.
Each part is skipped when its files are already in place.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from sightline.common.models.convert.fetch import (
    FetchError,
    pip_download,
    run_install_step,
    sha256_file,
    step,
    verify_download,
)
from sightline.common.paths import samples_dir

log = logging.getLogger(__name__)

FACE_RECOGNITION_PACKAGE = ("face_recognition", "1.3.0")
FACE_RECOGNITION_SDIST = "face_recognition-1.3.0.tar.gz"
FACE_RECOGNITION_SDIST_SHA256 = "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec"
FACE_RECOGNITION_PHOTOS = (
    "32bit.png",
    "biden.jpg",
    "obama.jpg",
    "obama2.jpg",
    "obama3.jpg",
    "obama_partial_face.jpg",
    "obama_partial_face2.jpg",
)

DLIB_SOURCE = "dlib"
DLIB_SOURCE_VERSION = "19.24+dfsg-1"
DLIB_ORIG_TARBALL = "dlib_19.24+dfsg.orig.tar.bz2"
DLIB_ORIG_SHA256 = "66b4263822a2ff91a3e769e501c7d7927a13089e178c1427ec19cb0475823cf6"
APT_HELPER = Path("/usr/lib/apt/apt-helper")
DLIB_PARTS = {"examples/johns/": "johns", "examples/faces/": "faces"}
DEBIAN_SUITE = "bookworm"

COMPLETE_MARKER = ".complete.json"
CACHE_DIR = ".cache"


# -- completion markers ----------------------------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    """True when a previous run finished this folder and every file it listed is still there."""
    try:
        files = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / name).is_file() for name in files)


def _mark_complete(folder: Path, source: str) -> list[str]:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"source": source, "files": files}, indent=1) + "\n")
    return files


# -- face_recognition photos -----------------------------------------------------------------------------------------


def fetch_face_recognition_photos(dest: Path, cache: Path) -> Path:
    """The photos from face_recognition's test suite, into ``dest/face_recognition``."""
    out = dest / "face_recognition"
    if _is_complete(out):
        step(f"{out}: present")
        return out
    pkg, ver = FACE_RECOGNITION_PACKAGE
    sdist = pip_download(
        pkg, ver, cache, sdist=True, expected_name=FACE_RECOGNITION_SDIST, expected_sha256=FACE_RECOGNITION_SDIST_SHA256
    )
    step(f"{out}: extracting tests/test_images/")
    _extract_tree(sdist, {"tests/test_images/": out})
    missing = [n for n in FACE_RECOGNITION_PHOTOS if not (out / n).is_file()]
    if missing:
        raise FetchError(f"{sdist.name} lacks the expected photos {missing}")
    _mark_complete(out, f"{pkg}=={ver} sdist, tests/test_images/")
    return out


# -- dlib examples from Debian ---------------------------------------------------------------------------------------


def _deb_uri_for_main(suite: str = DEBIAN_SUITE) -> tuple[str, str | None]:
    """The URI (and signing keyring) of the machine's ``deb`` source for ``<suite> main``.

    Reads both the one-line format (sources.list, *.list) and the deb822 format (*.sources). We copy the machine's
    own mirror so that a site with a local mirror or proxy keeps using it.
    """
    etc = Path("/etc/apt")
    candidates = [
        etc / "sources.list",
        *sorted((etc / "sources.list.d").glob("*.list")),
        *sorted((etc / "sources.list.d").glob("*.sources")),
    ]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        found = _parse_deb822(text, suite) if path.suffix == ".sources" else _parse_one_line(text, suite)
        if found:
            return found
    raise FetchError(
        f"no `deb` line for `{suite} main` in /etc/apt/sources.list or /etc/apt/sources.list.d/: "
        "add the Debian mirror there (or fetch the dlib source package by hand)"
    )


def _parse_one_line(text: str, suite: str) -> tuple[str, str | None] | None:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)\s+(?P<comps>.+)$", line)
        if match and match["suite"] == suite and "main" in match["comps"].split():
            signed = re.search(r"signed-by=(\S+)", match["opts"] or "")
            return match["uri"], signed[1] if signed else None
    return None


def _parse_deb822(text: str, suite: str) -> tuple[str, str | None] | None:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if (
            "deb" in fields.get("types", "").split()
            and suite in fields.get("suites", "").split()
            and "main" in fields.get("components", "").split()
            and fields.get("uris")
        ):
            return fields["uris"].split()[0], fields.get("signed-by")
    return None


def _apt_options(apt_root: Path) -> list[str]:
    """apt options that point every piece of state at ``apt_root`` and nothing at the system configuration."""
    return [
        "-o",
        f"Dir::Etc::SourceList={apt_root / 'sources.list'}",
        "-o",
        "Dir::Etc::SourceParts=/nonexistent",
        "-o",
        f"Dir::State::Lists={apt_root / 'lists'}",
        "-o",
        f"Dir::Cache={apt_root / 'cache'}",
        # Files land in a root-owned private folder that the _apt sandbox user cannot write to.
        "-o",
        "APT::Sandbox::User=root",
        "-q",
    ]


def _run_apt(args: list[str], cwd: Path, what: str) -> str:
    proc = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise FetchError(
            f"{what} failed (exit {proc.returncode}):\n{proc.stdout.strip()}\n"
            "apt-get needs root and a reachable Debian mirror; fix that and run the same command again."
        )
    return proc.stdout


def download_dlib_source(cache: Path) -> Path:
    """Download the orig tarball of Debian's dlib source package into ``cache/apt``; returns it, verified.

    ``apt-get source --download-only`` would also fetch the 200 MB ``orig-dlib-models`` component, which we do not
    need, so we ask apt for the source package's URIs and hashes and let apt's own downloader fetch just the 8.6 MB
    tarball (checking apt's signed hash on the way). Without apt-helper we fall back to the full download.
    """
    apt_root = cache / "apt"
    tarball = apt_root / DLIB_ORIG_TARBALL
    if tarball.is_file() and sha256_file(tarball) == DLIB_ORIG_SHA256:
        step(f"using cached {DLIB_ORIG_TARBALL}")
        return tarball
    if shutil.which("apt-get") is None:
        raise FetchError("apt-get not found: the dlib examples come from Debian's dlib source package")
    uri, signed_by = _deb_uri_for_main()
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt_root / sub).mkdir(parents=True, exist_ok=True)
    opts = f"[signed-by={signed_by}] " if signed_by else ""
    (apt_root / "sources.list").write_text(f"deb-src {opts}{uri} {DEBIAN_SUITE} main\n")
    apt = ["apt-get", *_apt_options(apt_root)]
    step(f"apt-get update (private source list: deb-src {uri} {DEBIAN_SUITE} main)")
    _run_apt([*apt, "update"], apt_root, "apt-get update")
    wanted = f"{DLIB_SOURCE}={DLIB_SOURCE_VERSION}"
    if APT_HELPER.is_file():
        step(f"apt-get source --print-uris {wanted}; apt-helper download-file {DLIB_ORIG_TARBALL}")
        listing = _run_apt([*apt, "source", "--print-uris", wanted], apt_root, "apt-get source --print-uris")
        found = re.search(rf"^'(\S+)' {re.escape(DLIB_ORIG_TARBALL)} \d+ (SHA256:[0-9a-f]{{64}})", listing, re.M)
        if not found:
            raise FetchError(f"apt-get source --print-uris {wanted} does not list {DLIB_ORIG_TARBALL}:\n{listing}")
        _run_apt(
            [str(APT_HELPER), *_apt_options(apt_root), "download-file", found[1], str(tarball), found[2]],
            apt_root,
            f"apt-helper download-file {found[1]}",
        )
    else:
        step(f"apt-get source --download-only {wanted}")
        _run_apt([*apt, "source", "--download-only", wanted], apt_root, "apt-get source")
    if not tarball.is_file():
        raise FetchError(f"apt did not produce {DLIB_ORIG_TARBALL} in {apt_root}")
    return verify_download(tarball, DLIB_ORIG_SHA256)


def fetch_dlib_examples(dest: Path, cache: Path) -> Path:
    """dlib's ``examples/johns`` and ``examples/faces`` into ``dest/dlib/johns`` and ``dest/dlib/faces``."""
    out = dest / "dlib"
    targets = {prefix: out / name for prefix, name in DLIB_PARTS.items()}
    if all(_is_complete(folder) for folder in targets.values()):
        step(f"{out}: present")
        return out
    tarball = download_dlib_source(cache)
    step(f"{out}: extracting {', '.join(DLIB_PARTS)}")
    _extract_tree(tarball, targets)
    for prefix, folder in targets.items():
        files = _mark_complete(folder, f"Debian source {DLIB_SOURCE} {DLIB_SOURCE_VERSION}, {prefix}")
        if not files:
            raise FetchError(f"{DLIB_ORIG_TARBALL} has no {prefix}")
    return out


# -- shared ----------------------------------------------------------------------------------------------------------


def _extract_tree(archive: Path, targets: dict[str, Path]) -> None:
    """Extract the files under each ``prefix`` (after the archive's top folder) to ``targets[prefix]``.

    Members are read and written one by one instead of ``extractall`` so that nothing outside the wanted folders, no
    links and no absolute or ``..`` paths can be written.
    """
    for folder in targets.values():
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    with tarfile.open(archive) as tf:
        for info in tf:
            if not info.isfile():
                continue
            inner = info.name.split("/", 1)[1] if "/" in info.name else info.name
            for prefix, folder in targets.items():
                if not inner.startswith(prefix):
                    continue
                rel = Path(inner[len(prefix) :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise FetchError(f"unsafe path {info.name!r} in {archive.name}")
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(info)
                assert src is not None
                with src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)


def fetch_samples(dest: Path | None = None) -> Path:
    """Fetch every sample set into ``dest`` (default :func:`samples_dir`); returns ``dest``."""
    dest = (dest or samples_dir()).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    cache = dest / CACHE_DIR
    fetch_face_recognition_photos(dest, cache)
    fetch_dlib_examples(dest, cache)
    shutil.rmtree(cache, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sightline.tooling.samples", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=None, help=f"default: {samples_dir()}")
    args = parser.parse_args(argv)
    dest = (args.dest or samples_dir()).expanduser()
    return run_install_step(
        f"sample photos into {dest}", lambda: fetch_samples(dest), f"-m sightline.tooling.samples --dest {dest}"
    )


if __name__ == "__main__":
    sys.exit(main())
