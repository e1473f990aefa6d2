"""Fashion-MNIST as whole host arrays, and what a run derives from them.

- `splits`: `Split` (uint8 images, int32 labels), the seeded stratified validation split, the
  pixel normalization;
- `tfds_source`: the official release through tfds's `fashion_mnist` builder (prepared once,
  read back without TensorFlow).

Nothing else in the package reads a dataset file.
"""

from fmnist_jax.data.splits import (CLASS_NAMES, HALF, NORMALIZATIONS, Normalization, Split,
                                    dataset_mean_std, normalization_for, split_train_val,
                                    stratified_split)
from fmnist_jax.data.tfds_source import (DATA_DIR_ENV, DOWNLOAD_HOST, MANUAL_DIR_ENV,
                                         MANUAL_FILES, check_manual_dir, is_prepared,
                                         load_fashion_mnist, prepare, read_split,
                                         resolve_data_dir, resolve_manual_dir)

__all__ = [
    "CLASS_NAMES", "DATA_DIR_ENV", "DOWNLOAD_HOST", "HALF", "MANUAL_DIR_ENV", "MANUAL_FILES",
    "NORMALIZATIONS", "Normalization", "Split", "check_manual_dir", "dataset_mean_std",
    "is_prepared", "load_fashion_mnist", "normalization_for", "prepare", "read_split",
    "resolve_data_dir", "resolve_manual_dir", "split_train_val", "stratified_split",
]
