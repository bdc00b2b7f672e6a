"""Biometric evaluation: datasets, comparison pairs and the accuracy figures of ISO/IEC 19795-1.

Shared by ``sightline eval``, ``sightline calibrate`` and ``sightline compare``:

- **Datasets** in two formats: a folder with one subfolder per identity, or an LFW-style pairs file
  (``load_dataset``). Images that are exactly 150x150 are taken, in ``chips="auto"`` mode, to be dlib-aligned face
  chips (like dlib's ``examples/johns``) and are embedded directly: the detector is not built for a face that fills
  the whole image, and re-aligning an aligned chip gains nothing.
- **Acquisition** (``acquire``): one descriptor per sample, from its best face (the largest; the detector's score
  breaks ties). Every sample that yields nothing is a failure to acquire, with a reason a person can act on.
- **Scores** are descriptor distances (lower is more alike); a pair at or under the threshold is a match, the same
  rule the decision policy applies.
- **Metrics**: FMR/FNMR at thresholds, EER, TAR at a FAR, rank-1 identification. A figure that the data are too few
  to estimate is returned as an ``Estimate`` with no value and a note saying why (``MIN_ERRORS_RULE``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sightline.common.models.descriptor_spec import CHIP_SIZE

# To estimate a rate p from N independent trials with zero observed errors, the 95% upper bound is 3/N (the "rule
# of three"): a FAR of p can only be told apart from "unknown" with at least 3/p impostor comparisons.
MIN_ERRORS_RULE = 3
DEFAULT_MAX_IMPOSTOR_PAIRS = 5_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".pgm", ".ppm")


# -- datasets --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. ``crowd`` images hold several people: each face becomes an identity of its own, unless
    its box contains one of the ``face_labels`` points (x, y, identity), which names it."""

    identity: str
    path: Path
    crowd: bool = False
    face_labels: tuple[tuple[float, float, str], ...] = ()

    def crowd_identity(self, box: Sequence[float], index: int) -> str:
        x1, y1, x2, y2 = (float(v) for v in box)
        named = [name for x, y, name in self.face_labels if x1 <= x <= x2 and y1 <= y <= y2]
        return named[0] if len(named) == 1 else f"{self.identity}#face{index}"


@dataclass
class Dataset:
    """Samples and, for a pairs file, the listed comparisons as (sample index, sample index, genuine)."""

    path: Path
    kind: str  # "folders" or "pairs"
    samples: list[Sample]
    pairs: list[tuple[int, int, bool]] | None = None
    problems: list[str] = field(default_factory=list)  # lines or files that could not be used

    @property
    def identities(self) -> int:
        return len({s.identity for s in self.samples})


class DatasetError(ValueError):
    """A dataset that cannot be read at all (each bad file is a failure to acquire instead)."""


def load_dataset(path: Path, images_root: Path | None = None) -> Dataset:
    """A folder with one subfolder per identity, or an LFW-style pairs file (images under ``images_root``)."""
    if path.is_dir():
        return load_identity_folders(path)
    if path.is_file():
        return load_pairs_file(path, images_root or path.parent)
    raise DatasetError(f"{path} does not exist")


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def load_identity_folders(root: Path) -> Dataset:
    """Every visible file of every subfolder is a sample of that subfolder's identity (unreadable ones included, so
    that they count as failures to acquire rather than vanishing)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [Sample(folder.name, f) for folder in folders for f in _visible_files(folder)]
    problems = [f"{p}: not in an identity subfolder, ignored" for p in _visible_files(root)]
    if not samples:
        raise DatasetError(f"{root} has no identity subfolders with files (expected {root}/NAME/IMAGE...)")
    return Dataset(root, "folders", samples, problems=problems)


_INT = re.compile(r"^\d+$")


def load_pairs_file(pairs_file: Path, images_root: Path) -> Dataset:
    """LFW's pairs format: an optional header of counts, then ``name n1 n2`` (genuine) and ``name1 n1 name2 n2``
    (impostor) lines; image ``n`` of ``name`` is ``images_root/name/name_000n.jpg`` (any image suffix)."""
    index: dict[tuple[str, int], int] = {}
    samples: list[Sample] = []
    pairs: list[tuple[int, int, bool]] = []
    problems: list[str] = []

    def sample(name: str, number: int) -> int:
        if (name, number) not in index:
            index[(name, number)] = len(samples)
            samples.append(Sample(name, _lfw_image(images_root, name, number)))
        return index[(name, number)]

    for line_no, line in enumerate(pairs_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or (line_no == 1 and all(_INT.match(f) for f in fields)):
            continue  # blank line or the header of fold and pair counts
        if len(fields) == 3 and _INT.match(fields[1]) and _INT.match(fields[2]):
            pairs.append((sample(fields[0], int(fields[1])), sample(fields[0], int(fields[2])), True))
        elif len(fields) == 4 and _INT.match(fields[1]) and _INT.match(fields[3]):
            pairs.append((sample(fields[0], int(fields[1])), sample(fields[2], int(fields[3])), False))
        else:
            problems.append(f"{pairs_file}:{line_no}: not a pair line ({line.strip()!r}), ignored")
    if not pairs:
        raise DatasetError(f"{pairs_file} lists no pairs (expected 'name n1 n2' and 'name1 n1 name2 n2' lines)")
    return Dataset(pairs_file, "pairs", samples, pairs, problems)


def _lfw_image(root: Path, name: str, number: int) -> Path:
    stem = root / name / f"{name}_{number:04d}"
    for suffix in IMAGE_SUFFIXES:
        if stem.with_suffix(suffix).exists():
            return stem.with_suffix(suffix)
    return stem.with_suffix(".jpg")  # missing: reported as a failure to acquire with this path


# -- acquisition -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acquired:
    """A descriptor obtained from a sample; ``sample`` indexes the dataset's samples."""

    sample: int
    identity: str
    descriptor: np.ndarray
    face_index: int | None  # None: the image was embedded directly as an aligned chip


@dataclass(frozen=True)
class Failure:
    sample: int
    path: Path
    reason: str  # unreadable_file, undecodable_image, ..., no_face
    message: str


@dataclass
class Acquisition:
    acquired: list[Acquired]
    failures: list[Failure]
    notes: list[str]  # per-file remarks that did not stop acquisition (several faces: which one was used)
    samples: int

    @property
    def fta_rate(self) -> float:
        return len(self.failures) / self.samples if self.samples else 0.0


def best_face(faces: Sequence[Any]) -> int:
    """Index of the face to use when one is expected: the largest box, then the highest detector score."""

    def key(i: int) -> tuple[float, float]:
        x1, y1, x2, y2 = (float(v) for v in faces[i].box)
        return (x2 - x1) * (y2 - y1), float(faces[i].score)

    return max(range(len(faces)), key=key)


def is_chip(rgb: np.ndarray, chips: str) -> bool:
    """Whether to embed the image directly as an aligned chip (``chips``: "auto", "always" or "never")."""
    if chips == "always":
        return True
    return chips == "auto" and rgb.shape[0] == CHIP_SIZE and rgb.shape[1] == CHIP_SIZE


def as_chip(rgb: np.ndarray) -> np.ndarray:
    if rgb.shape[:2] == (CHIP_SIZE, CHIP_SIZE):
        return rgb
    import cv2

    return cv2.resize(rgb, (CHIP_SIZE, CHIP_SIZE), interpolation=cv2.INTER_AREA)


def read_rgb(path: Path) -> np.ndarray:
    """Decode a file, raising ``ImageError`` with a reason for every way it can fail (missing files included)."""
    from sightline.common.images import ImageError, decode_image

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError("unreadable_file", f"cannot read the file: {exc.strerror or exc}") from None
    return decode_image(data)


def acquire(
    samples: Sequence[Sample],
    pipeline: Any,
    chips: str = "auto",
    progress: bool = True,
    describe: Callable[[Path], str] = str,
) -> Acquisition:
    """One descriptor per sample (every face for crowd samples), with a failure or a note for each problem file."""
    from tqdm import tqdm

    from sightline.common.images import ImageError

    result = Acquisition([], [], [], len(samples))
    for i, sample in enumerate(tqdm(samples, desc="faces", unit="image", disable=not progress, leave=False)):
        name = describe(sample.path)
        try:
            rgb = read_rgb(sample.path)
        except ImageError as exc:
            result.failures.append(Failure(i, sample.path, exc.reason, f"{name}: {exc}"))
            continue
        if is_chip(rgb, chips) and not sample.crowd:
            descriptor = pipeline.embedder.embed(as_chip(rgb)[None])[0]
            result.acquired.append(Acquired(i, sample.identity, descriptor, None))
            continue
        faces, descriptors = pipeline.run(rgb)
        if not faces:
            result.failures.append(Failure(i, sample.path, "no_face", f"{name}: no face found"))
        elif sample.crowd:
            result.acquired.extend(
                Acquired(i, sample.crowd_identity(face.box, j), descriptors[j], j) for j, face in enumerate(faces)
            )
        else:
            j = best_face(faces)
            if len(faces) > 1:
                result.notes.append(f"{name}: {len(faces)} faces where one is expected; used the largest (face {j})")
            result.acquired.append(Acquired(i, sample.identity, descriptors[j], j))
    return result


# -- comparison scores -----------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Genuine (same identity) and impostor (different identities) distances."""

    genuine: np.ndarray
    impostor: np.ndarray
    skipped_pairs: int = 0  # pairs of a pairs file whose images could not be acquired
    impostor_sampled_from: int = 0  # when impostor pairs were subsampled, how many there were

    def __post_init__(self) -> None:
        self.genuine = np.asarray(self.genuine, dtype=np.float64)
        self.impostor = np.asarray(self.impostor, dtype=np.float64)


def all_pairs_scores(
    acquired: Sequence[Acquired], max_impostor_pairs: int = DEFAULT_MAX_IMPOSTOR_PAIRS, seed: int = 0
) -> Scores:
    """Every pair of descriptors, split by identity. Impostor pairs grow with N^2: beyond ``max_impostor_pairs`` a
    fixed-seed random subset is kept (said in ``impostor_sampled_from``)."""
    if len(acquired) < 2:
        return Scores(np.zeros(0), np.zeros(0))
    vectors = np.stack([a.descriptor for a in acquired]).astype(np.float64)
    labels = np.array([a.identity for a in acquired])
    rows, cols = np.triu_indices(len(acquired), k=1)
    distances = np.linalg.norm(vectors[rows] - vectors[cols], axis=1)
    same = labels[rows] == labels[cols]
    impostor = distances[~same]
    total = len(impostor)
    if total > max_impostor_pairs:
        impostor = np.random.default_rng(seed).choice(impostor, max_impostor_pairs, replace=False)
    return Scores(distances[same], impostor, impostor_sampled_from=total if total > max_impostor_pairs else 0)


def listed_pairs_scores(acquired: Sequence[Acquired], pairs: Iterable[tuple[int, int, bool]]) -> Scores:
    """The distances of the listed pairs; a pair with an image that yielded no descriptor is skipped and counted."""
    by_sample = {a.sample: a.descriptor for a in acquired}
    genuine, impostor, skipped = [], [], 0
    for a, b, is_genuine in pairs:
        if a not in by_sample or b not in by_sample:
            skipped += 1
            continue
        distance = float(np.linalg.norm(by_sample[a].astype(np.float64) - by_sample[b]))
        (genuine if is_genuine else impostor).append(distance)
    return Scores(np.array(genuine), np.array(impostor), skipped_pairs=skipped)


# -- metrics ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A figure, or ``value=None`` with a ``note`` saying why it cannot be estimated from these data."""

    value: float | None
    threshold: float | None = None
    note: str = ""
    count: int = 0  # trials behind the figure (probes for rank-1)

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "threshold": self.threshold, "note": self.note or None, "count": self.count}


def fmr_at(impostor: np.ndarray, threshold: float) -> float:
    """False match rate: impostor pairs at or under the threshold."""
    return float(np.mean(impostor <= threshold)) if len(impostor) else math.nan


def fnmr_at(genuine: np.ndarray, threshold: float) -> float:
    """False non-match rate: genuine pairs over the threshold."""
    return float(np.mean(genuine > threshold)) if len(genuine) else math.nan


def error_curves(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, FMR, FNMR) at every distinct score: the points of the DET curve."""
    thresholds = np.unique(np.concatenate([genuine, impostor]))
    fmr = np.searchsorted(np.sort(impostor), thresholds, side="right") / max(len(impostor), 1)
    fnmr = 1.0 - np.searchsorted(np.sort(genuine), thresholds, side="right") / max(len(genuine), 1)
    return thresholds, fmr, fnmr


def equal_error_rate(genuine: np.ndarray, impostor: np.ndarray) -> Estimate:
    """EER: the rate where FMR and FNMR meet, taken as their mean at the threshold where they are closest."""
    if not len(genuine) or not len(impostor):
        return Estimate(None, note=_missing(genuine, impostor))
    thresholds, fmr, fnmr = error_curves(genuine, impostor)
    # Also consider "reject everything" (a threshold below every score): FMR 0, FNMR 1.
    thresholds = np.concatenate([[thresholds[0] - 1e-9], thresholds])
    fmr, fnmr = np.concatenate([[0.0], fmr]), np.concatenate([[1.0], fnmr])
    i = int(np.argmin(np.abs(fmr - fnmr)))
    note = ""
    resolution = 1.0 / min(len(genuine), len(impostor))
    if fmr[i] == 0 and fnmr[i] == 0:
        note = (
            f"no error observed at the crossing: the EER is under about {resolution:.1g} "
            f"({len(genuine)} genuine, {len(impostor)} impostor pairs)"
        )
    return Estimate(float((fmr[i] + fnmr[i]) / 2), float(thresholds[i]), note, len(genuine) + len(impostor))


def min_impostor_pairs(far: float) -> int:
    return math.ceil(MIN_ERRORS_RULE / far - 1e-9)


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> Estimate:
    """True accept rate at the largest threshold whose FMR does not exceed ``far``.

    Needs at least ``MIN_ERRORS_RULE / far`` impostor pairs; with fewer, the FMR at that level cannot be measured and
    the estimate says so instead of giving a number.
    """
    if not len(genuine) or not len(impostor):
        return Estimate(None, note=_missing(genuine, impostor))
    needed = min_impostor_pairs(far)
    if len(impostor) < needed:
        return Estimate(
            None,
            note=f"too few impostor pairs to estimate TAR at FAR {far:g}: need >= {needed}, have {len(impostor)}",
            count=len(impostor),
        )
    ordered = np.sort(impostor)
    allowed = int(math.floor(far * len(ordered) + 1e-9))  # impostor pairs that may be accepted
    if allowed >= len(ordered):
        threshold = float(ordered[-1])
    else:
        # Just below the first impostor that must be rejected, so that "at or under" accepts no more than allowed.
        threshold = float(np.nextafter(ordered[allowed], -np.inf))
    return Estimate(1.0 - fnmr_at(genuine, threshold), threshold, count=len(impostor))


def rank1_rate(acquired: Sequence[Acquired]) -> Estimate:
    """Closed-set rank-1 identification, leave-one-out: each descriptor whose identity has another one is a probe
    against all the others (identities with a single descriptor stay in as distractors)."""
    if len(acquired) < 2:
        return Estimate(None, note="fewer than two acquired samples")
    vectors = np.stack([a.descriptor for a in acquired]).astype(np.float64)
    labels = np.array([a.identity for a in acquired])
    mated = {label for label, n in zip(*np.unique(labels, return_counts=True), strict=True) if n > 1}
    probes = [i for i, label in enumerate(labels) if label in mated]
    if not probes:
        return Estimate(None, note="no identity has two acquired samples: nothing to identify")
    distances = np.linalg.norm(vectors[probes][:, None, :] - vectors[None, :, :], axis=2)
    distances[np.arange(len(probes)), probes] = np.inf  # a probe is not its own gallery entry
    hits = labels[np.argmin(distances, axis=1)] == labels[probes]
    return Estimate(float(np.mean(hits)), count=len(probes))


def summary(values: np.ndarray) -> dict[str, Any]:
    if not len(values):
        return {"count": 0}
    q = np.percentile(values, [1, 5, 50, 95, 99])
    return {
        "count": int(len(values)),
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "min": float(np.min(values)),
        "p01": float(q[0]),
        "p05": float(q[1]),
        "median": float(q[2]),
        "p95": float(q[3]),
        "p99": float(q[4]),
        "max": float(np.max(values)),
    }


def _missing(genuine: np.ndarray, impostor: np.ndarray) -> str:
    lacking = [what for what, values in (("genuine", genuine), ("impostor", impostor)) if not len(values)]
    return f"no {' and no '.join(lacking)} pairs"


# -- calibration table -----------------------------------------------------------------------------------------------

# With fewer impostor matches than this at a distance, the measured FMR is too noisy (relative error over ~30%) and
# the table uses the fitted tail model instead.
MIN_MEASURED_MATCHES = 10
TABLE_DISTANCES = np.round(np.arange(0.20, 1.2001, 0.01), 2)
FMR_FLOOR = 1e-12


@dataclass(frozen=True)
class TailModel:
    """A normal distribution fitted to the lower tail of the impostor distances (probit regression of the empirical
    quantiles between ``MIN_MEASURED_MATCHES / N`` and 20%)."""

    mean: float
    std: float
    fitted_quantiles: tuple[float, float]

    def fmr(self, distance: float) -> float:
        from statistics import NormalDist

        return max(NormalDist(self.mean, self.std).cdf(distance), FMR_FLOOR)


def fit_tail(impostor: np.ndarray) -> TailModel:
    from statistics import NormalDist

    ordered = np.sort(impostor)
    low = max(MIN_MEASURED_MATCHES / len(ordered), 1e-4)
    levels = np.geomspace(low, 0.2, 12)
    z = np.array([NormalDist().inv_cdf(p) for p in levels])
    quantiles = np.quantile(ordered, levels)
    std, mean = np.polyfit(z, quantiles, 1)  # quantile = mean + std * z
    return TailModel(float(mean), float(max(std, 1e-6)), (float(low), 0.2))


def build_calibration_table(impostor: np.ndarray, genuine: np.ndarray, provenance: dict[str, Any]) -> dict[str, Any]:
    """Distance thresholds -> FMR: measured where at least ``MIN_MEASURED_MATCHES`` impostor pairs fall at or under
    the distance, from the fitted tail model (labelled ``"source": "model"``) below that."""
    if len(impostor) < 100:
        raise ValueError(f"too few impostor pairs to calibrate: need >= 100, have {len(impostor)}")
    ordered = np.sort(impostor)
    tail = fit_tail(ordered)
    rows = []
    for distance in TABLE_DISTANCES:
        matches = int(np.searchsorted(ordered, distance, side="right"))
        measured = matches >= MIN_MEASURED_MATCHES
        fmr = matches / len(ordered) if measured else tail.fmr(float(distance))
        rows.append(
            {
                "distance": float(distance),
                "fmr": fmr,
                "impostor_matches": matches,
                "source": "measured" if measured else "model",
            }
        )
    # Keep the table monotonic: a model value may not exceed the measured value at a larger distance.
    for i in range(len(rows) - 2, -1, -1):
        rows[i]["fmr"] = min(rows[i]["fmr"], rows[i + 1]["fmr"])
    for row in rows:
        row["fmr"] = float(f"{max(row['fmr'], FMR_FLOOR):.4g}")
    measured_floor = MIN_MEASURED_MATCHES / len(ordered)
    return {
        "format": "sightline-calibration/1",
        "model": "dlib_resnet_v1",
        "score": "Euclidean distance between 128-d descriptors; a pair at or under the distance is a match",
        "provenance": {
            **provenance,
            "impostor_pairs": int(len(impostor)),
            "genuine_pairs": int(len(genuine)),
            "resolution": 1.0 / len(impostor),
            "lowest_measured_fmr": measured_floor,
            "rule": f"FMR is measured where at least {MIN_MEASURED_MATCHES} impostor pairs match; below that "
            f"(FMR under about {measured_floor:.1g}) it comes from the tail model and is an extrapolation",
        },
        "tail_model": {
            "kind": "normal fitted to the lower tail of the impostor distances (probit regression)",
            "mean": tail.mean,
            "std": tail.std,
            "fitted_quantiles": list(tail.fitted_quantiles),
        },
        "genuine_summary": summary(np.asarray(genuine, dtype=np.float64)),
        "impostor_summary": summary(ordered),
        "rows": rows,
    }
