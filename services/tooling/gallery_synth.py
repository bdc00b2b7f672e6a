"""Synthetic galleries for ``sightline bench search``: descriptors drawn from a model fitted to real ones.

Uniform random vectors would make a 1:N benchmark meaningless (their nearest neighbours are all about equally far, so
an ANN index looks either perfect or useless), so the vectors come from a two-covariance Gaussian fitted to real dlib
descriptors of real faces: a subject's centre is drawn from N(mean, B) (between subjects) and each of its templates,
and each probe of it, is the centre plus N(0, W) (within a subject). Two templates of one person then differ by
N(0, 2W), as real genuine pairs do, and two people's templates by N(0, 2(B + W)), as real impostor pairs do.

Fit (``fit``): the real descriptors are those of the sample photos (``make samples``): dlib's examples/johns (5 people x
11 chips), face_recognition's Obama and Biden photos, and every face of dlib's examples/faces (each a different person;
bald_guys.jpg, a collage of four people, is left out). W is the pooled covariance of the descriptors around their
person's mean; B is the covariance of the descriptors with every person weighted alike, minus W. Both come from about a
hundred vectors in 128 dimensions, so both are shrunk towards a multiple of the identity (Ledoit-Wolf), which keeps
every direction of the space in use, as tens of thousands of real faces would. Finally W is scaled so the median
synthetic genuine distance equals the real one, and B so the median impostor distance does: the medians are matched
exactly, the spread and tails are the Gaussian's (``fit_report`` compares percentiles of both).

Its limits: a Gaussian's tails are not a face population's (real impostor distance tails are heavier: look-alikes,
twins, relatives), and a hundred descriptors of fifty-odd people fix the covariance's main directions only roughly.
The figures it gives (recall of an ANN index against exact search, speed, memory) depend on the geometry much less
than on the tails; false-candidate rates are indicative only.

The fitted model is cached (``<SIGHTLINE_HOME>/cache/gallery_synth/``, keyed by the photos' names and sizes), so
later runs do not run the face pipeline again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sightline.common import paths

log = logging.getLogger(__name__)

FACE_RECOGNITION_PEOPLE = {
    "obama.jpg": "obama",
    "obama2.jpg": "obama",
    "obama3.jpg": "obama",
    "obama_partial_face.jpg": "obama",
    "obama_partial_face2.jpg": "obama",
    "biden.jpg": "biden",
}  # 32bit.png is left out: it is obama2.jpg saved as RGBA, so the two would be a fake genuine pair
CROWD_LEFT_OUT = ("bald_guys.jpg",)  # a collage of four people, several faces each: not one person per face
_CACHE_VERSION = 2
_GENERATE_CHUNK = 65_536  # rows drawn per step: bounds the float64 temporaries whatever the gallery size


@dataclass(frozen=True)
class DescriptorModel:
    """The fitted two-covariance Gaussian; ``between`` and ``within`` are matrix square roots (x = mean + z @ R.T)."""

    mean: np.ndarray  # (d,)
    between: np.ndarray  # (d, d): square root of B, the spread of subjects' centres
    within: np.ndarray  # (d, d): square root of W, the spread of one subject's templates around its centre
    provenance: dict[str, Any]
    # Each capture's within-subject noise is scaled by exp(spread * N(0, 1)): some photos are sharper and more
    # frontal than others, which gives real genuine distances their wider spread than a single Gaussian's.
    spread: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def centres(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` subjects' centres, float32 (count, d)."""
        return self._draw(count, self.between, rng, self.mean)

    def around(self, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One template (or probe) of each given subject centre: the centre plus within-subject noise."""
        scales = np.exp(self.spread * rng.standard_normal(len(centres))).astype(np.float32) if self.spread else None
        return self._draw(len(centres), self.within, rng, centres, scales)

    def gallery(
        self, templates: int, rng: np.random.Generator, per_subject: int = 1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A gallery of ``templates`` vectors: (vectors, subject index of each row, centres of the subjects).

        Subjects have ``per_subject`` templates each (the last one may have fewer)."""
        if templates < 1 or per_subject < 1:
            raise ValueError("templates and per_subject must be at least 1")
        subjects = -(-templates // per_subject)
        centres = self.centres(subjects, rng)
        subject_of = np.arange(templates, dtype=np.int64) // per_subject
        vectors = np.empty((templates, self.dim), dtype=np.float32)
        for start in range(0, templates, _GENERATE_CHUNK):
            rows = subject_of[start : start + _GENERATE_CHUNK]
            vectors[start : start + len(rows)] = self.around(centres[rows], rng)
        return vectors, subject_of, centres

    def mated_probes(self, centres: np.ndarray, subjects: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A fresh capture of each given gallery subject: its centre plus within-subject noise (a genuine distance
        from each of its templates)."""
        return self.around(centres[subjects], rng)

    def non_mated_probes(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Captures of people who are not in the gallery: a fresh subject each."""
        return self.around(self.centres(count, rng), rng)

    def _draw(
        self,
        count: int,
        root: np.ndarray,
        rng: np.random.Generator,
        offset: np.ndarray,
        scales: np.ndarray | None = None,
    ) -> np.ndarray:
        out = np.empty((count, self.dim), dtype=np.float32)
        root32 = root.astype(np.float32).T
        for start in range(0, count, _GENERATE_CHUNK):
            stop = min(count, start + _GENERATE_CHUNK)
            noise = rng.standard_normal((stop - start, self.dim), dtype=np.float32) @ root32
            if scales is not None:
                noise *= scales[start:stop, None]
            out[start:stop] = noise + (offset if offset.ndim == 1 else offset[start:stop])
        return out

    def to_npz(self, path: Path) -> None:
        np.savez(
            path,
            mean=self.mean,
            between=self.between,
            within=self.within,
            spread=self.spread,
            provenance=json.dumps(self.provenance),
        )

    @classmethod
    def from_npz(cls, path: Path) -> DescriptorModel:
        with np.load(path) as data:
            provenance = json.loads(str(data["provenance"]))
            return cls(data["mean"], data["between"], data["within"], provenance, float(data["spread"]))


# -- real descriptors ------------------------------------------------------------------------------------------------


def real_samples() -> list[Any]:
    """The sample photos the model is fitted to (``evaluation.Sample``s; see the module docstring)."""
    from sightline.tooling.evaluation import Sample, load_identity_folders

    root = paths.samples_dir()
    johns = load_identity_folders(root / "dlib" / "johns").samples
    photos = [Sample(person, root / "face_recognition" / name) for name, person in FACE_RECOGNITION_PEOPLE.items()]
    crowd = [
        Sample(p.stem, p, crowd=True)
        for p in sorted((root / "dlib" / "faces").glob("*.jpg"))
        if p.name not in CROWD_LEFT_OUT
    ]
    return [*johns, *photos, *crowd]


def real_descriptors(samples: Sequence[Any] | None = None) -> tuple[np.ndarray, list[str]]:
    """Descriptors (n, 128) of the real faces and the identity of each, through the real face pipeline."""
    from sightline.common.models.pipeline import FacePipeline
    from sightline.tooling.evaluation import acquire

    samples = list(samples if samples is not None else real_samples())
    if not samples:
        raise FileNotFoundError(f"no sample photos in {paths.samples_dir()}: run `make samples`")
    acquisition = acquire(samples, FacePipeline(), progress=False)
    vectors = np.stack([a.descriptor for a in acquisition.acquired]).astype(np.float64)
    return vectors, [a.identity for a in acquisition.acquired]


# -- fitting ---------------------------------------------------------------------------------------------------------


def fit(vectors: np.ndarray, identities: Sequence[str], source: str = "") -> DescriptorModel:
    """The two-covariance model of real descriptors, medians of genuine and impostor distances matched."""
    x = np.asarray(vectors, dtype=np.float64)
    ids = np.asarray(identities)
    names, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if np.count_nonzero(counts > 1) < 2 or len(names) < 10:
        raise ValueError("fitting needs at least 10 people, two of them with several descriptors")
    person_mean = np.stack([x[inverse == i].mean(axis=0) for i in range(len(names))])
    residual = x - person_mean[inverse]
    repeated = counts[inverse] > 1
    within = _shrunk_covariance(residual[repeated], dof=int(repeated.sum() - np.count_nonzero(counts > 1)))
    weights = 1.0 / counts[inverse]  # every person counts alike, however many photos they have
    mean = np.average(x, axis=0, weights=weights)
    total = _shrunk_covariance((x - mean) * np.sqrt(weights * len(names) / weights.sum())[:, None], dof=len(names) - 1)
    between = _psd_part(total - within)
    genuine, impostor = pair_distances(x, ids)
    rng = np.random.default_rng(0)
    model = DescriptorModel(mean, _sqrtm(between), _sqrtm(within), {}, _fit_spread(_sqrtm(within), genuine, rng))
    # Scale W so the median genuine distance is the real one, then B so the median impostor distance is: impostor
    # squared distances are about 2 tr(B) + 2 tr(W), so B takes up what W leaves. Measured on draws, twice over.
    for _ in range(2):
        g, _unused = _model_distances(model, rng, impostor=False)
        root_w = model.within * float(np.median(genuine) / np.median(g))
        model = DescriptorModel(mean, model.between, root_w, {}, model.spread)
        g, i = _model_distances(model, rng)
        target, w_part = float(np.median(impostor)) ** 2, float(np.median(g)) ** 2
        current_b = max(float(np.median(i)) ** 2 - w_part, 1e-12)
        root_b = model.between * np.sqrt(max(target - w_part, 1e-12) / current_b)
        model = DescriptorModel(mean, root_b, root_w, {}, model.spread)
    provenance = {
        "source": source or "sightline.tooling.gallery_synth.real_samples",
        "descriptors": int(len(x)),
        "identities": int(len(names)),
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
    }
    return DescriptorModel(mean, model.between, model.within, provenance, model.spread)


def _fit_spread(root_w: np.ndarray, genuine: np.ndarray, rng: np.random.Generator, pairs: int = 20_000) -> float:
    """The per-capture noise scale spread that gives the model's genuine distances the real p95 / p5 ratio."""
    wanted = float(np.percentile(genuine, 95) / np.percentile(genuine, 5))
    first, second = (rng.standard_normal((pairs, len(root_w))) @ root_w.T for _ in range(2))
    z1, z2 = rng.standard_normal(pairs), rng.standard_normal(pairs)

    def ratio(spread: float) -> float:
        d = np.linalg.norm(first * np.exp(spread * z1)[:, None] - second * np.exp(spread * z2)[:, None], axis=1)
        return float(np.percentile(d, 95) / np.percentile(d, 5))

    grid = np.linspace(0.0, 0.8, 81)
    return float(grid[np.argmin([abs(ratio(spread) - wanted) for spread in grid])])


def pair_distances(vectors: np.ndarray, identities: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All genuine (same identity) and impostor pair distances of a set of descriptors."""
    x = np.asarray(vectors, dtype=np.float64)
    ids = np.asarray(identities)
    upper = np.triu_indices(len(x), 1)
    distances = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=-1), 0.0))[upper]
    same = (ids[:, None] == ids[None, :])[upper]
    return distances[same], distances[~same]


def fit_report(model: DescriptorModel, vectors: np.ndarray, identities: Sequence[str]) -> dict[str, Any]:
    """Percentiles of genuine and impostor distances, real against the model's, to judge the fit."""
    genuine, impostor = pair_distances(vectors, identities)
    g, i = _model_distances(model, np.random.default_rng(1), pairs=200_000)
    quantiles = (1, 5, 25, 50, 75, 95, 99)

    def row(values: np.ndarray) -> dict[str, float]:
        return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in quantiles}

    return {
        "genuine": {"real": row(genuine), "model": row(g)},
        "impostor": {"real": row(impostor), "model": row(i)},
        "real_pairs": {"genuine": int(len(genuine)), "impostor": int(len(impostor))},
    }


def impostor_threshold(model: DescriptorModel, fmr: float, pairs: int = 1_000_000, seed: int = 2) -> float:
    """The distance under which a share ``fmr`` of the model's impostor pairs fall (its 1:1 threshold at that FMR)."""
    _, impostor = _model_distances(model, np.random.default_rng(seed), pairs=pairs, genuine=False)
    return float(np.quantile(impostor, fmr))


def _model_distances(
    model: DescriptorModel, rng: np.random.Generator, pairs: int = 50_000, genuine: bool = True, impostor: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Sampled genuine distances (two templates of one subject) and impostor distances (two subjects' templates)."""
    g = i = np.empty(0, dtype=np.float32)
    if genuine:
        centres = model.centres(pairs, rng)
        g = np.linalg.norm(model.around(centres, rng) - model.around(centres, rng), axis=1)
    if impostor:
        i = np.linalg.norm(model.non_mated_probes(pairs, rng) - model.non_mated_probes(pairs, rng), axis=1)
    return g, i


def _shrunk_covariance(centred: np.ndarray, dof: int) -> np.ndarray:
    """Ledoit-Wolf shrinkage of the sample covariance of already centred rows towards ``mu * I``."""
    n, d = centred.shape
    sample = centred.T @ centred / max(dof, 1)
    mu = float(np.trace(sample)) / d
    target_gap = float(np.sum((sample - mu * np.eye(d)) ** 2))
    # Ledoit & Wolf (2004): the variance of the sample covariance's entries, estimated from the rows.
    spread = sum(float(np.sum((np.outer(row, row) - sample) ** 2)) for row in centred) / n**2
    shrink = 1.0 if target_gap == 0 else min(1.0, spread / target_gap)
    return (1 - shrink) * sample + shrink * mu * np.eye(d)


def _psd_part(matrix: np.ndarray) -> np.ndarray:
    """The nearest positive semi-definite matrix (negative eigenvalues clipped to a small floor)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    floor = max(float(values.max()), 0.0) * 1e-3
    return (vectors * np.maximum(values, floor)) @ vectors.T


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T


# -- the cached model ------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return paths.sightline_home() / "cache" / "gallery_synth"


def fitted_model(use_cache: bool = True) -> DescriptorModel:
    """The model fitted to the sample photos, from the cache when the same photos were fitted before."""
    samples = real_samples()
    key = _samples_key(samples)
    cached = cache_dir() / f"model-{key}.npz"
    if use_cache and cached.is_file():
        return DescriptorModel.from_npz(cached)
    vectors, identities = real_descriptors(samples)
    model = fit(vectors, identities)
    report = fit_report(model, vectors, identities)
    model = DescriptorModel(model.mean, model.between, model.within, {**model.provenance, "fit": report}, model.spread)
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".tmp.npz")
        model.to_npz(partial)
        partial.replace(cached)  # whole or absent: a run killed mid-write leaves no half file behind
    return model


def _samples_key(samples: Sequence[Any]) -> str:
    digest = hashlib.sha256(f"v{_CACHE_VERSION}".encode())
    for sample in samples:
        path = Path(sample.path)
        size = path.stat().st_size if path.is_file() else -1
        digest.update(f"{sample.identity}|{path.name}|{size}|{sample.crowd}\n".encode())
    return digest.hexdigest()[:16]
