"""Fashion-MNIST as whole host arrays, and what a run derives from them.

- `splits`: `Split` (uint8 images, int32 labels), the seeded stratified validation split, the
  pixel normalization;
- `tfds_source`: the official release through tfds's `fashion_mnist` builder (prepared once,
  read back without TensorFlow);
- `arrays_cache`: the decoded arrays of the tfds folder, kept beside it;
- `csv_source`: Kaggle's CSV release, validated cell by cell.

`load(...)` picks the source: the two CSV files when they are given, else tfds.

Nothing else in the package reads a dataset file.
"""

from fmnist_jax.data.csv_source import read_csv_split, write_csv_split
from fmnist_jax.data.splits import (CLASS_NAMES, HALF, NORMALIZATIONS, Normalization, Split,
                                    dataset_mean_std, fingerprint, normalization_for,
                                    split_train_val, stratified_split,
                                    train_val_indices)
from fmnist_jax.data.arrays_cache import ARRAYS_DIR
from fmnist_jax.data.tfds_source import (DATA_DIR_ENV, DOWNLOAD_HOST, LOCK_FILE, MANUAL_DIR_ENV,
                                         MANUAL_FILES, check_manual_dir, is_prepared,
                                         load_fashion_mnist, prepare, read_split,
                                         resolve_data_dir, resolve_manual_dir)


def load(*, data_dir=None, manual_dir=None, train_csv=None, test_csv=None) -> tuple[Split, Split]:
    """(train, test) as whole host arrays: from `train_csv` and `test_csv` when given (both),
    else from the tfds folder `data_dir` (prepared from `manual_dir` or the internet first)."""
    from fmnist_jax.errors import FmnistError

    if (train_csv is None) != (test_csv is None):
        raise FmnistError("pass both --train-csv and --test-csv (Kaggle's fashion-mnist_train.csv "
                          "and fashion-mnist_test.csv), or neither to use the tfds folder")
    if train_csv is not None:
        return read_csv_split(train_csv), read_csv_split(test_csv)
    return load_fashion_mnist(data_dir=data_dir, manual_dir=manual_dir)


__all__ = [
    "ARRAYS_DIR", "CLASS_NAMES", "DATA_DIR_ENV", "DOWNLOAD_HOST", "HALF", "LOCK_FILE",
    "MANUAL_DIR_ENV", "MANUAL_FILES", "NORMALIZATIONS", "Normalization", "Split",
    "check_manual_dir", "dataset_mean_std", "fingerprint", "is_prepared", "load",
    "load_fashion_mnist", "normalization_for", "prepare", "read_csv_split", "read_split",
    "resolve_data_dir", "resolve_manual_dir", "split_train_val", "stratified_split",
    "train_val_indices", "write_csv_split",
]
