"""The PyTorch baseline: the project's recipes in PyTorch, to compare the JAX side against.

- `torch_models`: the torch versions of the Flax models the baseline has (LeNet-5 and the
  tutorial CNN), with the Flax layer names;
- `torch_train`: the recipe (cross-entropy, constant-rate Adam, pixels to [-1, 1]), the
  torch-dataloader (per-sample Dataset + DataLoader) and torch-tensors (whole split on the
  device, index batches) input pipelines, training and evaluation;
- `exchange`: Flax params <-> torch state_dict for each of those models, exact both ways;
- `order`: the JAX side's batch order and init from its keys, so torch can be fed the same
  batches from the same init (needs only jax, not torch).

Torch is imported only by the modules of this package, and only when they are imported:
`import fmnist_jax.baseline` itself needs nothing beyond the JAX side, so the bench can check
its flags against `TORCH_MODELS` before anything heavy is loaded.
"""

from __future__ import annotations

from fmnist_jax.errors import FmnistError

# The Flax models (names of `models.MODELS`) that have a torch twin and a weight exchange.
# `torch_models` and `exchange` each map exactly these names (tests/test_baseline.py checks).
TORCH_MODELS = ("lenet5", "cnn")


def require_torch() -> None:
    """FmnistError with the install command when torch is missing (the JAX side never needs
    it; only this package does), instead of an ImportError traceback."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise FmnistError("the PyTorch baseline needs torch: pip install 'fmnist_jax[torch]' "
                          "(on a CPU-only machine install torch==2.13.0 first)") from e


def check_torch_model(model: str) -> None:
    """FmnistError unless the baseline has a torch version of `model`."""
    if model not in TORCH_MODELS:
        raise FmnistError(f"the PyTorch baseline has no {model!r} model: use one of "
                          f"{', '.join(TORCH_MODELS)}")
