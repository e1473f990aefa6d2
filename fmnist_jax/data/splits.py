"""The dataset as host arrays: `Split`, the seeded validation split, the pixel normalization."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

import numpy as np

from fmnist_jax import streams
from fmnist_jax.errors import FmnistError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclasses.dataclass(frozen=True)
class Split:
    """One whole split on the host: images uint8 (N, 28, 28, 1), labels int32 (N,)."""

    images_NxHxWx1: np.ndarray
    labels_N: np.ndarray

    def __len__(self) -> int:
        return len(self.labels_N)

    def subset(self, idx_K: np.ndarray) -> "Split":
        """The images and labels at the indices `idx_K`, in that order."""
        return Split(self.images_NxHxWx1[idx_K], self.labels_N[idx_K])


def fingerprint(split: Split) -> str:
    """SHA-256 of the images and labels, in order: the same data (from tfds or CSV) in the same
    order gives the same string, so a run can check it is evaluated on what it trained on."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(split.images_NxHxWx1, np.uint8).tobytes())
    digest.update(np.ascontiguousarray(split.labels_N, np.int32).tobytes())
    return digest.hexdigest()


def stratified_split(split: Split, fraction: float, key) -> tuple[Split, Split]:
    """(rest, held_out): `fraction` of each class held out, chosen by the jax.random `key`.

    Per class, round(fraction * class count) images go to `held_out`; both parts keep the
    original order of the images, so the split depends on nothing but the key.
    """
    rest_idx, held_idx = stratified_indices(split.labels_N, fraction, key)
    return split.subset(rest_idx), split.subset(held_idx)


def stratified_indices(labels_N: np.ndarray, fraction: float, key) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """The indices (ascending) of `stratified_split`'s two parts: (rest, held_out). Their
    lengths depend only on the class counts, not on the key."""
    import jax

    held_out = []
    classes = np.unique(labels_N)
    for c, class_key in zip(classes, jax.random.split(key, len(classes))):
        idx = np.flatnonzero(labels_N == c)
        shuffled = np.asarray(jax.random.permutation(class_key, idx))
        held_out.append(shuffled[: int(round(fraction * len(idx)))])
    mask = np.zeros(len(labels_N), bool)
    mask[np.concatenate(held_out)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split_train_val(train: Split, val_fraction: float, seed: int) -> tuple[Split, Split | None]:
    """A run's training images and its held-out validation split (None if `val_fraction` is 0).

    The same seed always holds out the same images, so the evaluation can find them again.
    """
    train_idx, val_idx = train_val_indices(train.labels_N, val_fraction, seed)
    if val_idx is None:
        return train, None
    return train.subset(train_idx), train.subset(val_idx)


def train_val_indices(labels_N: np.ndarray, val_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """`split_train_val` as indices into the given training images: (train, val), each
    ascending; val is None if `val_fraction` is 0. Several seeds' runs can then share one
    copy of the images on the device (`--seeds`), each with its own split."""
    if val_fraction == 0:
        return np.arange(len(labels_N)), None
    rest, val = stratified_indices(labels_N, val_fraction,
                                   streams.stream_key(seed, streams.VAL_SPLIT))
    if len(val) == 0:
        raise FmnistError(f"val fraction {val_fraction} holds out no image: pass 0 for no "
                          f"validation split, or a larger fraction")
    return rest, val


class Normalization(NamedTuple):
    """The model sees (x / 255 - mean) / std: pixels on the [0, 1] scale, then standardized."""

    mean: float
    std: float


HALF = Normalization(0.5, 0.5)  # ToTensor + Normalize((0.5,), (0.5,)): pixels to [-1, 1]
NORMALIZATIONS = ("half", "dataset")


def dataset_mean_std(images_NxHxWx1: np.ndarray) -> tuple[float, float]:
    """Pixel mean and std of uint8 images, on the [0, 1] scale (float64 accumulation)."""
    pixels = images_NxHxWx1.astype(np.float64) / 255.0
    return float(pixels.mean()), float(pixels.std())


def normalization_for(kind: str, train_images_NxHxWx1: np.ndarray) -> Normalization:
    """`kind` "half": HALF; "dataset": the training images' own pixel mean and std."""
    if kind == "dataset":
        return Normalization(*dataset_mean_std(train_images_NxHxWx1))
    return HALF
