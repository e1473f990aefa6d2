"""Weights between Flax params and a torch state_dict, exact in both directions, for each
model the baseline has (`baseline.TORCH_MODELS`: LeNet-5 and the tutorial CNN).

Three layout differences, and nothing else (no arithmetic, so a round trip is bitwise):
- conv kernels: Flax (kh, kw, Cin, Cout) "HWIO" <-> torch weight (Cout, Cin, kh, kw) "OIHW";
- dense kernels: Flax (in, out) <-> torch weight (out, in);
- the dense layer after the flatten (fc1 in both models): Flax flattens the (H, W, C) feature
  map in H, W, C order, torch flattens (C, H, W) in C, H, W order, so fc1's input rows are
  permuted between the two (LeNet-5: 5 x 5 x 16 = 400 inputs; the CNN: 7 x 7 x 32 = 1568).
Biases are the same vectors on both sides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from fmnist_jax.baseline import TORCH_MODELS, check_torch_model, require_torch
from fmnist_jax.errors import FmnistError

require_torch()  # a one-line FmnistError, not an ImportError traceback, when torch is missing
import torch  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the exchange knows of one model: its layers in order and the feature map its
    first dense layer reads. The torch shapes follow from the Flax ones."""

    title: str  # the model as messages name it
    convs: tuple[tuple[str, tuple[int, int, int, int]], ...]  # (layer, Flax kernel kh,kw,I,O)
    denses: tuple[tuple[str, tuple[int, int]], ...]  # (layer, Flax kernel (in, out))
    flatten_hwc: tuple[int, int, int]  # the (H, W, C) map flattened into denses[0]

    def flax_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """layer -> {param: shape} of the Flax params tree."""
        return {layer: {"kernel": kernel, "bias": (kernel[-1],)}
                for layer, kernel in (*self.convs, *self.denses)}

    def torch_shapes(self) -> dict[str, tuple[int, ...]]:
        """state_dict key -> shape, in the torch model's state_dict order."""
        shapes: dict[str, tuple[int, ...]] = {}
        for layer, (kh, kw, c_in, c_out) in self.convs:
            shapes[f"{layer}.weight"], shapes[f"{layer}.bias"] = (c_out, c_in, kh, kw), (c_out,)
        for layer, (n_in, n_out) in self.denses:
            shapes[f"{layer}.weight"], shapes[f"{layer}.bias"] = (n_out, n_in), (n_out,)
        return shapes


# Keyed by the names of the package's TORCH_MODELS (a test checks the two agree, and that the
# Flax shapes are the Flax models' own).
LAYOUTS: dict[str, Layout] = {
    "lenet5": Layout(
        title="LeNet-5",
        convs=(("conv1", (5, 5, 1, 6)), ("conv2", (5, 5, 6, 16))),
        denses=(("fc1", (400, 120)), ("fc2", (120, 84)), ("fc3", (84, 10))),
        flatten_hwc=(5, 5, 16)),  # the second pool's output
    "cnn": Layout(
        title="tutorial CNN",
        convs=(("conv1", (3, 3, 1, 16)), ("conv2", (3, 3, 16, 32))),
        denses=(("fc1", (1568, 128)), ("fc2", (128, 10))),
        flatten_hwc=(7, 7, 32)),  # the second pool's output
}
_COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before a wrapped module's keys


def layout(model: str) -> Layout:
    """The exchange's layout of `model`; FmnistError if the baseline has no such model."""
    check_torch_model(model)
    return LAYOUTS[model]


def _other_model_hint(names: set[str], shapes_of) -> str:
    """' (they are the cnn model's: pass model='cnn')' when `names` are another model's."""
    for name, lay in LAYOUTS.items():
        if names == set(shapes_of(lay)):
            return f" (they are the {name} model's: pass model={name!r})"
    return f" (the exchange knows the models {', '.join(TORCH_MODELS)})"


def _check_flax(params, model: str) -> Layout:
    """The model's layout, or FmnistError naming the first way `params` is not its params."""
    lay = layout(model)
    if not isinstance(params, Mapping):
        raise FmnistError(f"expected {lay.title} Flax params (a dict of layers), got "
                          f"{type(params).__name__}")
    if "params" in params and set(params) <= {"params", "batch_stats"}:
        raise FmnistError("got Flax variables {'params': ...}: pass variables['params'] "
                          "(or state.params) instead")
    flax_shapes = lay.flax_shapes()
    if set(params) != set(flax_shapes):
        raise FmnistError(f"these are not {lay.title} params: layers {sorted(params)}, expected "
                          f"{sorted(flax_shapes)}"
                          + _other_model_hint(set(params), Layout.flax_shapes))
    for name, shapes in flax_shapes.items():
        got = params[name]
        if not isinstance(got, Mapping) or set(got) != set(shapes):
            names = sorted(got) if isinstance(got, Mapping) else type(got).__name__
            raise FmnistError(f"{lay.title} layer {name} has params {names}, "
                              f"expected {sorted(shapes)}")
        for param, shape in shapes.items():
            if tuple(np.shape(got[param])) != shape:
                raise FmnistError(f"{name}.{param} has shape {tuple(np.shape(got[param]))}, "
                                  f"expected {shape} for {lay.title}")
    return lay


def _check_torch(state_dict: Mapping, model: str) -> tuple[Layout, dict[str, torch.Tensor]]:
    """The model's layout and the state_dict with a torch.compile prefix removed, or
    FmnistError naming what is off."""
    lay = layout(model)
    if not isinstance(state_dict, Mapping):
        raise FmnistError(f"expected a {lay.title} torch state_dict, got "
                          f"{type(state_dict).__name__} (pass model.state_dict())")
    if state_dict and all(k.startswith(_COMPILED_PREFIX) for k in state_dict):
        state_dict = {k[len(_COMPILED_PREFIX):]: v for k, v in state_dict.items()}
    torch_shapes = lay.torch_shapes()
    if set(state_dict) != set(torch_shapes):
        missing = sorted(set(torch_shapes) - set(state_dict))
        extra = sorted(set(state_dict) - set(torch_shapes))
        raise FmnistError(f"this is not a {lay.title} state_dict: missing {missing}, unexpected "
                          f"{extra}" + _other_model_hint(set(state_dict), Layout.torch_shapes))
    for name, shape in torch_shapes.items():
        if tuple(state_dict[name].shape) != shape:
            raise FmnistError(f"{name} has shape {tuple(state_dict[name].shape)}, expected "
                              f"{shape} for {lay.title}")
    return lay, dict(state_dict)


def fc1_flax_rows_to_torch_columns(kernel_IxO: np.ndarray,
                                   feature_hwc: tuple[int, int, int]) -> np.ndarray:
    """The flattened map's dense kernel: Flax (I = H*W*C, O), rows in H, W, C order ->
    torch weight (O, I), columns in C, H, W order."""
    h, w, c = feature_hwc
    kernel_HxWxFxO = kernel_IxO.reshape(h, w, c, -1)
    return kernel_HxWxFxO.transpose(3, 2, 0, 1).reshape(-1, h * w * c)


def fc1_torch_columns_to_flax_rows(weight_OxI: np.ndarray,
                                   feature_hwc: tuple[int, int, int]) -> np.ndarray:
    """The inverse of `fc1_flax_rows_to_torch_columns`."""
    h, w, c = feature_hwc
    weight_OxFxHxW = weight_OxI.reshape(-1, c, h, w)
    return weight_OxFxHxW.transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def _to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, order="C", copy=True))  # jax's host views are read-only


def flax_to_torch_state_dict(params: Mapping, model: str = "lenet5") -> dict[str, torch.Tensor]:
    """Flax params of `model` (a name of `baseline.TORCH_MODELS`) -> a state_dict for its torch
    model's `load_state_dict` (CPU tensors, the params' dtype). Raises FmnistError when
    `params` is not that model's params tree."""
    lay = _check_flax(params, model)
    host = {layer: {name: np.asarray(x) for name, x in params[layer].items()}
            for layer in lay.flax_shapes()}
    state_dict: dict[str, torch.Tensor] = {}
    for layer, _ in lay.convs:
        state_dict[f"{layer}.weight"] = _to_torch(host[layer]["kernel"].transpose(3, 2, 0, 1))
        state_dict[f"{layer}.bias"] = _to_torch(host[layer]["bias"])
    (flat, _), *rest = lay.denses
    state_dict[f"{flat}.weight"] = _to_torch(
        fc1_flax_rows_to_torch_columns(host[flat]["kernel"], lay.flatten_hwc))
    state_dict[f"{flat}.bias"] = _to_torch(host[flat]["bias"])
    for layer, _ in rest:
        state_dict[f"{layer}.weight"] = _to_torch(host[layer]["kernel"].T)
        state_dict[f"{layer}.bias"] = _to_torch(host[layer]["bias"])
    return state_dict


def torch_state_dict_to_flax(state_dict: Mapping, model: str = "lenet5") -> dict[str, dict]:
    """A state_dict of `model`'s torch model (any device; a torch.compile'd model's too) ->
    its Flax params, a nested dict of jax arrays. Raises FmnistError when it is not that
    model's."""
    lay, checked = _check_torch(state_dict, model)
    host = {name: t.detach().cpu().numpy() for name, t in checked.items()}
    params: dict[str, dict] = {}
    for layer, _ in lay.convs:
        params[layer] = {"kernel": host[f"{layer}.weight"].transpose(2, 3, 1, 0),
                         "bias": host[f"{layer}.bias"]}
    (flat, _), *rest = lay.denses
    params[flat] = {"kernel": fc1_torch_columns_to_flax_rows(host[f"{flat}.weight"],
                                                             lay.flatten_hwc),
                    "bias": host[f"{flat}.bias"]}
    for layer, _ in rest:
        params[layer] = {"kernel": host[f"{layer}.weight"].T, "bias": host[f"{layer}.bias"]}
    return {layer: {name: jnp.asarray(np.ascontiguousarray(x)) for name, x in p.items()}
            for layer, p in params.items()}
