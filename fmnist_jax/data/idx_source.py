"""Fashion-MNIST from the four official `.gz` files with nothing but numpy and the standard
library: for a machine without tensorflow-datasets (a GPU box), or `--data-source idx`.

The arrays come out exactly as tfds's prepared folder holds them, so a run trained from one
source evaluates and resumes from the other with the same data fingerprint. tfds stores each
split ordered by the md5 of the split's name followed by the image's index in the file: its
stable shuffle, which tfds only changes with a major version of every dataset
(tensorflow_datasets/core/hashing.py).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from fmnist_jax.data.splits import Split
from fmnist_jax.errors import FmnistError

# The release's files (zalandoresearch/fashion-mnist, data/fashion), as tfds checks them too.
OFFICIAL_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz":
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz":
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz":
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
# tfds's split name (its shuffle's salt) -> the prefix of the split's files
SPLIT_FILES = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # idx: unsigned bytes, 3 and 1 dimensions
_SIDE = 28


def load_idx(manual_dir: Path, expected_sha256: dict[str, str] | None = None
             ) -> tuple[Split, Split]:
    """(train, test) from the four `.gz` files in `manual_dir`, in tfds's order. Every file is
    checked against `expected_sha256` (default: the official release's) before it is read."""
    expected_sha256 = OFFICIAL_SHA256 if expected_sha256 is None else expected_sha256
    if not manual_dir.is_dir():
        raise FmnistError(f"manual dir {manual_dir} "
                          f"{'is a file, not a folder' if manual_dir.exists() else 'does not exist'}"
                          f": pass --manual-dir a folder holding the four official .gz files "
                          f"({', '.join(OFFICIAL_SHA256)})")
    for name in OFFICIAL_SHA256:  # every file before any is decoded: cheap checks first
        _check_file(manual_dir / name, expected_sha256[name])
    return tuple(_read_split(manual_dir, split) for split in SPLIT_FILES)


def _check_file(path: Path, sha256: str) -> None:
    if not path.is_file():
        raise FmnistError(f"{path} is missing: copy the official Fashion-MNIST file there")
    if path.stat().st_size == 0:
        raise FmnistError(f"{path} is empty: copy the official Fashion-MNIST file there again")
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise FmnistError(f"cannot read {path} ({e.strerror}): make it readable, or copy the "
                          f"official Fashion-MNIST file there again") from e
    if digest.hexdigest() != sha256:
        raise FmnistError(f"{path} has the wrong checksum (truncated, or not the official "
                          f"release file): replace it with the official .gz file")


def _read_split(manual_dir: Path, split: str) -> Split:
    prefix = SPLIT_FILES[split]
    images_path = manual_dir / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = manual_dir / f"{prefix}-labels-idx1-ubyte.gz"
    images_NxHxW = _read_idx(images_path, _IMAGES_MAGIC, (_SIDE, _SIDE))
    labels_N = _read_idx(labels_path, _LABELS_MAGIC, ())
    if len(images_NxHxW) != len(labels_N):
        raise FmnistError(f"{images_path} holds {len(images_NxHxW)} images but {labels_path} "
                          f"{len(labels_N)} labels: copy the official files there again")
    if labels_N.size and labels_N.max() > 9:
        raise FmnistError(f"{labels_path} holds a label {labels_N.max()}, not a class 0..9: "
                          f"copy the official file there again")
    order_N = tfds_order(split, len(labels_N))
    return Split(images_NxHxWx1=images_NxHxW[order_N, :, :, None],
                 labels_N=labels_N[order_N].astype(np.int32))


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array of an idx file: a big-endian int32 magic, one int32 per dimension,
    then the bytes."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise FmnistError(f"{path} is not a readable .gz file ({e}): copy the official "
                          f"Fashion-MNIST file there again") from e
    ndim = 1 + len(item_shape)
    header_bytes = 4 * (1 + ndim)
    header = np.frombuffer(raw[:header_bytes], ">i4") if len(raw) >= header_bytes else None
    if header is None or header[0] != magic or tuple(header[2:]) != item_shape:
        raise FmnistError(f"{path} is not an idx file of {'images' if ndim == 3 else 'labels'} "
                          f"(its header does not say so): copy the official file there again")
    n = int(header[1])
    body = np.frombuffer(raw, np.uint8, offset=header_bytes)
    if body.size != n * int(np.prod(item_shape, dtype=np.int64)):
        raise FmnistError(f"{path} holds {body.size} bytes after its header, not the "
                          f"{n} items it announces: copy the official file there again")
    return body.reshape((n, *item_shape))


def tfds_order(split: str, n: int) -> np.ndarray:
    """The file indices of a split's `n` images in the order tfds stores them: ascending md5
    of the split's name followed by the index written in decimal (128-bit digests compare as
    their bytes)."""
    salted = hashlib.md5(split.encode())

    def digest(index: int) -> bytes:
        h = salted.copy()
        h.update(str(index).encode())
        return h.digest()

    return np.array(sorted(range(n), key=digest), dtype=np.int64)
