"""Fashion-MNIST as whole uint8 arrays, through tfds's `fashion_mnist` builder.

Two paths, one prepared folder:
- build: `download_and_prepare` in array_record format (needs TensorFlow, imported lazily by
  tfds), from the internet or, offline, from a manual dir holding the four official `.gz` files;
- read: `tfds.data_source` over the prepared folder, which needs no TensorFlow, so a GPU box
  without TF reads a folder prepared elsewhere.

Every failure a user can meet here (no internet and no manual dir, a missing, empty, truncated
or foreign file, a data dir that cannot be written) becomes one FmnistError line that names
the file and the fix. A prepared folder found damaged (a split file truncated or deleted,
dataset_info.json gone) is rebuilt from the manual dir when there is one, else refused with
one line saying how to rebuild it. A folder prepared earlier in tfrecord format is read with
TensorFlow (`builder.as_dataset`), the only reader tfds has for it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
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


class _Damaged(Exception):
    """A prepared folder that cannot be read as it is: args (version folder, what is wrong)."""


def _version_dirs(data_dir: Path) -> list[Path]:
    """The prepared version folders (fashion_mnist/3.0.1, ...), complete or not; tfds's
    own unfinished builds (`3.0.1.incomplete...`) are not versions."""
    return sorted(p for p in data_dir.glob("fashion_mnist/*")
                  if p.is_dir() and re.fullmatch(r"\d+\.\d+\.\d+", p.name))


def _file_format(version_dir: Path) -> str:
    """The format a folder was prepared in, from its dataset_info.json; raises _Damaged when
    that file or one of the split files it lists is missing."""
    info_path = version_dir / "dataset_info.json"
    if not info_path.is_file():
        raise _Damaged(version_dir, "dataset_info.json is missing")
    try:
        info = json.loads(info_path.read_text())
        file_format = info.get("fileFormat") or "tfrecord"  # tfds leaves out its default
        shards = {split["name"]: len(split["shardLengths"]) for split in info["splits"]}
    except (ValueError, KeyError, TypeError) as e:
        raise _Damaged(version_dir, "dataset_info.json is damaged") from e
    for split in ("train", "test"):
        if split not in shards:
            raise _Damaged(version_dir, f"dataset_info.json lists no {split} split")
        n = shards[split]
        for i in range(n):
            name = f"fashion_mnist-{split}.{file_format}-{i:05d}-of-{n:05d}"
            if not (version_dir / name).is_file():
                raise _Damaged(version_dir, f"{name} is missing")
    return file_format


def _damaged_error(version_dir: Path, what: str) -> FmnistError:
    return FmnistError(f"the prepared dataset in {version_dir} is damaged ({what}): delete that "
                       f"folder and run again with --manual-dir DIR (the four official .gz "
                       f"files) to rebuild it")


def _rebuild_or_refuse(damaged: _Damaged, data_dir: Path, manual_dir: Path | None) -> Path:
    """A damaged prepared folder: rebuilt from the manual dir when there is one (the folder
    holds only what tfds derived from the .gz files), else one line saying how."""
    version_dir, what = damaged.args
    if manual_dir is None:
        raise _damaged_error(version_dir, what) from damaged
    check_manual_dir(manual_dir)
    print(f"note: the prepared dataset in {version_dir} is damaged ({what}): rebuilding it "
          f"from {manual_dir}", file=sys.stderr, flush=True)
    try:
        shutil.rmtree(version_dir)
    except OSError as e:
        raise FmnistError(f"the prepared dataset in {version_dir} is damaged ({what}) and cannot "
                          f"be deleted ({e.strerror}): delete it yourself and run again") from e
    return prepare(data_dir, manual_dir)


def _check_writable(data_dir: Path) -> None:
    """Building writes into the data dir: a read-only one is named as such, not blamed on
    the .gz files."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".fmnist_jax-probe-"):
            pass
    except OSError as e:
        raise FmnistError(f"cannot write the data dir {data_dir} ({e.strerror}): pass "
                          f"--data-dir (or set {DATA_DIR_ENV}) a folder you can write") from e


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
    for version_dir in _version_dirs(data_dir):
        try:
            _file_format(version_dir)
        except _Damaged as damaged:
            return _rebuild_or_refuse(damaged, data_dir, manual_dir)
    if is_prepared(data_dir):
        return data_dir
    _check_writable(data_dir)
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
    except (EOFError, OSError) as e:
        if _is_under(getattr(e, "filename", None), data_dir):  # writing the build failed
            raise FmnistError(f"building the dataset in {data_dir} failed ({e.strerror or e}): "
                              f"free some space there or pass another --data-dir") from e
        # a corrupt .gz that somehow passed the checksum
        raise FmnistError(f"reading the Fashion-MNIST files failed ({e}): replace the files in "
                          f"{manual_dir or 'the download folder'} with the official ones") from e
    return data_dir


def _is_under(filename, folder: Path) -> bool:
    if not filename:
        return False
    return Path(os.fsdecode(filename)).absolute().is_relative_to(folder.absolute())


def read_split(split: str, data_dir: Path) -> Split:
    """Read a whole prepared split: without TensorFlow (tfds.data_source) from array_record,
    with it (builder.as_dataset) from a folder prepared in tfrecord format. FmnistError when
    the folder is damaged (see load_fashion_mnist, which rebuilds it when it can)."""
    try:
        return _read_split(split, data_dir)
    except _Damaged as damaged:
        raise _damaged_error(*damaged.args) from damaged


def _read_split(split: str, data_dir: Path) -> Split:
    from absl import logging as absl_logging

    version_dir = _version_dirs(data_dir)[-1]  # tfds reads the newest version
    file_format = _file_format(version_dir)
    tfds = _tfds(data_dir)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # not "OpenCV is not installed" every run
    try:
        if file_format == "tfrecord":
            images, labels = _read_tfrecord(tfds, split, data_dir, version_dir)
        else:
            source = tfds.data_source("fashion_mnist", split=split, data_dir=str(data_dir),
                                      download=False)
            records = source.__getitems__(range(len(source)))
            images = np.stack([r["image"] for r in records])
            labels = np.array([r["label"] for r in records])
    except FmnistError:
        raise
    except Exception as e:  # array_record: RuntimeError "Corrupted Riegeli/records file", ...
        raise _Damaged(version_dir, f"reading the {split} split failed: "
                                    f"{(str(e).strip().splitlines() or [''])[0][:160]}") from e
    finally:
        absl_logging.set_verbosity(verbosity)
    return Split(images_NxHxWx1=images.astype(np.uint8), labels_N=labels.astype(np.int32))


def _read_tfrecord(tfds, split: str, data_dir: Path, version_dir: Path):
    """A split of a folder prepared in tfrecord format: only TensorFlow reads those."""
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise FmnistError(f"the dataset in {version_dir} was prepared in tfrecord format, which "
                          f"only TensorFlow reads: pip install tensorflow-cpu, or delete that "
                          f"folder and run again with --manual-dir DIR to rebuild it") from e
    _hide_gpus_from_tensorflow()
    builder = tfds.builder("fashion_mnist", data_dir=str(data_dir))
    n = builder.info.splits[split].num_examples
    batch = next(iter(tfds.as_numpy(builder.as_dataset(split=split, batch_size=n,
                                                       shuffle_files=False))))
    if len(batch["label"]) != n:
        raise _Damaged(version_dir, f"the {split} split holds {len(batch['label'])} images, "
                                    f"not {n}")
    return batch["image"], batch["label"]


def load_fashion_mnist(*, data_dir=None, manual_dir=None) -> tuple[Split, Split]:
    """(train, test) as whole host arrays. A prepared folder found damaged while reading is
    rebuilt once from the manual dir when there is one."""
    prepared = prepare(data_dir, manual_dir)
    try:
        return _read_split("train", prepared), _read_split("test", prepared)
    except _Damaged as damaged:
        rebuilt = _rebuild_or_refuse(damaged, prepared, resolve_manual_dir(manual_dir))
    try:
        return _read_split("train", rebuilt), _read_split("test", rebuilt)
    except _Damaged as damaged:  # damaged again right after a rebuild: do not loop
        raise _damaged_error(*damaged.args) from damaged
