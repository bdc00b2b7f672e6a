"""Face descriptor runtime: runs the dlib ResNet ONNX model (see :mod:`dlib_resnet`) on face chips.

Input chips are dlib-style aligned faces, uint8 RGB 150x150 (built like dlib's
``get_face_chip_details(size=150, padding=0.25)``); the output is dlib's unnormalised
128-d descriptor, where a Euclidean distance below ~0.6 means "same person".
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sightline.common.models.descriptor_spec import CHIP_SIZE, DESCRIPTOR_SIZE, INPUT_NAME, OUTPUT_NAME
from sightline.common.models.onnx_session import open_session

logger = logging.getLogger(__name__)

_CHIP_SHAPE = (CHIP_SIZE, CHIP_SIZE, 3)


class FaceEmbedder:
    """onnxruntime CPU session computing 128-d face descriptors from 150x150 RGB chips."""

    def __init__(self, onnx_path: Path, threads: int = 1) -> None:
        self._session = open_session(onnx_path, threads, "face descriptor model")
        self._check_signature(onnx_path)
        logger.info("loaded face embedder %s (threads=%d)", onnx_path, threads)

    def _check_signature(self, onnx_path: Path) -> None:
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if (
            [i.name for i in inputs] != [INPUT_NAME]
            or inputs[0].type != "tensor(uint8)"
            or list(inputs[0].shape[1:]) != list(_CHIP_SHAPE)
            or [o.name for o in outputs] != [OUTPUT_NAME]
        ):
            raise ValueError(f"{onnx_path} is not a dlib ResNet descriptor model built by dlib_resnet")

    @property
    def model_name(self) -> str:
        return "dlib_resnet_v1"

    @property
    def model_version(self) -> str:
        return "1"

    @property
    def descriptor_size(self) -> int:
        return DESCRIPTOR_SIZE

    @property
    def chip_size(self) -> int:
        return CHIP_SIZE

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """Descriptors for uint8 RGB chips [N,150,150,3] (or one [150,150,3]) as float32 [N,128]."""
        batch = _as_batch(chips)
        if batch.shape[0] == 0:
            return np.empty((0, DESCRIPTOR_SIZE), dtype=np.float32)
        (descriptors,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        return np.asarray(descriptors, dtype=np.float32)


def _as_batch(chips: np.ndarray) -> np.ndarray:
    """Validate chips and return a contiguous uint8 [N,150,150,3] array."""
    if not isinstance(chips, np.ndarray):
        raise ValueError(f"chips must be a numpy array, got {type(chips).__name__}")
    if chips.dtype != np.uint8:
        raise ValueError(f"chips must be uint8 RGB, got dtype {chips.dtype}")
    if chips.ndim == 3:
        chips = chips[np.newaxis]
    if chips.ndim != 4 or chips.shape[1:] != _CHIP_SHAPE:
        raise ValueError(
            f"chips must have shape [N,{CHIP_SIZE},{CHIP_SIZE},3] or [{CHIP_SIZE},{CHIP_SIZE},3], "
            f"got {list(chips.shape)}"
        )
    return np.ascontiguousarray(chips)
