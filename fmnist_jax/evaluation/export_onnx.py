"""A run's model as an ONNX graph, written directly from its Flax weights with `onnx.helper`.

The same function as the StableHLO export: uint8 images (N, 28, 28, 1) in, the run's
normalization, the model in evaluation mode (BatchNorm's running statistics, no dropout) and
the run's calibration map inside (`calibration.apply_calibration` as ONNX operators),
probabilities (N, 10) out (the raw "logits" too on request). Every model
of `models.MODELS` is a short chain of standard operators (Conv, Relu, MaxPool, Gemm,
GlobalAveragePool, Softmax), so the graph is built layer by layer from the parameters, with
no converter between (jax2onnx's wheels pin an orbax-checkpoint older than the one the run
folders need). Only `onnx` is needed to write it; `onnxruntime` runs it.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fmnist_jax.errors import FmnistError
from fmnist_jax.models import NUM_CLASSES

OPSET = 17  # ONNX's default domain; onnxruntime 1.14 and later run it
IR_VERSION = 8  # the IR of opset 17
MISSING = ("the onnx format needs the onnx package: pip install 'fmnist_jax[onnx]' "
           "(onnx, and onnxruntime to run the file)")


def require_onnx():
    """The onnx module, or FmnistError naming the extra to install."""
    try:
        import onnx
    except ImportError as e:
        raise FmnistError(MISSING) from e
    return onnx


class _Graph:
    """Nodes and weights of one graph, named in the order they are added (deterministic)."""

    def __init__(self, onnx):
        self.onnx, self.nodes, self.weights = onnx, [], []

    def const(self, name: str, array) -> str:
        array = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
        self.weights.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, params: dict, layer: str, padding: int) -> str:
        kernel_YxXxIxO = np.asarray(params[layer]["kernel"])
        return self.op("Conv", [x, self.const(f"{layer}.weight",
                                               kernel_YxXxIxO.transpose(3, 2, 0, 1)),
                                self.const(f"{layer}.bias", params[layer]["bias"])],
                       kernel_shape=list(kernel_YxXxIxO.shape[:2]), pads=[padding] * 4)

    def conv_relu_pool(self, x: str, params: dict, layer: str, padding: int) -> str:
        x = self.op("Relu", [self.conv(x, params, layer, padding)])
        return self.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])

    def dense(self, x: str, params: dict, layer: str, relu: bool = False) -> str:
        x = self.op("Gemm", [x, self.const(f"{layer}.kernel", params[layer]["kernel"]),
                             self.const(f"{layer}.bias", params[layer]["bias"])])
        return self.op("Relu", [x]) if relu else x

    def flatten_nhwc(self, x_nchw: str) -> str:
        """Flatten a feature map in H, W, C order, as the Flax models do."""
        return self.op("Flatten", [self.op("Transpose", [x_nchw], perm=[0, 2, 3, 1])], axis=1)


def _lenet5(g: _Graph, x: str, params: dict, stats: dict) -> str:
    x = g.conv_relu_pool(x, params, "conv1", 2)
    x = g.flatten_nhwc(g.conv_relu_pool(x, params, "conv2", 0))
    x = g.dense(g.dense(x, params, "fc1", relu=True), params, "fc2", relu=True)
    return g.dense(x, params, "fc3")


def _cnn(g: _Graph, x: str, params: dict, stats: dict) -> str:
    x = g.conv_relu_pool(x, params, "conv1", 1)
    x = g.flatten_nhwc(g.conv_relu_pool(x, params, "conv2", 1))
    return g.dense(g.dense(x, params, "fc1", relu=True), params, "fc2")


def _lenet5_gap(g: _Graph, x: str, params: dict, stats: dict) -> str:
    x = g.conv_relu_pool(x, params, "conv1", 2)
    x = g.op("Relu", [g.conv(x, params, "conv2", 0)])
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    return g.dense(x, params, "fc")


def _mlp(g: _Graph, x: str, params: dict, stats: dict) -> str:
    x = g.flatten_nhwc(x)
    hidden = sorted(name for name in params if name.startswith("bn"))
    for i, bn in enumerate(hidden, start=1):
        x = g.dense(x, params, f"fc{i}")
        # models.BatchNorm1d in evaluation: (x - mean) * rsqrt(var + eps) * scale + bias
        inv_F = (1.0 / np.sqrt(np.asarray(stats[bn]["var"], np.float32) + np.float32(1e-5))
                 * np.asarray(params[bn]["scale"], np.float32))
        x = g.op("Sub", [x, g.const(f"{bn}.mean", stats[bn]["mean"])])
        x = g.op("Mul", [x, g.const(f"{bn}.inv_std_scale", inv_F)])
        x = g.op("Relu", [g.op("Add", [x, g.const(f"{bn}.bias", params[bn]["bias"])])])
    return g.dense(x, params, f"fc{len(hidden) + 1}")


# Keyed by the names of models.MODELS (tests/test_export.py checks every model has one).
BUILDERS: dict[str, Callable[..., str]] = {"lenet5": _lenet5, "cnn": _cnn,
                                           "lenet5-gap": _lenet5_gap, "mlp": _mlp}


def _calibrate(g: _Graph, logits: str, cal_map: dict) -> str:
    """`calibration.apply_calibration` as operators (tests check the two agree)."""
    kind = cal_map["kind"]
    if kind == "temperature":
        return g.op("Div", [logits, g.const("temperature", cal_map["temperature"])])
    if kind == "vector":
        scaled = g.op("Mul", [logits, g.const("calibration.w", cal_map["w"])])
        return g.op("Add", [scaled, g.const("calibration.b", cal_map["b"])])
    if kind == "dirichlet":  # log_softmax(logits) @ W.T + b
        log_probs = g.op("LogSoftmax", [logits], axis=1)
        weights_CxC = np.asarray(cal_map["W"], np.float32).T
        return g.op("Gemm", [log_probs, g.const("calibration.W_T", weights_CxC),
                             g.const("calibration.b", cal_map["b"])])
    raise FmnistError(f"the onnx export knows no calibration map {kind!r}")


def check(model: str, logits: bool) -> None:
    """Before any weight is read: the model has a graph here, and onnx is installed."""
    del logits
    if model not in BUILDERS:
        raise FmnistError(f"the onnx export has no graph for the model {model!r} (it knows "
                          f"{', '.join(BUILDERS)}): export it as stablehlo")
    require_onnx()


def export_onnx(predictor, logits: bool = False) -> tuple[bytes, dict[str, Any]]:
    """(the ONNX model's bytes, the fields it adds to the JSON beside it)."""
    onnx = require_onnx()
    from onnx import TensorProto, helper

    model = predictor.config.model
    params = predictor.variables["params"]
    stats = predictor.variables.get("batch_stats", {})
    g = _Graph(onnx)
    x = g.op("Cast", ["images"], to=TensorProto.FLOAT)
    x = g.op("Div", [x, g.const("pixel_scale", 255.0)])
    x = g.op("Sub", [x, g.const("norm.mean", predictor.normalization.mean)])
    x = g.op("Div", [x, g.const("norm.std", predictor.normalization.std)])
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])  # NHWC -> NCHW, ONNX's layout
    logits_name = g.op("Identity", [BUILDERS[model](g, x, params, stats)], out="logits")
    g.op("Softmax", [_calibrate(g, logits_name, predictor.calibration)], out="probabilities",
         axis=1)

    def value(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    outputs = [value("probabilities", TensorProto.FLOAT, ["N", NUM_CLASSES])]
    if logits:
        outputs.append(value("logits", TensorProto.FLOAT, ["N", NUM_CLASSES]))
    graph = helper.make_graph(g.nodes, f"fmnist_{model.replace('-', '_')}",
                              [value("images", TensorProto.UINT8, ["N", 28, 28, 1])], outputs,
                              initializer=g.weights)
    onnx_model = helper.make_model(graph, producer_name="fmnist_jax",
                                   opset_imports=[helper.make_opsetid("", OPSET)])
    onnx_model.ir_version = IR_VERSION
    onnx.checker.check_model(onnx_model)
    return onnx_model.SerializeToString(), {
        "opset": OPSET, "onnx_version": onnx.__version__,
        "outputs": [o.name for o in outputs],
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", 28, 28, 1]},
        "load": "onnxruntime.InferenceSession(path).run(None, {'images': images})[0]"}


export_onnx.check = check
