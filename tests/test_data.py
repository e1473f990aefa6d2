import shutil
import subprocess
import sys

import numpy as np
import pytest

from fmnist_jax import FmnistError, data
from tests.helpers import REPO


@pytest.fixture
def copied_manual_dir(manual_dir, tmp_path):
    """A writable copy of the official files, to damage one at a time."""
    target = tmp_path / "manual"
    target.mkdir()
    for name in data.MANUAL_FILES:
        shutil.copy(manual_dir / name, target / name)
    return target


def test_missing_file_is_named(copied_manual_dir, tmp_path):
    (copied_manual_dir / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FmnistError, match="train-labels-idx1-ubyte.gz is missing"):
        data.prepare(tmp_path / "tfds", copied_manual_dir)


def test_empty_file_is_named(copied_manual_dir, tmp_path):
    (copied_manual_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(FmnistError, match="t10k-labels-idx1-ubyte.gz is empty"):
        data.prepare(tmp_path / "tfds", copied_manual_dir)


def test_missing_manual_dir_names_the_option(tmp_path):
    with pytest.raises(FmnistError, match="does not exist: pass --manual-dir"):
        data.prepare(tmp_path / "tfds", tmp_path / "nowhere")


def test_truncated_file_fails_its_checksum(copied_manual_dir, tmp_path):
    path = copied_manual_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(FmnistError, match=r"t10k-images-idx3-ubyte.gz has the wrong checksum"):
        data.prepare(tmp_path / "tfds", copied_manual_dir)
    assert not data.is_prepared(tmp_path / "tfds")


def test_no_internet_and_no_manual_dir_fails_fast_with_one_line(tmp_path):
    """The CLI path end to end: one line naming --manual-dir and exit 1 (the subprocess's
    timeout stands for "fast": tfds alone would retry for minutes)."""
    code = ("import fmnist_jax.data.tfds_source as d; d.DOWNLOAD_HOST = 'fashion-mnist.invalid'; "
            "from fmnist_jax.cli import train_main; train_main(['--epochs', '1', "
            f"'--data-dir', {str(tmp_path / 'tfds')!r}, '--workdir', {str(tmp_path / 'run')!r}])")
    env = {k: v for k, v in __import__("os").environ.items() if k != data.MANUAL_DIR_ENV}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--manual-dir" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_real_splits(fashion_mnist):
    train, test = fashion_mnist
    assert train.images_NxHxWx1.shape == (60_000, 28, 28, 1)
    assert test.images_NxHxWx1.shape == (10_000, 28, 28, 1)
    assert train.images_NxHxWx1.dtype == np.uint8 and train.labels_N.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(train.labels_N), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels_N), [1000] * 10)


@pytest.mark.slow
def test_class_names_match_tfds(fashion_mnist):
    import tensorflow_datasets as tfds
    import os
    builder = tfds.builder("fashion_mnist", data_dir=str(data.resolve_data_dir(
        os.environ.get("FMNIST_DATA_DIR"))))
    if builder.info.features is None:
        pytest.skip("prepared folder not in FMNIST_DATA_DIR")
    assert tuple(builder.info.features["label"].names) == data.CLASS_NAMES
