"""Shared fixtures: tiny synthetic splits for fast tests, the real dataset for slow ones.
Helpers that tests import live in tests/helpers.py."""

import os
from pathlib import Path

import jax
import pytest

from tests.helpers import SHARED_MANUAL_DIR, make_split, tiny_config, train_quietly

# Catch (B,) vs (B, 1) slips: implicit rank promotion raises in every test.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def tiny_splits():
    return make_split(512, seed=0), make_split(300, seed=1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run_dir, final state, history): two epochs of LeNet-5 on `tiny_splits` data."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    state, history = train_quietly(tiny_config(), run_dir,
                                   (make_split(512, seed=0), make_split(300, seed=1)))
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
