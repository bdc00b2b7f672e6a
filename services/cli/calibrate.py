"""``sightline calibrate DATASET --out FILE``: build the distance -> false-match-rate table from your own photos.

DATASET is a folder with one subfolder per identity (as for ``sightline eval``). ``--crowd DIR`` adds photos in which
every face is a different person (each face becomes an identity of its own: more impostor pairs for free).
``--registry-samples`` rebuilds the table shipped with Sightline from the sample photos of ``make samples``; the
recipe is in docs/accuracy.md. Point ``SIGHTLINE_CALIBRATION_FILE`` at the output to use it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from sightline.cli.evaluate import add_pipeline_arguments

# face_recognition's 32bit.png is obama2.jpg saved as RGBA: the same photo twice would be a fake genuine pair.
REGISTRY_FACE_RECOGNITION = {
    "obama": ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg"),
    "biden": ("biden.jpg",),
}
# dlib's examples/faces/bald_guys.jpg is a collage of four people (dlib's face clustering example). Its faces are
# labelled by hand, by a point inside each face box (pixels of the original image); other faces of examples/faces
# are each a distinct person.
BALD_GUYS_LABELS = (
    (853, 906, "bruce_willis"),
    (855, 1324, "bruce_willis"),
    (1191, 1145, "bruce_willis"),
    (127, 1066, "bruce_willis"),
    (451, 1342, "bruce_willis"),
    (1135, 848, "bruce_willis"),
    (955, 493, "jason_statham"),
    (501, 928, "jason_statham"),
    (132, 777, "jason_statham"),
    (405, 526, "jason_statham"),
    (955, 189, "jason_statham"),
    (1606, 259, "dwayne_johnson"),
    (1158, 1384, "dwayne_johnson"),
    (1869, 486, "dwayne_johnson"),
    (127, 1381, "vin_diesel"),
    (643, 524, "vin_diesel"),
    (142, 157, "vin_diesel"),
    (134, 455, "vin_diesel"),
    (622, 195, "vin_diesel"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", help="build a distance -> false match rate table from your photos")
    parser.add_argument(
        "dataset", nargs="?", type=Path, metavar="DATASET", help="folder with one subfolder per identity"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="calibration table (JSON) to write")
    parser.add_argument(
        "--crowd",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="photos whose faces are all different people (repeatable)",
    )
    parser.add_argument(
        "--registry-samples",
        action="store_true",
        help="use the sample photos of `make samples` (how the shipped table is made)",
    )
    add_pipeline_arguments(parser)
    parser.set_defaults(func=cmd_calibrate)


def registry_samples() -> tuple[list[Any], list[str]]:
    """The shipped table's data: dlib's johns, face_recognition's photos, dlib's examples/faces as crowds."""
    from sightline.common import paths
    from sightline.tooling.evaluation import Sample, load_identity_folders

    root = paths.samples_dir()
    johns = load_identity_folders(root / "dlib" / "johns").samples
    photos = [
        Sample(name, root / "face_recognition" / f) for name, files in REGISTRY_FACE_RECOGNITION.items() for f in files
    ]
    crowd_dir = root / "dlib" / "faces"
    crowds = [
        Sample(p.stem, p, crowd=True, face_labels=BALD_GUYS_LABELS if p.name == "bald_guys.jpg" else ())
        for p in sorted(crowd_dir.glob("*.jpg"))
    ]
    described = [
        f"dlib {_samples_source()} examples/johns: {len({s.identity for s in johns})} identities, {len(johns)} "
        "aligned 150x150 chips, embedded directly (no detection)",
        f"face_recognition 1.3.0 tests/test_images: obama x{len(REGISTRY_FACE_RECOGNITION['obama'])}, biden x1 "
        "(32bit.png left out: it is obama2.jpg as RGBA)",
        f"dlib examples/faces: {len(crowds)} photos, every detected face treated as a distinct identity (they are "
        "different people), except bald_guys.jpg, a collage of 4 people whose faces are labelled by hand",
    ]
    return johns + photos + crowds, described


def _samples_source() -> str:
    from sightline.tooling.samples import DLIB_SOURCE_VERSION

    return DLIB_SOURCE_VERSION


def user_samples(dataset: Path | None, crowds: list[Path]) -> tuple[list[Any], list[str]]:
    from sightline.tooling.evaluation import IMAGE_SUFFIXES, Sample, load_identity_folders

    samples, described = [], []
    if dataset is not None:
        samples = load_identity_folders(dataset).samples
        described.append(f"{dataset}: {len({s.identity for s in samples})} identities, {len(samples)} images")
    for folder in crowds:
        photos = [Sample(p.stem, p, crowd=True) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        samples += photos
        described.append(f"{folder}: {len(photos)} crowd photos, every face a distinct identity")
    return samples, described


def cmd_calibrate(args: argparse.Namespace) -> int:
    from sightline.cli.evaluate import load_pipeline, package_version
    from sightline.tooling.evaluation import DatasetError, acquire, all_pairs_scores, build_calibration_table

    if not (args.dataset or args.crowd or args.registry_samples):
        print("error: give DATASET, --crowd DIR or --registry-samples", file=sys.stderr)
        return 2
    try:
        samples, described = registry_samples() if args.registry_samples else user_samples(args.dataset, args.crowd)
    except (DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipeline = load_pipeline(args.models_dir)
    if pipeline is None:
        return 2
    acquisition = acquire(samples, pipeline, chips=args.chips, progress=not args.no_progress)
    for message in [f.message for f in acquisition.failures] + acquisition.notes:
        print(message, file=sys.stderr)
    scores = all_pairs_scores(acquisition.acquired)
    provenance = {
        "data": described,
        "identities": len({a.identity for a in acquisition.acquired}),
        "descriptors": len(acquisition.acquired),
        "failures_to_acquire": len(acquisition.failures),
        "created": dt.date.today().isoformat(),
        "tool": f"sightline {package_version()} (sightline calibrate)",
        "command": "sightline calibrate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["calibrate"] else "",
    }
    try:
        table = build_calibration_table(scores.impostor, scores.genuine, provenance)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    p = table["provenance"]
    print(
        f"{args.out}: {p['descriptors']} descriptors of {p['identities']} identities, {p['impostor_pairs']} "
        f"impostor and {p['genuine_pairs']} genuine pairs; FMR measured down to {p['lowest_measured_fmr']:.1g}, "
        "modelled below"
    )
    return 0
