"""LeNet-5 weights between Flax params and a torch state_dict, exact in both directions.

Three layout differences, and nothing else (no arithmetic, so a round trip is bitwise):
- conv kernels: Flax (kh, kw, Cin, Cout) "HWIO" <-> torch weight (Cout, Cin, kh, kw) "OIHW";
- dense kernels: Flax (in, out) <-> torch weight (out, in);
- fc1's 400 inputs: Flax flattens the (H=5, W=5, C=16) feature map in H, W, C order, torch
  flattens (C=16, H=5, W=5) in C, H, W order, so fc1's input rows are permuted between the two.
Biases are the same vectors on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from fmnist_jax.errors import FmnistError

try:
    import torch
except ImportError as e:  # the JAX side never needs torch; only the baseline does
    raise FmnistError("the PyTorch baseline needs torch: pip install 'fmnist_jax[torch]' "
                      "(on a CPU-only machine install torch==2.13.0 first)") from e

# The feature map fc1 reads, as (H, W, C): LeNet5's second pool output.
FC1_FEATURE_HWC = (5, 5, 16)

# Flax LeNet5 param shapes, layer -> {param: shape}; the torch shapes follow from these.
FLAX_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "conv1": {"kernel": (5, 5, 1, 6), "bias": (6,)},
    "conv2": {"kernel": (5, 5, 6, 16), "bias": (16,)},
    "fc1": {"kernel": (400, 120), "bias": (120,)},
    "fc2": {"kernel": (120, 84), "bias": (84,)},
    "fc3": {"kernel": (84, 10), "bias": (10,)},
}
TORCH_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
    "fc1.weight": (120, 400), "fc1.bias": (120,),
    "fc2.weight": (84, 120), "fc2.bias": (84,),
    "fc3.weight": (10, 84), "fc3.bias": (10,),
}
_COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before a wrapped module's keys


def _check_flax(params) -> None:
    """Raise FmnistError naming the first way `params` is not a LeNet5 params tree."""
    if not isinstance(params, Mapping):
        raise FmnistError(f"expected LeNet-5 Flax params (a dict of layers), got "
                          f"{type(params).__name__}")
    if "params" in params and set(params) <= {"params", "batch_stats"}:
        raise FmnistError("got Flax variables {'params': ...}: pass variables['params'] "
                          "(or state.params) instead")
    if set(params) != set(FLAX_SHAPES):
        raise FmnistError(f"these are not LeNet-5 params: layers {sorted(params)}, expected "
                          f"{sorted(FLAX_SHAPES)} (only the lenet5 model can be exchanged)")
    for layer, shapes in FLAX_SHAPES.items():
        got = params[layer]
        if not isinstance(got, Mapping) or set(got) != set(shapes):
            names = sorted(got) if isinstance(got, Mapping) else type(got).__name__
            raise FmnistError(f"LeNet-5 layer {layer} has params {names}, "
                              f"expected {sorted(shapes)}")
        for name, shape in shapes.items():
            if tuple(np.shape(got[name])) != shape:
                raise FmnistError(f"{layer}.{name} has shape {tuple(np.shape(got[name]))}, "
                                  f"expected {shape} for LeNet-5")


def _check_torch(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """The state_dict with a torch.compile prefix removed, or FmnistError naming what is off."""
    if not isinstance(state_dict, Mapping):
        raise FmnistError(f"expected a LeNet-5 torch state_dict, got {type(state_dict).__name__}"
                          f" (pass model.state_dict())")
    if state_dict and all(k.startswith(_COMPILED_PREFIX) for k in state_dict):
        state_dict = {k[len(_COMPILED_PREFIX):]: v for k, v in state_dict.items()}
    if set(state_dict) != set(TORCH_SHAPES):
        missing = sorted(set(TORCH_SHAPES) - set(state_dict))
        extra = sorted(set(state_dict) - set(TORCH_SHAPES))
        raise FmnistError(f"this is not a LeNet-5 state_dict: missing {missing}, unexpected "
                          f"{extra} (only the lenet5 model can be exchanged)")
    for name, shape in TORCH_SHAPES.items():
        if tuple(state_dict[name].shape) != shape:
            raise FmnistError(f"{name} has shape {tuple(state_dict[name].shape)}, expected "
                              f"{shape} for LeNet-5")
    return dict(state_dict)


def fc1_flax_rows_to_torch_columns(kernel_400xO: np.ndarray) -> np.ndarray:
    """fc1's Flax kernel (400, out), rows in H, W, C order -> torch weight (out, 400),
    columns in C, H, W order."""
    h, w, c = FC1_FEATURE_HWC
    kernel_HxWxIxO = kernel_400xO.reshape(h, w, c, -1)
    return kernel_HxWxIxO.transpose(3, 2, 0, 1).reshape(-1, h * w * c)


def fc1_torch_columns_to_flax_rows(weight_Ox400: np.ndarray) -> np.ndarray:
    """The inverse of `fc1_flax_rows_to_torch_columns`."""
    h, w, c = FC1_FEATURE_HWC
    weight_OxIxHxW = weight_Ox400.reshape(-1, c, h, w)
    return weight_OxIxHxW.transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def _to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, order="C", copy=True))  # jax's host views are read-only


def flax_to_torch_state_dict(params: Mapping) -> dict[str, torch.Tensor]:
    """LeNet5 Flax params -> a state_dict for `TorchLeNet5.load_state_dict` (CPU tensors,
    the params' dtype). Raises FmnistError when `params` is not a LeNet5 params tree."""
    _check_flax(params)
    host = {layer: {name: np.asarray(x) for name, x in params[layer].items()}
            for layer in FLAX_SHAPES}
    state_dict: dict[str, torch.Tensor] = {}
    for layer in ("conv1", "conv2"):
        state_dict[f"{layer}.weight"] = _to_torch(host[layer]["kernel"].transpose(3, 2, 0, 1))
        state_dict[f"{layer}.bias"] = _to_torch(host[layer]["bias"])
    state_dict["fc1.weight"] = _to_torch(fc1_flax_rows_to_torch_columns(host["fc1"]["kernel"]))
    state_dict["fc1.bias"] = _to_torch(host["fc1"]["bias"])
    for layer in ("fc2", "fc3"):
        state_dict[f"{layer}.weight"] = _to_torch(host[layer]["kernel"].T)
        state_dict[f"{layer}.bias"] = _to_torch(host[layer]["bias"])
    return state_dict


def torch_state_dict_to_flax(state_dict: Mapping) -> dict[str, dict]:
    """A TorchLeNet5 state_dict (any device; a torch.compile'd model's too) -> LeNet5 Flax
    params, a nested dict of jax arrays. Raises FmnistError when it is not LeNet-5's."""
    checked = _check_torch(state_dict)
    host = {name: t.detach().cpu().numpy() for name, t in checked.items()}
    params: dict[str, dict] = {}
    for layer in ("conv1", "conv2"):
        params[layer] = {"kernel": host[f"{layer}.weight"].transpose(2, 3, 1, 0),
                         "bias": host[f"{layer}.bias"]}
    params["fc1"] = {"kernel": fc1_torch_columns_to_flax_rows(host["fc1.weight"]),
                     "bias": host["fc1.bias"]}
    for layer in ("fc2", "fc3"):
        params[layer] = {"kernel": host[f"{layer}.weight"].T, "bias": host[f"{layer}.bias"]}
    return {layer: {name: jnp.asarray(np.ascontiguousarray(x)) for name, x in p.items()}
            for layer, p in params.items()}
