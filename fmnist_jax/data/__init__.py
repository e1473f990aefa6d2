"""Fashion-MNIST as whole host arrays, and what a run derives from them.

- `splits`: `Split` (uint8 images, int32 labels), the seeded stratified validation split, the
  pixel normalization;
- `tfds_source`: the official release through tfds's `fashion_mnist` builder (prepared once,
  read back without TensorFlow);
- `arrays_cache`: the decoded arrays of the tfds folder, kept beside it;
- `idx_source`: the four official `.gz` files read with numpy alone, in tfds's order (a
  machine without tensorflow-datasets);
- `csv_source`: Kaggle's CSV release, validated cell by cell.

`load(...)` picks the source: the two CSV files when they are given, else tfds where it can
read or build its folder, else the `.gz` files directly.

Nothing else in the package reads a dataset file.
"""

import importlib.util
import sys

from fmnist_jax.data.csv_source import read_csv_split, write_csv_split
from fmnist_jax.data.idx_source import OFFICIAL_SHA256, load_idx, tfds_order
from fmnist_jax.data.splits import (CLASS_NAMES, HALF, NORMALIZATIONS, Normalization, Split,
                                    dataset_mean_std, fingerprint, normalization_for,
                                    split_train_val, stratified_split,
                                    train_val_indices)
from fmnist_jax.data.arrays_cache import ARRAYS_DIR
from fmnist_jax.data.tfds_source import (DATA_DIR_ENV, DOWNLOAD_HOST, LOCK_FILE, MANUAL_DIR_ENV,
                                         MANUAL_FILES, check_manual_dir, is_prepared,
                                         load_fashion_mnist, prepare, read_split,
                                         resolve_data_dir, resolve_manual_dir)


DATA_SOURCES = ("auto", "tfds", "idx")


def load(*, data_dir=None, manual_dir=None, train_csv=None, test_csv=None,
         source: str = "auto") -> tuple[Split, Split]:
    """(train, test) as whole host arrays: from `train_csv` and `test_csv` when given (both),
    else from the official release through `source`: "tfds" (the folder in `data_dir`,
    prepared from `manual_dir` or the internet first), "idx" (the `.gz` files in `manual_dir`,
    read with numpy), or "auto": tfds where it can read or build its folder, else idx."""
    from fmnist_jax.errors import FmnistError

    if source not in DATA_SOURCES:
        raise FmnistError(f"data source {source!r} is not one of {', '.join(DATA_SOURCES)}")
    if (train_csv is None) != (test_csv is None):
        raise FmnistError("pass both --train-csv and --test-csv (Kaggle's fashion-mnist_train.csv "
                          "and fashion-mnist_test.csv), or neither to use the tfds folder")
    if train_csv is not None:
        if source != "auto":
            raise FmnistError(f"--data-source {source} reads the official release, --train-csv "
                              f"Kaggle's CSV files: pass one of them")
        return read_csv_split(train_csv), read_csv_split(test_csv)
    why = ""
    if source == "auto":
        source = _auto_source(resolve_data_dir(data_dir))
        if source == "idx":
            why = ("tensorflow-datasets cannot read or build its folder here (not installed, "
                   "or no TensorFlow)")
    if source == "idx":
        chosen = resolve_manual_dir(manual_dir)
        if chosen is None:
            raise FmnistError(f"{why + ', and ' if why else ''}reading the official .gz files "
                              f"needs the folder that holds them: pass --manual-dir DIR (or "
                              f"set {MANUAL_DIR_ENV}=DIR)")
        if why:
            print(f"note: {why}: reading the official .gz files with numpy", file=sys.stderr,
                  flush=True)
        return load_idx(chosen)
    return load_fashion_mnist(data_dir=data_dir, manual_dir=manual_dir)


def _auto_source(data_dir) -> str:
    """tfds when it is installed and finds its folder prepared, or has TensorFlow to build
    it; else idx. Looks for the modules without importing them."""
    if importlib.util.find_spec("tensorflow_datasets") is None:
        return "idx"
    if is_prepared(data_dir) or importlib.util.find_spec("tensorflow") is not None:
        return "tfds"
    return "idx"


__all__ = [
    "ARRAYS_DIR", "CLASS_NAMES", "DATA_DIR_ENV", "DATA_SOURCES", "DOWNLOAD_HOST", "HALF",
    "LOCK_FILE", "MANUAL_DIR_ENV", "MANUAL_FILES", "NORMALIZATIONS", "Normalization",
    "OFFICIAL_SHA256", "Split", "check_manual_dir", "dataset_mean_std", "fingerprint",
    "is_prepared", "load", "load_fashion_mnist", "load_idx", "normalization_for", "prepare",
    "read_csv_split", "read_split", "resolve_data_dir", "resolve_manual_dir", "split_train_val",
    "stratified_split", "tfds_order", "train_val_indices", "write_csv_split",
]
