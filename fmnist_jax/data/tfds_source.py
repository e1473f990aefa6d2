"""Fashion-MNIST as whole uint8 arrays, through tfds's `fashion_mnist` builder.

Two paths, one prepared folder:
- build: `download_and_prepare` in array_record format (needs TensorFlow, imported lazily by
  tfds), from the internet or, offline, from a manual dir holding the four official `.gz` files;
- read: `tfds.data_source` over the prepared folder, which needs no TensorFlow, so a GPU box
  without TF reads a folder prepared elsewhere.

Every failure a user can meet here (no internet and no manual dir, a missing, empty, truncated
or foreign file) becomes one FmnistError line that names the file and the fix.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import numpy as np

from fmnist_jax.data.splits import Split
from fmnist_jax.errors import FmnistError

MANUAL_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)
DATA_DIR_ENV = "FMNIST_DATA_DIR"
MANUAL_DIR_ENV = "FMNIST_MANUAL_DIR"
DOWNLOAD_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"  # tfds's source URL host
_MANUAL_HINT = (f"pass --manual-dir DIR (or set {MANUAL_DIR_ENV}=DIR), a folder holding the four "
                f"official .gz files of the Fashion-MNIST release ({', '.join(MANUAL_FILES)})")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The tfds data dir: the argument, else $FMNIST_DATA_DIR, else ~/tensorflow_datasets."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
    return Path(chosen).expanduser()


def resolve_manual_dir(manual_dir: str | os.PathLike | None = None) -> Path | None:
    """The manual dir: the argument, else $FMNIST_MANUAL_DIR, else None (download)."""
    chosen = manual_dir or os.environ.get(MANUAL_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def _tfds(data_dir: Path):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # a GPU box without tfds
        raise FmnistError(
            "tensorflow-datasets is not installed: install it (pip install tensorflow-datasets "
            f"array_record) to read a prepared folder under {data_dir}") from e
    return tfds


def _hide_gpus_from_tensorflow() -> None:
    """TF, imported only to build the dataset, must not take GPU memory that JAX needs."""
    try:
        import tensorflow as tf
    except ImportError:
        return  # tfds then fails with a message we translate below
    tf.config.set_visible_devices([], "GPU")


def is_prepared(data_dir: Path) -> bool:
    return any(data_dir.glob("fashion_mnist/*/dataset_info.json"))


def check_manual_dir(manual_dir: Path) -> None:
    """Fail fast on a manual dir that tfds would otherwise try to complete from the internet."""
    if not manual_dir.is_dir():
        raise FmnistError(f"manual dir {manual_dir} does not exist: {_MANUAL_HINT}")
    for name in MANUAL_FILES:
        path = manual_dir / name
        if not path.is_file():
            raise FmnistError(f"{path} is missing: copy the official Fashion-MNIST file there")
        if path.stat().st_size == 0:
            raise FmnistError(f"{path} is empty: copy the official Fashion-MNIST file there again")


def _host_reachable(host: str, timeout_s: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 80), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def prepare(data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None) -> Path:
    """Build the array_record folder under `data_dir` unless it is there; return `data_dir`."""
    data_dir, manual_dir = resolve_data_dir(data_dir), resolve_manual_dir(manual_dir)
    if is_prepared(data_dir):
        return data_dir
    if manual_dir is not None:
        check_manual_dir(manual_dir)
    elif not _host_reachable(DOWNLOAD_HOST):
        # tfds would retry for minutes and end in a long ConnectionError traceback.
        raise FmnistError(f"Fashion-MNIST is not prepared in {data_dir} and {DOWNLOAD_HOST} "
                          f"cannot be reached: {_MANUAL_HINT}")
    tfds = _tfds(data_dir)
    _hide_gpus_from_tensorflow()
    builder = tfds.builder("fashion_mnist", data_dir=str(data_dir), file_format="array_record")
    download_config = tfds.download.DownloadConfig(
        manual_dir=str(manual_dir) if manual_dir else None,
        try_download_gcs=manual_dir is None)
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    try:
        builder.download_and_prepare(download_config=download_config)
    except NonMatchingChecksumError as e:
        found = re.search(r"downloaded to (\S+?),", str(e))
        bad_file = found.group(1) if found else "a Fashion-MNIST file"
        raise FmnistError(f"{bad_file} has the wrong checksum (truncated, or not the official "
                          f"release file): replace it with the official .gz file") from e
    except ModuleNotFoundError as e:
        raise FmnistError(f"building the dataset needs {e.name}: pip install tensorflow-cpu, or "
                          f"copy a folder prepared elsewhere to {data_dir}") from e
    except (EOFError, OSError) as e:  # a corrupt .gz that somehow passed the checksum
        raise FmnistError(f"reading the Fashion-MNIST files failed ({e}): replace the files in "
                          f"{manual_dir or 'the download folder'} with the official ones") from e
    return data_dir


def read_split(split: str, data_dir: Path) -> Split:
    """Read a whole prepared split without TensorFlow (tfds.data_source over array_record)."""
    from absl import logging as absl_logging

    source = _tfds(data_dir).data_source("fashion_mnist", split=split, data_dir=str(data_dir),
                                         download=False)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # not "OpenCV is not installed" every run
    try:
        records = source.__getitems__(range(len(source)))
    finally:
        absl_logging.set_verbosity(verbosity)
    images = np.stack([r["image"] for r in records]).astype(np.uint8)
    labels = np.array([r["label"] for r in records], dtype=np.int32)
    return Split(images_NxHxWx1=images, labels_N=labels)


def load_fashion_mnist(*, data_dir=None, manual_dir=None) -> tuple[Split, Split]:
    """(train, test) as whole host arrays."""
    prepared = prepare(data_dir, manual_dir)
    return read_split("train", prepared), read_split("test", prepared)
