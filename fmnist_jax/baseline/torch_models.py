"""The torch versions of the Flax models the baseline has, picked by the Flax model's name.

Each has the same layer names as its Flax twin (conv1 is conv1, fc1 is fc1), so the weight
exchange (`exchange`) maps layer to layer. Inputs are normalized float images (B, 1, 28, 28),
NCHW; outputs are logits (B, 10). Torch flattens a feature map in C, H, W order, Flax in
H, W, C: the exchange permutes the inputs of the dense layer after the flatten to match.
"""

from __future__ import annotations

from fmnist_jax.baseline import check_torch_model, require_torch
from fmnist_jax.models import NUM_CLASSES

require_torch()  # a one-line FmnistError, not an ImportError traceback, when torch is missing
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


class TorchLeNet5(nn.Module):
    """LeNet-5 as the report's layer table, 61,706 parameters: Flax `models.LeNet5`."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x_Bx1xHxW: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x_Bx1xHxW)), 2)  # (B, 6, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, 5, 5)
        x = torch.flatten(x, 1)  # (B, 400), C, H, W order
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class TorchTutorialCNN(nn.Module):
    """The tutorial's CNN, 206,922 parameters: Flax `models.TutorialCNN`.

    conv 16@3x3 pad 1, ReLU, pool 2 -> conv 32@3x3 pad 1, ReLU, pool 2 -> flatten 1568
    -> dense 128, ReLU -> dense 10.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x_Bx1xHxW: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x_Bx1xHxW)), 2)  # (B, 16, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 7, 7)
        # flatten(x, 1), not view(-1, 1568): an input of the wrong size must fail here, not be
        # silently regrouped into another number of rows.
        x = torch.flatten(x, 1)  # (B, 1568), C, H, W order
        x = F.relu(self.fc1(x))
        return self.fc2(x)


# Keyed by the names of the package's TORCH_MODELS (a test checks the two agree).
_CLASSES: dict[str, type[nn.Module]] = {"lenet5": TorchLeNet5, "cnn": TorchTutorialCNN}


def make_torch_model(model: str) -> nn.Module:
    """A fresh torch model for the Flax model named `model`, with torch's default init drawn
    from the global torch RNG. FmnistError if the baseline has no such model."""
    check_torch_model(model)
    return _CLASSES[model]()


def count_torch_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
