"""A run's model as a PyTorch state_dict, for the models the baseline defines.

The weights go through the baseline's exchange (`exchange.flax_to_torch_state_dict`, exact),
and are saved with `torch.save` so that `torch.load(path, weights_only=True)` reads them; the
JSON beside the file names the class of `torch_models` to load them into. The torch model
takes normalized float images (N, 1, 28, 28) and returns logits: the JSON gives the
normalization and the calibration map to apply around them ("calibration", applied as
`calibration.apply_calibration` does; "load" spells it out in torch).
"""

from __future__ import annotations

import io
from typing import Any

from fmnist_jax.baseline import TORCH_MODELS, require_torch
from fmnist_jax.errors import FmnistError


# The calibration map in torch, on the model's logits z, with the JSON's "calibration" fields.
TORCH_MAPS = {"temperature": "z / temperature", "vector": "z * w + b",
              "dirichlet": "log_softmax(z, dim=1) @ W.T + b"}


def check(model: str, logits: bool) -> None:
    """Before any weight is read: a model the baseline has, torch installed, no --logits."""
    if model not in TORCH_MODELS:
        raise FmnistError(f"the torch format cannot carry the {model!r} model: the PyTorch "
                          f"baseline (fmnist_jax/baseline/torch_models.py) defines only "
                          f"{', '.join(TORCH_MODELS)}: export it as stablehlo or onnx")
    if logits:
        raise FmnistError("--logits is for stablehlo and onnx: the torch model already "
                          "returns logits; drop --logits")
    require_torch()


def export_torch(predictor, logits: bool = False) -> tuple[bytes, dict[str, Any]]:
    """(the state_dict as torch.save's bytes, the fields it adds to the JSON beside it)."""
    import torch

    from fmnist_jax.baseline import exchange, torch_models

    model = predictor.config.model
    state_dict = exchange.flax_to_torch_state_dict(predictor.variables["params"], model)
    buffer = io.BytesIO()  # the archive's inner folder is then "archive", whatever the path
    torch.save(state_dict, buffer)
    cls = type(torch_models.make_torch_model(model))
    return buffer.getvalue(), {
        "torch_class": f"{cls.__module__}.{cls.__qualname__}",
        "torch_version": torch.__version__.split("+")[0],
        "input": {"dtype": "float32", "shape": ["N", 1, 28, 28],
                  "meaning": "normalized pixels (pixels / 255 - mean) / std, NCHW"},
        "outputs": ["logits"],
        "load": "model.load_state_dict(torch.load(path, weights_only=True)); "
                "probabilities = softmax(" + TORCH_MAPS[predictor.calibration["kind"]]
                + ", dim=1)"}


export_torch.check = check
