"""The decoded-arrays cache: DATA_DIR/fashion_mnist_arrays/, beside tfds's fashion_mnist/.

Both splits as plain .npy files and a manifest of their sha256 and size, keyed by what they
were decoded from (`cache_key`: the tfds version folder and its dataset_info.json). A cache
whose key or checksums do not match reads as absent, and the caller decodes again.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np

from fmnist_jax.data.splits import Split
from fmnist_jax.files import write_atomically

ARRAYS_DIR = "fashion_mnist_arrays"
_MANIFEST = "manifest.json"
_CACHE_FORMAT = 1  # bump when the cache's layout changes: older caches are then rebuilt


def cache_key(version_dir: Path) -> str:
    """What the cache was decoded from: the version folder's name and the hash of its
    dataset_info.json (which changes whenever tfds rebuilds or upgrades the folder)."""
    info = (version_dir / "dataset_info.json").read_bytes()
    return f"{_CACHE_FORMAT}:{version_dir.name}:{hashlib.sha256(info).hexdigest()}"


def _cache_files(split: str) -> tuple[str, str]:
    return f"{split}_images.npy", f"{split}_labels.npy"


def read_cache(data_dir: Path, key: str) -> tuple[Split, Split] | None:
    """(train, test) from the cache when its manifest matches `key` and every file its
    sha256 and size; else None (no cache, an old one, or a damaged one: the caller rebuilds)."""
    cache_dir = data_dir / ARRAYS_DIR
    try:
        manifest = json.loads((cache_dir / _MANIFEST).read_text())
        if manifest.get("key") != key:
            return None
        arrays = {}
        for split in ("train", "test"):
            for name in _cache_files(split):
                raw = (cache_dir / name).read_bytes()
                want = manifest["files"][name]
                if len(raw) != want["size"] or hashlib.sha256(raw).hexdigest() != want["sha256"]:
                    return None
                arrays[name] = np.load(io.BytesIO(raw), allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    splits = []
    for split in ("train", "test"):
        images_name, labels_name = _cache_files(split)
        images, labels = arrays[images_name], arrays[labels_name]
        if (images.dtype != np.uint8 or images.shape[1:] != (28, 28, 1)
                or labels.dtype != np.int32 or labels.shape != images.shape[:1]):
            return None  # a manifest written by hand over other arrays
        splits.append(Split(images_NxHxWx1=images, labels_N=labels))
    return splits[0], splits[1]


def write_cache(data_dir: Path, key: str, train: Split, test: Split) -> None:
    """Write the cache: each file to a temporary name, then renamed into place, the manifest
    last. A reader never sees a half-written file as valid: until the new manifest is in
    place, the old one's checksums fail on the new files and the reader rebuilds. A cache
    that cannot be written (read-only or full data dir) leaves a note, and runs go on
    decoding the PNGs."""
    cache_dir = data_dir / ARRAYS_DIR
    files = {}
    try:
        cache_dir.mkdir(exist_ok=True)
        for split, arrays in (("train", train), ("test", test)):
            for name, array in zip(_cache_files(split), (arrays.images_NxHxWx1, arrays.labels_N)):
                buffer = io.BytesIO()
                np.save(buffer, array, allow_pickle=False)
                raw = buffer.getvalue()
                files[name] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
                write_atomically(cache_dir / name, raw)
        write_atomically(cache_dir / _MANIFEST,
                          json.dumps({"key": key, "files": files}, indent=1).encode())
    except OSError as e:
        print(f"note: cannot cache the decoded arrays in {cache_dir} ({e.strerror or e}): "
              f"every run decodes the dataset again (seconds)", file=sys.stderr, flush=True)
