"""Shared fixtures: tiny synthetic splits for fast tests, the real dataset for slow ones."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from fmnist_jax.data import Split

# Catch (B,) vs (B, 1) slips: implicit rank promotion raises in every test.
jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = Path(__file__).resolve().parents[1]
SHARED_MANUAL_DIR = REPO.parent / "shared" / "datasets" / "fashion_mnist"


def make_split(n: int, seed: int = 0) -> Split:
    """n learnable images: class c has a bright horizontal bar at row 2c+4, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 4: 2 * c + 6, 4:24, 0] = 250
    return Split(images_NxHxWx1=images, labels_N=labels)


@pytest.fixture
def tiny_splits():
    return make_split(512, seed=0), make_split(300, seed=1)


def tiny_config():
    """The config of the shared tiny run. Tests that train again use it too, so that XLA
    compiles the epoch once (no validation split: the run is uncalibrated)."""
    from fmnist_jax.config import get_config

    return get_config(epochs=2, batch_size=32, eval_batch_size=100, val_fraction=0.0, seed=4)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run_dir, final state, history): two epochs of LeNet-5 on `tiny_splits` data."""
    from fmnist_jax.train import train_and_evaluate

    run_dir = tmp_path_factory.mktemp("tiny_run")
    state, history = train_and_evaluate(tiny_config(), run_dir, train=make_split(512, seed=0),
                                        test=make_split(300, seed=1), log_fn=lambda s: None,
                                        progress=False)
    return run_dir, state, history


@pytest.fixture(scope="session")
def manual_dir() -> Path:
    """The official .gz files: $FMNIST_MANUAL_DIR or ../shared/datasets/fashion_mnist."""
    path = Path(os.environ.get("FMNIST_MANUAL_DIR", SHARED_MANUAL_DIR))
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no Fashion-MNIST files in {path}")
    return path


@pytest.fixture(scope="session")
def prepared_data_dir(manual_dir, tmp_path_factory) -> Path:
    """A tfds data dir holding the prepared dataset: $FMNIST_DATA_DIR (or a temp dir)."""
    from fmnist_jax.data import prepare

    return prepare(os.environ.get("FMNIST_DATA_DIR") or tmp_path_factory.mktemp("tfds"),
                   manual_dir)


@pytest.fixture(scope="session")
def fashion_mnist(prepared_data_dir):
    """The real (train, test) splits."""
    from fmnist_jax.data import load_fashion_mnist

    return load_fashion_mnist(data_dir=prepared_data_dir)
