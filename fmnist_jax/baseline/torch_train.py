"""The PyTorch side of a head-to-head: a torch model (`torch_models`), CrossEntropyLoss and
constant-rate Adam, pixels normalized with mean 0.5 and std 0.5 (ToTensor + Normalize((0.5,),
(0.5,))): the recipe of the LeNet-5 report (batch 64) and of the tutorial CNN (batch 32), which
differ only in the model and the batch size.

It reads the same uint8 numpy arrays as the JAX side (`data.Split`), through one of two input
pipelines, so a benchmark can tell the framework apart from the pipeline:

- torch-dataloader, as PyTorch tutorials do it: a per-sample `Dataset` that makes each
  (28, 28, 1) uint8 image a normalized float (1, 28, 28) tensor (what ToTensor + Normalize
  do), batched by a shuffling `DataLoader` (seeded generator, num_workers=0) that keeps the
  last partial batch;
- torch-tensors: the whole split as one uint8 tensor on the device, each batch gathered by index and
  normalized there, the last partial batch dropped as on the JAX side; optionally with the
  model under `torch.compile`.

Both can train on an explicit (steps, batch) index order, e.g. `order.jax_epoch_batch_order`'s,
so torch and JAX can be compared from the same init on the same batches.

Torch on CUDA runs convolutions in TF32 by default (torch.backends.cudnn.allow_tf32), and the
equality checks of the tests run on CPU only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np

from fmnist_jax.baseline import require_torch
from fmnist_jax.data import HALF, Normalization
from fmnist_jax.errors import FmnistError
from fmnist_jax.files import first_line

require_torch()  # a one-line FmnistError, not an ImportError traceback, when torch is missing
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from fmnist_jax.baseline.exchange import flax_to_torch_state_dict  # noqa: E402
from fmnist_jax.baseline.torch_models import make_torch_model  # noqa: E402


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu' or 'cuda' (or 'cuda:N') as a torch.device; FmnistError if it cannot be used."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FmnistError(f"unknown torch device {device!r}: use 'cpu' or 'cuda'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FmnistError(f"torch device {device!r} asked for, but this torch "
                          f"({torch.__version__}) sees no CUDA GPU: use 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise FmnistError(f"torch device {device!r} is not supported here: use 'cpu' or 'cuda'")
    return dev


class TorchSums(NamedTuple):
    """Sums over examples, as the JAX side's `steps.Sums`: divide once on the host."""

    loss: float  # sum of per-example cross-entropy
    correct: int  # number of correct top-1 predictions
    count: int  # number of examples


@dataclasses.dataclass
class TorchSetup:
    """A model, its Adam, the device, and the callable that runs the model (the model
    itself, or its torch.compile wrapper: same parameters either way)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    forward: Callable[[torch.Tensor], torch.Tensor]
    compiled: bool = False


def make_setup(*, model: str = "lenet5", learning_rate: float = 1e-3, device: str = "cpu",
               seed: int = 0, params=None, compile: bool = False) -> TorchSetup:
    """The torch version of the Flax model named `model` (`torch_models`) + Adam(learning_rate)
    on `device`.

    The weights are torch's default init drawn from `seed` (the global torch RNG is left as it
    was), or, when `params` (that model's Flax params) is given, exactly those: the way to
    start torch from the JAX side's init. `compile=True` wraps the model in torch.compile; its
    first batch then compiles (tens of seconds on CPU, and it needs a C++ compiler there).
    """
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make_torch_model(model)
    if params is not None:
        net.load_state_dict(flax_to_torch_state_dict(params, model))
    net = net.to(dev)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    forward: Callable = net
    if compile:
        if not hasattr(torch, "compile"):
            raise FmnistError(f"torch {torch.__version__} has no torch.compile: drop --compile")
        forward = torch.compile(net)
    return TorchSetup(model=net, optimizer=optimizer, device=dev, forward=forward,
                      compiled=compile)


# ---------------------------------------------------------------- torch-dataloader pipeline


def normalize_uint8(images_uint8: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """uint8 pixels -> (x / 255 - mean) / std in float32: ToTensor then Normalize."""
    return (images_uint8.to(torch.float32) / 255.0 - norm.mean) / norm.std


class PerSampleDataset(Dataset):
    """One example at a time, as torchvision's FashionMNIST + ToTensor + Normalize give it:
    a normalized float32 (1, 28, 28) image tensor and an int label."""

    def __init__(self, images_NxHxWx1: np.ndarray, labels_N: np.ndarray,
                 norm: Normalization = HALF):
        _check_arrays(images_NxHxWx1, labels_N)
        self.images_NxHxWx1 = images_NxHxWx1
        self.labels_N = labels_N
        self.norm = norm

    def __len__(self) -> int:
        return len(self.labels_N)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image_1xHxW = torch.tensor(self.images_NxHxWx1[i].reshape(1, 28, 28))  # a copy, as ToTensor
        return normalize_uint8(image_1xHxW, self.norm), int(self.labels_N[i])


def dataloader(dataset: PerSampleDataset, *, batch_size: int = 64, seed: int = 0,
                      shuffle: bool = True,
                      batches_SxB: np.ndarray | None = None) -> DataLoader:
    """The tutorials' DataLoader: `batch_size`, shuffled by a torch.Generator seeded with `seed`
    (a new order each pass), num_workers=0, last partial batch kept.

    With `batches_SxB` (a (steps, batch) index array, e.g. the JAX side's order) it yields
    exactly those batches instead, still through the per-sample Dataset.
    """
    if batches_SxB is not None:
        return DataLoader(dataset, batch_sampler=_check_order(batches_SxB, len(dataset)).tolist(),
                          num_workers=0)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=0, drop_last=False)


def train_epoch_dataloader(setup: TorchSetup, loader: Iterable) -> TorchSums:
    """One pass over `loader`'s (float images, labels) batches, one Adam step each."""
    setup.model.train()
    sums = _DeviceSums(setup.device)
    for step, (host_images_Bx1xHxW, host_labels_B) in enumerate(loader):
        x_Bx1xHxW = host_images_Bx1xHxW.to(setup.device, non_blocking=True)
        labels_B = host_labels_B.to(setup.device, non_blocking=True)
        if step == 0 and setup.compiled:
            sums.add(*_first_compiled_step(setup, x_Bx1xHxW, labels_B))
        else:
            sums.add(*_optimizer_step(setup, x_Bx1xHxW, labels_B))
    return sums.result()


# ---------------------------------------------------------------- torch-tensors pipeline


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A whole split on the device: uint8 images (N, 1, 28, 28), int64 labels (N,)."""

    images_Nx1xHxW: torch.Tensor
    labels_N: torch.Tensor

    def __len__(self) -> int:
        return self.labels_N.shape[0]

    @property
    def device(self) -> torch.device:
        return self.labels_N.device


def to_device_split(images_NxHxWx1: np.ndarray, labels_N: np.ndarray,
                    device: str = "cpu") -> DeviceSplit:
    """Copy a host split (data.Split's arrays) to `device` once, still as compact uint8."""
    _check_arrays(images_NxHxWx1, labels_N)
    dev = resolve_device(device)
    # With C = 1, NHWC -> NCHW is a reshape; it gives plain NCHW strides, where a transpose
    # would give channels-last ones and send the convolutions down another kernel path.
    # A copy (torch.tensor), not from_numpy: the host array may be read-only or reused.
    images_Nx1xHxW = torch.tensor(images_NxHxWx1.reshape(len(images_NxHxWx1), 1, 28, 28))
    int64_labels_N = torch.from_numpy(labels_N.astype(np.int64))
    return DeviceSplit(images_Nx1xHxW.to(dev), int64_labels_N.to(dev))


def torch_batch_order(n: int, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """A fresh shuffle as (n // batch_size, batch_size) indices; the rest is dropped."""
    if batch_size < 1 or n < batch_size:
        raise FmnistError(f"batch size {batch_size} does not fit {n} examples: "
                          f"need 1 <= batch size <= n")
    steps = n // batch_size
    order_N = torch.randperm(n, generator=generator)
    return order_N[: steps * batch_size].reshape(steps, batch_size).numpy()


def train_epoch_tensors(setup: TorchSetup, data: DeviceSplit, batches_SxB: np.ndarray, *,
                      norm: Normalization = HALF) -> TorchSums:
    """One Adam step per row of `batches_SxB` (indices into `data`): the batch is gathered
    and normalized on the device. Get the order from `torch_batch_order` or, to match the JAX
    side, `order.jax_epoch_batch_order`."""
    if data.device != setup.device:
        raise FmnistError(f"the data is on {data.device} but the model on {setup.device}: "
                          f"build both with the same device")
    order_SxB = torch.from_numpy(_check_order(batches_SxB, len(data))).to(setup.device)
    setup.model.train()
    sums = _DeviceSums(setup.device)
    for step, idx_B in enumerate(order_SxB):
        x_Bx1xHxW = normalize_uint8(data.images_Nx1xHxW[idx_B], norm)
        labels_B = data.labels_N[idx_B]
        if step == 0 and setup.compiled:
            sums.add(*_first_compiled_step(setup, x_Bx1xHxW, labels_B))
        else:
            sums.add(*_optimizer_step(setup, x_Bx1xHxW, labels_B))
    return sums.result()


@torch.no_grad()
def evaluate(setup: TorchSetup, data: DeviceSplit, *, batch_size: int = 1000,
             norm: Normalization = HALF) -> TorchSums:
    """Summed loss and correct count over every example of `data` (the last batch is
    simply shorter; nothing dropped). Runs the plain model: no recompiles for its shape."""
    setup.model.eval()
    sums = _DeviceSums(data.device)
    for start in range(0, len(data), batch_size):
        x_Bx1xHxW = normalize_uint8(data.images_Nx1xHxW[start:start + batch_size], norm)
        labels_B = data.labels_N[start:start + batch_size]
        logits_BxC = setup.model(x_Bx1xHxW)
        loss_sum = F.cross_entropy(logits_BxC, labels_B, reduction="sum")
        sums.add(loss_sum, (logits_BxC.argmax(dim=1) == labels_B).sum(), labels_B.shape[0])
    return sums.result()


# ---------------------------------------------------------------- shared pieces


class _DeviceSums:
    """Accumulates on the device, so the loop never waits for the GPU; one sync at the end."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        self.loss += loss_sum.detach().to(torch.float64)
        self.correct += correct
        self.count += count

    def result(self) -> TorchSums:
        return TorchSums(loss=float(self.loss.item()), correct=int(self.correct.item()),
                         count=self.count)


def _optimizer_step(setup: TorchSetup, x_Bx1xHxW: torch.Tensor,
                    labels_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One Adam step on the batch's mean cross-entropy (nn.CrossEntropyLoss's default);
    returns (loss sum, correct count, batch size) without syncing the device."""
    logits_BxC = setup.forward(x_Bx1xHxW)
    loss = F.cross_entropy(logits_BxC, labels_B)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimizer.step()
    correct = (logits_BxC.detach().argmax(dim=1) == labels_B).sum()
    batch = labels_B.shape[0]
    return loss.detach() * batch, correct, batch


def _first_compiled_step(setup: TorchSetup, x_Bx1xHxW: torch.Tensor, labels_B: torch.Tensor):
    """The first step of a compiled model, where torch.compile actually compiles: its
    failures (no C++ compiler, no Python headers, an unsupported backend) become one line."""
    try:
        return _optimizer_step(setup, x_Bx1xHxW, labels_B)
    except Exception as e:  # dynamo/inductor raise many types; all mean "compile failed"
        if not _is_compile_error(e):
            raise
        raise FmnistError(f"torch.compile failed on {setup.device} ({type(e).__name__}: "
                          f"{first_line(e, 300)}): run without --compile") from e


def _is_compile_error(e: BaseException) -> bool:
    module = type(e).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or \
        isinstance(e, (OSError, ImportError))


def _check_arrays(images_NxHxWx1: np.ndarray, labels_N: np.ndarray) -> None:
    if not (isinstance(images_NxHxWx1, np.ndarray) and images_NxHxWx1.dtype == np.uint8
            and images_NxHxWx1.ndim == 4 and images_NxHxWx1.shape[1:] == (28, 28, 1)):
        raise FmnistError(f"expected uint8 images of shape (N, 28, 28, 1), got "
                          f"{getattr(images_NxHxWx1, 'dtype', type(images_NxHxWx1).__name__)} "
                          f"{getattr(images_NxHxWx1, 'shape', '')}")
    if np.shape(labels_N) != (images_NxHxWx1.shape[0],):
        raise FmnistError(f"expected {images_NxHxWx1.shape[0]} labels, got shape "
                          f"{np.shape(labels_N)}")


def _check_order(batches_SxB: np.ndarray, n: int) -> np.ndarray:
    order_SxB = np.asarray(batches_SxB)
    if (order_SxB.ndim != 2 or order_SxB.size == 0
            or not np.issubdtype(order_SxB.dtype, np.integer)):
        raise FmnistError(f"a batch order must be a non-empty (steps, batch) integer array, "
                          f"got {order_SxB.dtype} {order_SxB.shape}")
    if order_SxB.min() < 0 or order_SxB.max() >= n:
        raise FmnistError(f"batch order indices run {order_SxB.min()}..{order_SxB.max()}, "
                          f"outside the {n} examples")
    return order_SxB.astype(np.int64)
