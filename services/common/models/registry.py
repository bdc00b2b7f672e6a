"""Where a running service finds the face models that the install step (``fetch``) produced.

Only checks that the files are there; it neither downloads nor converts (services never fetch at run time) and it
imports no install-time package.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sightline.common import paths

log = logging.getLogger(__name__)

# Kept equal to the names in convert/fetch.py, which is not imported here so that a service pulls in no install code.
DETECTOR_FILE = "blazeface_full_range.onnx"
LANDMARKS_FILE = "shape_predictor_5.npz"
EMBEDDER_FILE = "dlib_resnet_v1.onnx"


class ModelsMissingError(FileNotFoundError):
    """The face models have not been fetched into the models folder."""


@dataclass
class ModelFiles:
    """Paths of the three face models: BlazeFace detector, dlib 5-point landmarks, dlib ResNet embedder."""

    detector: Path
    landmarks: Path
    embedder: Path


def model_files(models_dir: Path | None = None) -> ModelFiles:
    """The model paths in ``models_dir`` (default :func:`sightline.common.paths.models_dir`).

    Raises :class:`ModelsMissingError` naming the folder and the command to run when any file is absent.
    """
    root = Path(models_dir if models_dir is not None else paths.models_dir()).expanduser()
    files = ModelFiles(detector=root / DETECTOR_FILE, landmarks=root / LANDMARKS_FILE, embedder=root / EMBEDDER_FILE)
    missing = [p.name for p in (files.detector, files.landmarks, files.embedder) if not p.is_file()]
    if missing:
        log.debug("missing model files in %s: %s", root, missing)
        raise ModelsMissingError(
            f"face models not found in {root}: run `make setup` (or python -m sightline.common.models.convert.fetch)"
        )
    return files
