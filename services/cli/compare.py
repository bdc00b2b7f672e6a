"""``sightline compare IMAGE_A IMAGE_B``: are these the same person? In-process, no services needed.

Compares the best face of each image (the largest; an image with several faces says which one was used). With
``--json`` prints ``{"distance": d, "similarity": s, "fmr": f, "same": bool, ...}``: ``fmr`` is the false match rate
at that distance from the calibration table, ``same`` applies the threshold (``--max-distance``, or the distance that
gives ``--target-fmr``; default dlib's 0.6). An image that cannot be read or has no face: a message naming it and
exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="compare the best face of two images (distance, similarity, FMR)")
    parser.add_argument("image_a", type=Path, metavar="IMAGE_A")
    parser.add_argument("image_b", type=Path, metavar="IMAGE_B")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--max-distance", type=float, help="same person at or under this distance (default 0.6)")
    limit.add_argument("--target-fmr", type=float, help="threshold from the calibration table, e.g. 1e-3")
    parser.add_argument(
        "--chips",
        choices=("auto", "always", "never"),
        default="auto",
        help="embed images directly as aligned chips: auto = those of exactly 150x150 (default)",
    )
    parser.add_argument("--models-dir", type=Path, help="converted models (default: SIGHTLINE_MODELS_DIR)")
    parser.set_defaults(func=cmd_compare)


def describe_face(path: Path, pipeline: Any, chips: str) -> tuple[Any, dict[str, Any]]:
    """The descriptor of the image's best face and what was done to get it; raises ``ValueError`` with a message."""
    from sightline.common.images import ImageError
    from sightline.tooling.evaluation import as_chip, best_face, is_chip, read_rgb

    try:
        rgb = read_rgb(path)
    except ImageError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if is_chip(rgb, chips):
        return pipeline.embedder.embed(as_chip(rgb)[None])[0], {"image": str(path), "faces": None, "used": "chip"}
    faces, descriptors = pipeline.run(rgb)
    if not faces:
        raise ValueError(f"{path}: no face found")
    j = best_face(faces)
    info = {
        "image": str(path),
        "faces": len(faces),
        "used": j,
        "box": [round(float(v), 1) for v in faces[j].box],
        "score": round(faces[j].score, 4),
    }
    if len(faces) > 1:
        info["note"] = f"{path}: {len(faces)} faces; compared the largest (face {j})"
    return descriptors[j], info


def _threshold(args: argparse.Namespace) -> float:
    from sightline.common import scores

    if args.target_fmr is not None:
        return scores.distance_for_fmr(args.target_fmr)
    return args.max_distance if args.max_distance is not None else scores.DEFAULT_MAX_DISTANCE


def cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np

    from sightline.cli.evaluate import load_pipeline
    from sightline.common import scores

    try:
        threshold = _threshold(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipeline = load_pipeline(args.models_dir)
    if pipeline is None:
        return 2
    described, errors = [], []
    for path in (args.image_a, args.image_b):
        try:
            described.append(describe_face(path, pipeline, args.chips))
        except ValueError as exc:
            errors.append(str(exc))
    for message in errors + [info["note"] for _, info in described if "note" in info]:
        print(message, file=sys.stderr)
    if errors:
        return 1
    (a, info_a), (b, info_b) = described
    distance = float(np.linalg.norm(a.astype(np.float64) - b))
    result = {
        "distance": round(distance, 4),
        "similarity": round(scores.similarity(distance), 4),
        "fmr": float(f"{scores.fmr(distance):.3g}"),
        "same": distance <= threshold,
        "threshold": round(threshold, 4),
        "fmr_extrapolated": scores.fmr_is_extrapolated(distance),
        "faces": [info_a, info_b],
    }
    print(json.dumps(result) if args.json else _text(result))
    return 0


def _text(result: dict[str, Any]) -> str:
    from sightline.common.scores import format_fmr

    verdict = "same person" if result["same"] else "different people"
    fmr = format_fmr(result["fmr"]) + (" (extrapolated)" if result["fmr_extrapolated"] else "")
    return (
        f"{verdict}: distance {result['distance']:.3f} (threshold {result['threshold']:.3f}), "
        f"similarity {result['similarity']:.3f}, FMR at this score {fmr}"
    )
