"""``sightline faces IMAGE...``: detection, landmarks, chips and descriptors in-process, no services needed.

With ``--json`` prints one object per image per line:
``{"image": PATH, "faces": [{"box": [x1, y1, x2, y2], "score": S, "landmarks": [[x, y] x5], "embedding": [128],
"quality": {...}}]}``, coordinates in pixels of the original image with EXIF orientation applied. An image that
cannot be read gives ``{"image": PATH, "error": MESSAGE}``; the exit code is non-zero only when no image could be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("faces", help="detect, align and embed the faces of images, in-process")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--json", action="store_true", help="one JSON object per image per line")
    parser.add_argument("--models-dir", type=Path, help="converted models (default: SIGHTLINE_MODELS_DIR)")
    parser.add_argument("--save-chips", type=Path, help="write each aligned 150x150 chip as PNG into this folder")
    parser.set_defaults(func=cmd_faces)


def analyze_file(pipeline: Any, path: Path) -> dict[str, Any]:
    from sightline.common.images import ImageError, decode_image

    try:
        rgb = decode_image(path.read_bytes())
    except OSError as exc:
        return {"image": str(path), "error": f"cannot read file: {exc.strerror}"}
    except ImageError as exc:
        return {"image": str(path), "error": str(exc)}
    faces, descriptors = pipeline.run(rgb)
    return {
        "image": str(path),
        "width": rgb.shape[1],
        "height": rgb.shape[0],
        "faces": [
            {
                "box": [round(float(v), 2) for v in face.box],
                "score": round(face.score, 4),
                "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
                "embedding": [round(float(v), 6) for v in vector],
                "quality": face.quality.as_dict(),
            }
            for face, vector in zip(faces, descriptors, strict=True)
        ],
        "_chips": [face.chip for face in faces],
    }


def cmd_faces(args: argparse.Namespace) -> int:
    from sightline.common.models.pipeline import FacePipeline
    from sightline.common.models.registry import ModelsMissingError

    try:
        pipeline = FacePipeline(args.models_dir)
    except ModelsMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    readable = 0
    for path in args.images:
        result = analyze_file(pipeline, path)
        chips = result.pop("_chips", [])
        if args.save_chips and chips:
            _save_chips(args.save_chips, path, chips)
        readable += "error" not in result
        print(json.dumps(result) if args.json else _summary(result), flush=True)
    return 0 if readable else 1


def _summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['image']}: error: {result['error']}"
    lines = [f"{result['image']}: {len(result['faces'])} face(s) in {result['width']}x{result['height']}"]
    for i, face in enumerate(result["faces"]):
        x1, y1, x2, y2 = face["box"]
        lines.append(
            f"  face {i}: box ({x1:.0f},{y1:.0f})-({x2:.0f},{y2:.0f}) score {face['score']:.2f} "
            f"quality {face['quality']['score']:.0f}"
        )
    return "\n".join(lines)


def _save_chips(folder: Path, image: Path, chips: list[Any]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, chip in enumerate(chips):
        Image.fromarray(chip).save(folder / f"{image.stem}_face{i}.png")
