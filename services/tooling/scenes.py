"""Synthetic CCTV-like frames with faces of known size and position, for ``sightline bench detection`` (issue #12).

What it makes: 1920x1080 or 3840x2160 RGB frames, each with a face-free background and (unless asked for a face-free
frame) several faces pasted at random, non-overlapping places, every face scaled so that its face box is exactly the
asked width (32 to 128 px). The ground truth is the scaled face box, in the same dlib convention (a square from the
eyebrows to the chin) as the annotated boxes the faces were cut from.

Faces come from the sample photos (:mod:`sightline.tooling.samples`): the annotated faces of dlib's examples/faces
(training.xml and testing.xml) and the face_recognition photos of Obama and Biden, whose boxes are recorded below.
Each face is cut with its head and shoulders (a margin around the box, trimmed so that no other annotated face comes
with it), optionally mirrored and re-lit, resized and blended in with a soft edge so the paste leaves no hard border.

Backgrounds, all face-free, three kinds: ``street`` (procedural: sky/ground gradients, noise, buildings, windows,
poles and road lines), ``texture`` (multi-scale noise with strong edges, like foliage or a crowd-free plaza) and
``photo`` (a tiling of enlarged, blurred crops of the dlib photos taken only from regions that keep clear of every
annotated face: above, under, left of or right of all of them).

Why this is a fair stand-in: the faces are real photographs of real faces, at the sizes CCTV gives, in clutter with
edges and textures that trigger false detections; sizes and positions are known exactly, so recall by size is
measured rather than guessed, and the same seed gives the same frames to every detector. Its limits: the faces are
pasted (their lighting, blur and noise do not match the scene; small faces are real downscales, while 96-128 px faces
from the small dlib boxes are upscales and softer than a real camera's), there are no occlusions, crowds, motion blur
or compression of a real CCTV stream, and the poses are those of the sample photos (mostly frontal). Real footage
is the final check; this is the repeatable one.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from sightline.common.paths import samples_dir

FRAME_SIZES = {"1080p": (1920, 1080), "4k": (3840, 2160)}
FACE_WIDTHS = (32, 40, 48, 64, 96, 128)
BACKGROUNDS = ("street", "texture", "photo")
DLIB_ANNOTATIONS = ("training.xml", "testing.xml")

# Face boxes (left, top, width, height) of the face_recognition photos, which come without annotations: dlib's HOG
# detector with one upsampling (dlib 20.0.1), the detector whose square boxes dlib's examples/faces annotations follow.
# Recorded rather than detected at run time so that no detector under test decides the ground truth.
FACE_RECOGNITION_BOXES: dict[str, tuple[int, int, int, int]] = {
    "obama.jpg": (349, 142, 269, 268),
    "obama2.jpg": (171, 290, 268, 269),
    "obama3.jpg": (633, 277, 322, 322),
    "biden.jpg": (419, 241, 322, 322),
}

# Faces the dlib annotations leave out (people at the photo's edge, figurines, a framed photo), found by eye:
# background regions that reach into these are dropped, and face crops are kept clear of them.
UNANNOTATED_FACES: dict[str, list[tuple[int, int, int, int]]] = {
    "2007_007763.jpg": [(0, 240, 60, 310)],
    "2008_001009.jpg": [(280, 60, 340, 140)],
    "2008_002079.jpg": [(0, 0, 500, 110)],
    "2008_004176.jpg": [(30, 0, 450, 45)],
    "2008_007676.jpg": [(430, 60, 500, 200)],
}

# Context cut around a face box, in box widths/heights: head and shoulders, as a person seen by a camera.
CONTEXT_SIDE = 0.6
CONTEXT_ABOVE = 0.7
CONTEXT_BELOW = 1.2
# The least context kept when a neighbouring face forces the cut tighter; below it the face is not used.
CONTEXT_MIN = 0.2
# Clearance (in box widths) kept between a background region and any annotated face.
BACKGROUND_CLEARANCE = 0.5
MIN_BACKGROUND_REGION = 48  # px, each side: smaller strips are too small to enlarge into tiles
FACES_PER_FRAME = 8
PLACEMENT_TRIES = 400

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


@dataclass(frozen=True)
class SourceFace:
    """One annotated face: the photo it is in, its box and the context crop around it (x1, y1, x2, y2)."""

    photo: str
    box: Box
    crop: tuple[int, int, int, int]


@dataclass
class Scene:
    """One frame and its truth. ``faces`` are the pasted face boxes; ``tiles`` the photo regions the background used."""

    image: np.ndarray
    faces: list[Box]
    face_px: int | None
    background: str
    seed: tuple[int, ...]
    tiles: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)


def parse_dlib_boxes(xml_path: Path) -> dict[str, list[Box]]:
    """The face boxes of a dlib imglab XML file (examples/faces/training.xml), per image file name."""
    out: dict[str, list[Box]] = {}
    # The XML is dlib's own example data from the verified Debian source tarball, not untrusted input.
    for image in ET.parse(xml_path).getroot().iter("image"):
        boxes = []
        for b in image.iter("box"):
            if b.get("ignore") == "1":
                continue
            left, top, width, height = (float(b.attrib[k]) for k in ("left", "top", "width", "height"))
            boxes.append((left, top, left + width, top + height))
        out[image.attrib["file"]] = boxes
    return out


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def context_crop(box: Box, others: Sequence[Box], shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The head-and-shoulders crop around ``box``, inside the photo, trimmed clear of every other annotated face.

    Each neighbour that reaches into the crop is cut away on the side that keeps most of the crop; None when even the
    least context (CONTEXT_MIN) cannot be kept clear of them.
    """
    height, width = shape
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    crop = [
        max(0.0, x1 - CONTEXT_SIDE * w),
        max(0.0, y1 - CONTEXT_ABOVE * h),
        min(float(width), x2 + CONTEXT_SIDE * w),
        min(float(height), y2 + CONTEXT_BELOW * h),
    ]
    least = [x1 - CONTEXT_MIN * w, y1 - CONTEXT_MIN * h, x2 + CONTEXT_MIN * w, y2 + CONTEXT_MIN * h]
    for other in others:
        if not _overlaps(crop, other):
            continue
        cuts = []
        if other[2] <= least[0]:
            cuts.append((0, other[2]))  # neighbour on the left: move the left edge past it
        if other[0] >= least[2]:
            cuts.append((2, other[0]))
        if other[3] <= least[1]:
            cuts.append((1, other[3]))
        if other[1] >= least[3]:
            cuts.append((3, other[1]))
        if not cuts:
            return None
        best = max(cuts, key=lambda cut: _area([*crop[: cut[0]], cut[1], *crop[cut[0] + 1 :]]))
        crop[best[0]] = best[1]
    if crop[0] > max(0.0, least[0]) or crop[1] > max(0.0, least[1]):
        return None
    if crop[2] < min(width, least[2]) or crop[3] < min(height, least[3]):
        return None
    return (int(np.ceil(crop[0])), int(np.ceil(crop[1])), int(np.floor(crop[2])), int(np.floor(crop[3])))


def _area(rect: Sequence[float]) -> float:
    return max(0.0, rect[2] - rect[0]) * max(0.0, rect[3] - rect[1])


def background_regions(
    boxes: Sequence[Box], shape: tuple[int, int], exclude: Sequence[Sequence[float]] = ()
) -> list[tuple[int, int, int, int]]:
    """Face-free rectangles of a photo: the parts above, under, left of and right of all its annotated faces.

    Each keeps BACKGROUND_CLEARANCE box widths from every face (under the faces the clearance also covers the chin and
    neck). Rectangles smaller than MIN_BACKGROUND_REGION on a side, or reaching into an ``exclude`` rectangle
    (unannotated faces), are dropped.
    """
    height, width = shape
    if not boxes:
        return [(0, 0, width, height)]
    pad = [BACKGROUND_CLEARANCE * (b[2] - b[0]) for b in boxes]
    left = min(b[0] - p for b, p in zip(boxes, pad, strict=True))
    right = max(b[2] + p for b, p in zip(boxes, pad, strict=True))
    top = min(b[1] - p for b, p in zip(boxes, pad, strict=True))
    bottom = max(b[3] + 2 * p for b, p in zip(boxes, pad, strict=True))
    candidates = [
        (0, 0, int(np.floor(left)), height),
        (int(np.ceil(right)), 0, width, height),
        (0, 0, width, int(np.floor(top))),
        (0, int(np.ceil(bottom)), width, height),
    ]
    regions = []
    for x1, y1, x2, y2 in candidates:
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
        if x2 - x1 < MIN_BACKGROUND_REGION or y2 - y1 < MIN_BACKGROUND_REGION:
            continue
        if not any(_overlaps((x1, y1, x2, y2), other) for other in exclude):
            regions.append((x1, y1, x2, y2))
    return regions


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read {path}: run `make setup` to fetch the sample photos")
    return np.ascontiguousarray(bgr[:, :, ::-1])


class FaceLibrary:
    """The source faces and face-free background regions of the sample photos, decoded once."""

    def __init__(self, root: Path | None = None) -> None:
        root = Path(root or samples_dir()).expanduser()
        faces_dir = root / "dlib" / "faces"
        annotated: dict[Path, list[Box]] = {}
        for name in DLIB_ANNOTATIONS:
            xml_path = faces_dir / name
            if not xml_path.is_file():
                raise FileNotFoundError(f"{xml_path} is missing: run `make setup` to fetch the sample photos")
            for file, boxes in parse_dlib_boxes(xml_path).items():
                annotated[faces_dir / file] = boxes
        self.photos: dict[str, np.ndarray] = {}
        self.boxes: dict[str, list[Box]] = {}
        self.faces: list[SourceFace] = []
        self.regions: dict[str, list[tuple[int, int, int, int]]] = {}
        for path, boxes in sorted(annotated.items()):
            self._add(path, boxes)
            shape = self.photos[path.name].shape[:2]
            self.regions[path.name] = background_regions(boxes, shape, UNANNOTATED_FACES.get(path.name, []))
        for name, (left, top, w, h) in sorted(FACE_RECOGNITION_BOXES.items()):
            # Used for faces only: a portrait's background is too small and too close to the face to tile from.
            self._add(root / "face_recognition" / name, [(left, top, left + w, top + h)])

    def _add(self, path: Path, boxes: list[Box]) -> None:
        rgb = _read_rgb(path)
        self.photos[path.name] = rgb
        self.boxes[path.name] = boxes
        unannotated = [(float(a), float(b), float(c), float(d)) for a, b, c, d in UNANNOTATED_FACES.get(path.name, [])]
        for i, box in enumerate(boxes):
            crop = context_crop(box, boxes[:i] + boxes[i + 1 :] + unannotated, rgb.shape[:2])
            if crop is not None:
                self.faces.append(SourceFace(path.name, box, crop))


# -- backgrounds -----------------------------------------------------------------------------------------------------


def _street(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    horizon = int(height * rng.uniform(0.3, 0.55))
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky_top, sky_low = rng.uniform(90, 230, 3), rng.uniform(120, 255, 3)
    ground_near, ground_far = rng.uniform(30, 110, 3), rng.uniform(70, 160, 3)
    image = np.where(
        ys * height < horizon,
        sky_top + (sky_low - sky_top) * ys * height / max(horizon, 1),
        ground_far + (ground_near - ground_far) * (ys * height - horizon) / max(height - horizon, 1),
    )
    image = np.broadcast_to(image, (height, width, 3)).astype(np.float32).copy()
    scale = width / 1920
    for _ in range(int(rng.integers(8, 18))):  # buildings on the horizon, with rows of windows
        bw, bh = int(rng.uniform(80, 400) * scale), int(rng.uniform(100, horizon * 0.9 + 101))
        x = int(rng.integers(-bw // 2, width))
        colour = rng.uniform(40, 220, 3)
        cv2.rectangle(image, (x, horizon - bh), (x + bw, horizon), colour.tolist(), -1)
        step = max(int(24 * scale), 8)
        window = (colour * rng.uniform(0.3, 0.7)).tolist()
        for wy in range(horizon - bh + step // 2, horizon - step, step):
            for wx in range(x + step // 2, x + bw - step, step):
                if rng.random() < 0.7:
                    cv2.rectangle(image, (wx, wy), (wx + step // 2, wy + step // 2), window, -1)
    for _ in range(int(rng.integers(10, 30))):  # poles, cables, road markings, kerbs
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(image, p1, p2, rng.uniform(0, 255, 3).tolist(), int(rng.integers(1, int(8 * scale) + 2)), cv2.LINE_AA)
    for _ in range(int(rng.integers(15, 40))):  # signs, cars, bins, doors near the ground
        rw, rh = int(rng.uniform(10, 200) * scale), int(rng.uniform(10, 160) * scale)
        x, y = int(rng.integers(0, width)), int(rng.integers(horizon // 2, height))
        cv2.rectangle(image, (x, y), (x + rw, y + rh), rng.uniform(0, 255, 3).tolist(), -1)
    image += rng.normal(0.0, rng.uniform(3, 10), image.shape).astype(np.float32)
    return image


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    image = np.zeros((height, width, 3), np.float32)
    for cell in (256, 64, 16, 4):  # octaves of value noise: blotches down to fine grain
        small = rng.uniform(-1, 1, (max(2, height // cell), max(2, width // cell), 3)).astype(np.float32)
        image += cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC) * (cell**0.5) * 6
    image = image * rng.uniform(0.6, 1.4) + rng.uniform(60, 190, 3).astype(np.float32)
    edges = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(20, 60))):  # hard edges: leaves, paving joints
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(5, 120)), int(rng.integers(5, 120)))
        cv2.ellipse(edges, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, int(rng.integers(1, 5)))
    image[edges > 0] *= 0.55
    return image


def _photo_tiles(
    rng: np.random.Generator, library: FaceLibrary, width: int, height: int
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    sources = [(name, region) for name, regions in sorted(library.regions.items()) for region in regions]
    tile = int(height / rng.uniform(2.0, 4.0))
    image = np.zeros((height, width, 3), np.float32)
    used = []
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            name, (x1, y1, x2, y2) = sources[int(rng.integers(len(sources)))]
            side = int(min(x2 - x1, y2 - y1, rng.uniform(48, 200)))
            cx, cy = int(rng.integers(x1, x2 - side + 1)), int(rng.integers(y1, y2 - side + 1))
            patch = library.photos[name][cy : cy + side, cx : cx + side]
            used.append((name, (cx, cy, cx + side, cy + side)))
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            patch = cv2.resize(patch, (tile, tile), interpolation=cv2.INTER_CUBIC)
            patch = cv2.GaussianBlur(patch, (0, 0), rng.uniform(1.0, 4.0))
            h, w = min(tile, height - ty), min(tile, width - tx)
            image[ty : ty + h, tx : tx + w] = patch[:h, :w]
    return image, used


# -- faces -----------------------------------------------------------------------------------------------------------


def _soft_mask(crop_w: int, crop_h: int, face: Box) -> np.ndarray:
    """Alpha [h, w, 1]: 1 over the face box, falling smoothly to 0 at the crop's edges (ramps fit in the margins)."""

    def axis(n: int, lo: float, hi: float) -> np.ndarray:
        pos = np.arange(n, dtype=np.float32) + 0.5
        ramp_lo = max(1.0, min(lo, 0.25 * n))
        ramp_hi = max(1.0, min(n - hi, 0.25 * n))
        a = np.clip(np.minimum(pos / ramp_lo, (n - pos) / ramp_hi), 0.0, 1.0)
        return np.asarray(0.5 - 0.5 * np.cos(np.pi * a), np.float32)

    mask = axis(crop_h, face[1], face[3])[:, None] * axis(crop_w, face[0], face[2])[None, :]
    return np.asarray(mask[:, :, None], np.float32)


@dataclass(frozen=True)
class Look:
    """How one pasted face looks: mirrored or not, and re-lit (pixel * gain + bias) to vary against the scene."""

    mirror: bool = False
    gain: float = 1.0
    bias: float = 0.0


def face_patch(library: FaceLibrary, source: SourceFace, face_px: float, look: Look) -> tuple[np.ndarray, Box] | None:
    """The source face with its head and shoulders, scaled so that its face box is ``face_px`` wide, as float RGB,
    and the face box within the patch; None when the scale leaves nothing."""
    cx1, cy1, cx2, cy2 = source.crop
    patch = library.photos[source.photo][cy1:cy2, cx1:cx2]
    bx1, by1, bx2, by2 = (source.box[0] - cx1, source.box[1] - cy1, source.box[2] - cx1, source.box[3] - cy1)
    scale = face_px / (bx2 - bx1)
    new_w, new_h = max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale))
    if new_w < 2 or new_h < 2:
        return None
    sx, sy = new_w / patch.shape[1], new_h / patch.shape[0]
    if look.mirror:
        patch = patch[:, ::-1]
        bx1, bx2 = patch.shape[1] - bx2, patch.shape[1] - bx1
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(patch, (new_w, new_h), interpolation=interpolation).astype(np.float32)
    return resized * look.gain + look.bias, (bx1 * sx, by1 * sy, bx2 * sx, by2 * sy)


def blend(image: np.ndarray, patch: np.ndarray, face: Box, x: int, y: int) -> Box:
    """Blend ``patch`` into the float ``image`` with its top-left corner at (x, y), with a soft edge around ``face``
    (its face box in patch pixels); returns the face box in image pixels. The patch must fit in the image."""
    new_h, new_w = patch.shape[:2]
    alpha = _soft_mask(new_w, new_h, face)
    region = image[y : y + new_h, x : x + new_w]
    region[:] = region * (1.0 - alpha) + patch * alpha
    return (x + face[0], y + face[1], x + face[2], y + face[3])


def _paste_faces(
    rng: np.random.Generator, library: FaceLibrary, image: np.ndarray, face_px: int, count: int
) -> list[Box]:
    height, width = image.shape[:2]
    taken: list[tuple[int, int, int, int]] = []
    truth: list[Box] = []
    for _ in range(count):
        source = library.faces[int(rng.integers(len(library.faces)))]
        mirror = bool(rng.random() < 0.5)
        made = face_patch(library, source, face_px, Look(mirror, rng.uniform(0.75, 1.15), rng.uniform(-15, 15)))
        if made is None:
            continue
        patch, face = made
        new_h, new_w = patch.shape[:2]
        if new_w >= width or new_h >= height:
            continue
        for _ in range(PLACEMENT_TRIES):
            x, y = int(rng.integers(0, width - new_w + 1)), int(rng.integers(0, height - new_h + 1))
            rect = (x, y, x + new_w, y + new_h)
            if not any(_overlaps(rect, other) for other in taken):
                break
        else:
            continue  # the frame is full at this size
        taken.append(rect)
        truth.append(blend(image, patch, face, x, y))
    return truth


def make_scene(
    library: FaceLibrary,
    size: tuple[int, int],
    face_px: int | None,
    index: int,
    seed: int = 0,
    faces: int = FACES_PER_FRAME,
) -> Scene:
    """Frame ``index`` of the series for (``size``, ``face_px``); ``face_px`` None makes a face-free frame.

    The random stream is seeded by (seed, width, height, face_px, index), so a frame does not depend on which other
    frames were made before it.
    """
    width, height = size
    key = (seed, width, height, face_px or 0, index)
    rng = np.random.default_rng(key)
    background = BACKGROUNDS[index % len(BACKGROUNDS)]
    tiles: list[tuple[str, tuple[int, int, int, int]]] = []
    if background == "street":
        image = _street(rng, width, height)
    elif background == "texture":
        image = _texture(rng, width, height)
    else:
        image, tiles = _photo_tiles(rng, library, width, height)
    truth = _paste_faces(rng, library, image, face_px, faces) if face_px else []
    out = np.clip(image, 0, 255).astype(np.uint8)
    return Scene(out, truth, face_px, background, key, tiles)


def scenes(
    library: FaceLibrary,
    size: tuple[int, int],
    face_widths: Sequence[int],
    frames_per_width: int,
    face_free_frames: int,
    seed: int = 0,
) -> Iterator[Scene]:
    """``frames_per_width`` frames for each face width, then ``face_free_frames`` frames with no face."""
    for face_px in face_widths:
        for index in range(frames_per_width):
            yield make_scene(library, size, face_px, index, seed)
    for index in range(face_free_frames):
        yield make_scene(library, size, None, index, seed)
