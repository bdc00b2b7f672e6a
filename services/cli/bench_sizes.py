"""``sightline bench sizes``: how recognition degrades with face size, from real photos downscaled (issue #12).

Photos: dlib's examples/johns (5 people x 11 aligned 150x150 chips, each padded onto a mid-grey canvas three times
its size so that the detector sees a face in context) and face_recognition's obama, obama2, obama3 and biden. Every
photo is scaled as a whole (cv2.INTER_AREA; INTER_CUBIC where it enlarges: the johns faces are about 140 px, so
their 150 px row is a 1.07x enlargement) so that its face is N px wide, pasted face-centred into a mid-grey 1280x720
frame (so the detector meets the face at its true scale, as in a CCTV frame, not blown up to its 192 px input), and
run through the real pipeline: FaceAnalyzer with ``min_face_px`` = 0.8 N, then the FaceEmbedder, all on one thread.

Face width is the BlazeFace box width (the unit of ``min_face_px``), measured once on each photo at its own size;
the figures also give the detector's box and quality's ``inter_eye_px`` at each N, to tie face width to what the
quality gate measures. A face counts as detected when a detection's box centre falls inside the expected box.

The comparisons are the CCTV case: a probe at N px against a gallery of every photo at 150 px (the enrolment
photo; one gallery of all 59 photos, also for the per-source figures; 150 px is always measured). Genuine pairs: same
person, different photos; impostor pairs: different people; the same photo at N and at 150 px gives
``self_distance``, the drift that downscaling alone causes. FNMR and FMR are at the deployed 1:1 threshold
(matching's ``match_max_distance`` default); ``*_with_misses`` count a probe that was not detected as a non-match.
Rank-1: each probe against the gallery without its own photo, for probes whose person has another photo.

``recommendation``: the smallest face width from which every larger one keeps FNMR (with misses) within twice its
150 px value (at least 1 point above it, so that a zero at 150 px does not demand a zero) and rank-1 (with misses)
at 0.9 or more, over all photos pooled; with the median inter-eye distance there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

DEFAULT_SIZES = "32,40,48,64,96,150"
GALLERY_FACE_PX = 150  # the enrolment photo's face width: every probe is compared against the photos at this size
FRAME = (720, 1280)  # rows, columns of the grey frame a scaled photo is pasted into
GREY = 128
CHIP_CANVAS = 3  # a johns chip is padded onto a canvas this many times its size before scaling
MIN_FACE_RATIO = 0.8  # min_face_px passed to the detector, as a share of the face width under test
FACE_RECOGNITION_PEOPLE = {"obama.jpg": "obama", "obama2.jpg": "obama", "obama3.jpg": "obama", "biden.jpg": "biden"}
RANK1_MIN = 0.9  # recommendation rule
FNMR_FACTOR = 2.0
FNMR_FLOOR = 0.01  # FNMR allowance above the 150 px value is at least this (see the module docstring)


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sizes`` to ``sightline bench``'s kinds (called from bench.py's ``register``)."""
    parser = kinds.add_parser("sizes", help="genuine/impostor distances, FNMR/FMR and rank-1 by face width")
    parser.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        help=f"probe face widths in px, comma-separated; {GALLERY_FACE_PX} (the gallery's) is always added "
        f"(default {DEFAULT_SIZES})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on one line")
    parser.set_defaults(func=cmd_sizes)


@dataclass(frozen=True)
class Photo:
    """One source photo: who it shows, where from, the image the scaling starts from and its face there."""

    name: str
    source: str  # "johns" or "face_recognition"
    person: str
    image: np.ndarray  # RGB; a johns chip already padded onto its grey canvas
    box: np.ndarray  # x1, y1, x2, y2 of the face in ``image`` (BlazeFace box)

    @property
    def face_px(self) -> float:
        return float(self.box[2] - self.box[0])


@dataclass(frozen=True)
class Probe:
    """A photo at one face width through the pipeline: its descriptor (None if not detected) and measurements."""

    photo: Photo
    descriptor: np.ndarray | None
    box_px: float | None
    inter_eye_px: float | None


def threshold() -> float:
    """The deployed 1:1 threshold: matching's default ``match_max_distance`` (scores.DEFAULT_MAX_DISTANCE)."""
    from sightline.matching.settings import MatchingSettings

    return float(MatchingSettings.model_fields["match_max_distance"].default)


def load_photos(pipeline: Any) -> list[Photo]:
    """The johns chips (padded) and the four face_recognition photos, each with its face box at its own size."""
    from sightline.common.images import decode_image
    from sightline.common.paths import samples_dir

    johns = samples_dir() / "dlib" / "johns"
    portraits = samples_dir() / "face_recognition"
    people = sorted(p for p in johns.iterdir() if p.is_dir()) if johns.is_dir() else []
    missing = [name for name in FACE_RECOGNITION_PEOPLE if not (portraits / name).is_file()]
    if not people or missing:
        raise FileNotFoundError(f"sample photos missing in {samples_dir()} (run `make setup`)")
    found: list[tuple[str, str, str, np.ndarray]] = []
    for folder in people:
        for path in sorted(folder.glob("*.jpg")):
            chip = decode_image(path.read_bytes())
            h, w = chip.shape[:2]
            canvas = np.full((h * CHIP_CANVAS, w * CHIP_CANVAS, 3), GREY, np.uint8)
            canvas[h : 2 * h, w : 2 * w] = chip
            found.append((f"{folder.name}/{path.name}", "johns", folder.name, canvas))
    for name, who in FACE_RECOGNITION_PEOPLE.items():
        found.append((name, "face_recognition", who, decode_image((portraits / name).read_bytes())))
    photos = []
    for name, source, person, image in found:
        faces = pipeline.analyzer.analyze(image, 1)
        if not faces:
            raise RuntimeError(f"no face found in sample photo {name} at its own size")
        photos.append(Photo(name, source, person, image, faces[0].box.astype(np.float64)))
    return photos


def render(photo: Photo, face_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The photo scaled so its face is ``face_px`` wide, pasted face-centred into the grey frame (cropped where it
    overflows); and the face's expected box in the frame."""
    import cv2

    scale = face_px / photo.face_px
    h, w = photo.image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = cv2.resize(photo.image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    sx, sy = size[0] / w, size[1] / h
    box = photo.box * np.array([sx, sy, sx, sy])
    offset_x = round(FRAME[1] / 2 - (box[0] + box[2]) / 2)
    offset_y = round(FRAME[0] / 2 - (box[1] + box[3]) / 2)
    frame = np.full((*FRAME, 3), GREY, np.uint8)
    # Overlap of the scaled photo (placed at the offset) with the frame, in frame coordinates.
    x1, y1 = max(0, offset_x), max(0, offset_y)
    x2, y2 = min(FRAME[1], offset_x + size[0]), min(FRAME[0], offset_y + size[1])
    frame[y1:y2, x1:x2] = scaled[y1 - offset_y : y2 - offset_y, x1 - offset_x : x2 - offset_x]
    return frame, box + np.array([offset_x, offset_y, offset_x, offset_y])


def run_probe(pipeline: Any, photo: Photo, face_px: float) -> Probe:
    """The photo at ``face_px`` through detection (min_face_px = 0.8 face_px), landmarks, chip and embedding."""
    frame, expected = render(photo, face_px)
    faces = pipeline.analyzer.analyze(frame, 0, MIN_FACE_RATIO * face_px)
    for face in faces:  # best score first: the first whose centre lies in the expected box is the face
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        if expected[0] <= cx <= expected[2] and expected[1] <= cy <= expected[3]:
            descriptor = pipeline.embedder.embed(face.chip)[0]
            return Probe(photo, descriptor, float(face.box[2] - face.box[0]), float(face.quality.inter_eye_px))
    return Probe(photo, None, None, None)


def _spread(values: Sequence[float], mean: bool = True) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    out: dict[str, Any] = {"n": int(a.size)}
    if mean:
        out["mean"] = round(float(a.mean()), 4)
    out.update({f"p{q}": round(float(np.percentile(a, q)), 4) for q in (5, 50, 95)})
    return out


def _rate(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


def summarise(probes: Sequence[Probe], gallery: Sequence[Probe], limit: float) -> dict[str, Any]:
    """The figures of one face width over some probes, against the whole gallery (at GALLERY_FACE_PX)."""
    enrolled = [g for g in gallery if g.descriptor is not None]
    matrix = np.stack([g.descriptor for g in enrolled if g.descriptor is not None])
    genuine: list[float] = []
    impostor: list[float] = []
    own: list[float] = []
    genuine_total = hits = ranked = ranked_detected = 0
    for probe in probes:
        mates = sum(g.photo.person == probe.photo.person and g.photo is not probe.photo for g in enrolled)
        genuine_total += mates
        ranked += mates > 0
        if probe.descriptor is None:
            continue
        distances = np.linalg.norm(matrix - probe.descriptor, axis=1)
        best_other: tuple[float, str] | None = None
        for entry, distance in zip(enrolled, distances.tolist(), strict=True):
            if entry.photo is probe.photo:
                own.append(distance)
                continue
            (genuine if entry.photo.person == probe.photo.person else impostor).append(distance)
            if best_other is None or distance < best_other[0]:
                best_other = (distance, entry.photo.person)
        if mates:
            ranked_detected += 1
            hits += best_other is not None and best_other[1] == probe.photo.person
    detected = [p for p in probes if p.descriptor is not None]
    rejected = sum(d > limit for d in genuine)
    return {
        "probes": len(probes),
        "detected": len(detected),
        "detected_fraction": _rate(len(detected), len(probes)),
        "box_px": _spread([p.box_px for p in detected if p.box_px is not None], mean=False),
        "inter_eye_px": _spread([p.inter_eye_px for p in detected if p.inter_eye_px is not None]),
        "self_distance": _spread(own),
        "genuine": _spread(genuine),
        "impostor": _spread(impostor),
        "fnmr": _rate(rejected, len(genuine)),
        "fnmr_with_misses": _rate(rejected + genuine_total - len(genuine), genuine_total),
        "fmr": _rate(sum(d <= limit for d in impostor), len(impostor)),
        "rank1": {
            "probes": ranked,
            "detected_probes": ranked_detected,
            "rate": _rate(hits, ranked_detected),
            "rate_with_misses": _rate(hits, ranked),
        },
    }


def recommend(sizes: dict[str, Any], widths: Sequence[int]) -> dict[str, Any]:
    """The smallest face width from which every larger one meets the rule (module docstring), pooled figures."""
    rule = (
        f"smallest face width from which every larger one has FNMR with misses <= max({FNMR_FACTOR:g} x its "
        f"{GALLERY_FACE_PX} px value, that value + {FNMR_FLOOR:g}) and rank-1 with misses >= {RANK1_MIN:g} "
        "(all photos pooled)"
    )
    out: dict[str, Any] = {"rule": rule}
    reference = sizes.get(str(GALLERY_FACE_PX))
    if reference is None or reference["all"]["fnmr_with_misses"] is None:
        return {**out, "min_face_px": None, "why": f"no genuine pairs at {GALLERY_FACE_PX} px"}
    base = reference["all"]["fnmr_with_misses"]
    allowed = max(FNMR_FACTOR * base, base + FNMR_FLOOR)
    out["fnmr_allowed"] = round(allowed, 4)
    chosen: int | None = None
    for px in sorted(widths, reverse=True):
        pooled = sizes[str(px)]["all"]
        fnmr, rank1 = pooled["fnmr_with_misses"], pooled["rank1"]["rate_with_misses"]
        if fnmr is None or rank1 is None or fnmr > allowed or rank1 < RANK1_MIN:
            break
        chosen = px
    out["min_face_px"] = chosen
    if chosen is not None:
        eyes = sizes[str(chosen)]["all"]["inter_eye_px"]
        out["min_inter_eye_px"] = eyes.get("p50")
        out["inter_eye_px_p5"] = eyes.get("p5")
    return out


def bench_sizes(widths: Sequence[int], progress: bool) -> dict[str, Any]:
    """The figures of ``sightline bench sizes`` as one JSON-ready dict."""
    from tqdm import tqdm

    from sightline.cli.bench_detection import single_thread
    from sightline.common.models.pipeline import FacePipeline

    single_thread()
    widths = sorted({*widths, GALLERY_FACE_PX})  # the gallery's own size is the reference of the rule: always shown
    pipeline = FacePipeline(threads=1)
    photos = load_photos(pipeline)
    limit = threshold()
    runs = sorted(widths, reverse=True)
    probes: dict[int, list[Probe]] = {}
    with tqdm(
        total=len(runs) * len(photos), desc="bench sizes", unit="photo", file=sys.stderr, disable=not progress
    ) as bar:
        for px in runs:
            bar.set_postfix_str(f"{px} px")
            probes[px] = []
            for photo in photos:
                probes[px].append(run_probe(pipeline, photo, px))
                bar.update(1)
    gallery = probes[GALLERY_FACE_PX]
    sources = sorted({p.source for p in photos})
    sizes: dict[str, Any] = {}
    for px in sorted(widths):
        block = {"all": summarise(probes[px], gallery, limit)}
        for source in sources:
            block[source] = summarise([p for p in probes[px] if p.photo.source == source], gallery, limit)
        sizes[str(px)] = block
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "threads": 1,
        "face_widths_px": widths,
        "face_width": "BlazeFace box width (the unit of min_face_px), measured on each photo at its own size",
        "frame": {"width": FRAME[1], "height": FRAME[0], "fill": GREY},
        "min_face_px": f"{MIN_FACE_RATIO:g} x face width",
        "gallery_face_px": GALLERY_FACE_PX,
        "threshold": {"match_max_distance": limit, "from": "MatchingSettings.match_max_distance default"},
        "sources": {
            source: {
                "photos": sum(p.source == source for p in photos),
                "people": len({p.person for p in photos if p.source == source}),
                "own_face_px": _spread([p.face_px for p in photos if p.source == source], mean=False),
            }
            for source in sources
        },
        "sizes": sizes,
        "recommendation": recommend(sizes, widths),
    }


def cmd_sizes(args: argparse.Namespace) -> int:
    try:
        widths = sorted({int(v) for v in args.sizes.split(",") if v.strip()})
    except ValueError:
        widths = []
    if not widths or widths[0] < 8 or widths[-1] > 400:
        print("error: --sizes takes face widths from 8 to 400 px, comma-separated (e.g. 40,64,150)", file=sys.stderr)
        return 2
    try:
        result = bench_sizes(widths, progress=True)
    except FileNotFoundError as exc:  # models or sample photos not fetched
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
