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

Decoding the 70,000 PNGs tfds stores takes seconds, so the first read also writes the arrays,
once, to `DATA_DIR/fashion_mnist_arrays/` (`arrays_cache`); later runs read those in well
under a second. The tfds folder stays the source of truth: a cache that does not match it is
rebuilt from it. Preparing and caching hold an flock on `DATA_DIR/.fmnist_jax.lock`, so runs
started together on a fresh data dir wait for one another instead of racing tfds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fmnist_jax.data.arrays_cache import ARRAYS_DIR, cache_key, read_cache, write_cache
from fmnist_jax.data.splits import Split
from fmnist_jax.errors import FmnistError
from fmnist_jax.files import first_line, lock_file, quiet_absl

MANUAL_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)
DATA_DIR_ENV = "FMNIST_DATA_DIR"
MANUAL_DIR_ENV = "FMNIST_MANUAL_DIR"
DOWNLOAD_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"  # tfds's source URL host
LOCK_FILE = ".fmnist_jax.lock"
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


def _tfds(task: str):
    """tensorflow_datasets, imported for `task` ("read the prepared dataset under DIR", ...),
    or one FmnistError naming the module that is not installed."""
    # tfds's __init__ logs a failed import of its core as a traceback and goes on (a GPU box
    # that lacks one of its dependencies then meets "no attribute 'data_source'"): quiet
    # here, and the second import raises the error, which names the module.
    try:
        with quiet_absl("fatal"):
            import tensorflow_datasets as tfds
            import tensorflow_datasets.core  # noqa: F401
            import array_record  # noqa: F401  (missing, tfds prints a banner about macOS first)
    except ImportError as e:
        raise _missing_module_error(e, task) from e
    return tfds


# pip's name for the modules of tfds's dependencies that are named otherwise
_PACKAGE_OF_MODULE = {"tree": "dm-tree", "google": "protobuf",
                      "tensorflow_metadata": "tensorflow-metadata"}


def _missing_module(e: BaseException | None) -> str | None:
    """The top-level module an ImportError could not find. tfds re-raises some as a new
    ImportError without a name ("Failed to construct dataset ...") from the one with it."""
    while e is not None:
        if isinstance(e, ImportError) and e.name:
            return e.name.split(".")[0]
        e = e.__cause__ or e.__context__
    return None


def _missing_module_error(e: ImportError, task: str) -> FmnistError:
    """A module that tfds needs for `task` is not installed (a GPU box without TensorFlow,
    given only some of tfds's dependencies): say which, not "damaged"."""
    module = _missing_module(e)
    if module is None:
        what, fix = f"an import failed ({first_line(e, 160)})", "pip install tensorflow-datasets"
    elif module == "tensorflow_datasets":
        what, fix = "tensorflow-datasets is not installed", "pip install tensorflow-datasets"
    else:
        what = f"the module {module!r} is missing"
        fix = f"pip install {_PACKAGE_OF_MODULE.get(module, module)} (tensorflow-datasets needs it)"
    return FmnistError(f"cannot {task}: {what}: {fix}; offline, install the wheels "
                       f"docs/data.md lists (a prepared tfds folder instead)")


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
    return _prepare(data_dir, manual_dir)


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
        raise FmnistError(f"manual dir {manual_dir} "
                          f"{'is a file, not a folder' if manual_dir.exists() else 'does not exist'}"
                          f": {_MANUAL_HINT}")
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


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path):
    """Hold an exclusive flock on DATA_DIR/.fmnist_jax.lock: a second process preparing the
    same data dir waits here, then finds it prepared (tfds alone would fail renaming its
    `incomplete` folder). A data dir where the lock cannot be made (read-only, or not
    creatable) is used without it: nothing can be written there, so nothing can race; the
    checks further on name the problem."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / LOCK_FILE, "a")
    except OSError:
        yield
        return
    with lock:  # closing the file releases the lock
        if not lock_file(lock, wait=False):
            print(f"waiting for another process preparing {data_dir}...", flush=True)
            lock_file(lock, wait=True)
        yield


def prepare(data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None) -> Path:
    """Build the array_record folder under `data_dir` unless it is there; return `data_dir`.
    Holds the data dir's lock while it looks and builds."""
    data_dir, manual_dir = resolve_data_dir(data_dir), resolve_manual_dir(manual_dir)
    with _data_dir_lock(data_dir):
        return _prepare(data_dir, manual_dir)


def _prepare(data_dir: Path, manual_dir: Path | None) -> Path:
    """`prepare`, for a caller that holds the data dir's lock."""
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
    # One line of our own instead of tfds's ~170 lines of progress bars and notices.
    print(f"preparing Fashion-MNIST in {data_dir} (once, about 30 s)... ", end="", flush=True)
    t0 = time.perf_counter()
    try:
        _download_and_prepare(data_dir, manual_dir)
    except BaseException:
        print("failed", flush=True)  # end our line: the error follows on stderr
        raise
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)
    return data_dir


@contextlib.contextmanager
def _quiet_tfds():
    """Silence tfds while it builds: its tqdm bars, its absl logs, the notices it prints on
    stdout, TensorFlow's C++ start-up logs. Errors still come through as exceptions."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when TensorFlow loads
    tfds = sys.modules["tensorflow_datasets"]
    tfds.display_progress_bar(False)
    try:
        with quiet_absl("error"), contextlib.redirect_stdout(io.StringIO()), _stderr_held_back():
            yield
    finally:
        tfds.display_progress_bar(True)


@contextlib.contextmanager
def _stderr_held_back():
    """File descriptor 2 into a temporary file for the block, replayed if the block fails.

    TensorFlow's C++ start-up lines (absl's "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on", CPU-feature notes) go straight to descriptor 2 and
    ignore TF_CPP_MIN_LOG_LEVEL in the installed TensorFlow, so they would split our one
    "preparing ..." line. On an unexpected error nothing is lost: the held-back text is
    written out. Our own errors (FmnistError) already name the problem and the fix.
    """
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except FmnistError:
            raise
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


def _download_and_prepare(data_dir: Path, manual_dir: Path | None) -> None:
    tfds = _tfds(f"prepare Fashion-MNIST in {data_dir}")
    with _quiet_tfds():
        _build(tfds, data_dir, manual_dir)


def _build(tfds, data_dir: Path, manual_dir: Path | None) -> None:
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
    version_dir = _version_dirs(data_dir)[-1]  # tfds reads the newest version
    file_format = _file_format(version_dir)
    task = f"read the prepared dataset under {data_dir}"
    tfds = _tfds(task)
    try:
        with quiet_absl("error"):  # not "OpenCV is not installed" every run
            if file_format == "tfrecord":
                images_NxHxWx1, labels_N = _read_tfrecord(tfds, split, data_dir, version_dir)
            else:
                source = tfds.data_source("fashion_mnist", split=split, data_dir=str(data_dir),
                                          download=False)
                records = source.__getitems__(range(len(source)))
                images_NxHxWx1 = np.stack([r["image"] for r in records])
                labels_N = np.array([r["label"] for r in records])
    except FmnistError:
        raise
    except ImportError as e:  # tfds imports some of its dependencies only while reading
        raise _missing_module_error(e, task) from e
    except Exception as e:  # array_record: RuntimeError "Corrupted Riegeli/records file", ...
        raise _Damaged(version_dir, f"reading the {split} split failed: "
                                    f"{first_line(e, 160)}") from e
    return Split(images_NxHxWx1=images_NxHxWx1.astype(np.uint8),
                 labels_N=labels_N.astype(np.int32))


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


def _cached(data_dir: Path) -> tuple[Split, Split] | None:
    """The cache of a sound prepared folder, or None. Looks, as `_prepare` does, for every
    split file dataset_info.json lists, so a deleted one is still found and rebuilt."""
    try:
        version_dirs = _version_dirs(data_dir)
        if not version_dirs:
            return None
        for version_dir in version_dirs:
            _file_format(version_dir)
        return read_cache(data_dir, cache_key(version_dirs[-1]))
    except (_Damaged, OSError):
        return None


def _read_and_cache(data_dir: Path) -> tuple[Split, Split]:
    """Decode both splits from the tfds folder and write the cache (once per folder)."""
    version_dir = _version_dirs(data_dir)[-1]
    print(f"decoding Fashion-MNIST once into {data_dir / ARRAYS_DIR}... ", end="", flush=True)
    t0 = time.perf_counter()
    try:
        train, test = _read_split("train", data_dir), _read_split("test", data_dir)
    except BaseException:
        print("failed", flush=True)
        raise
    write_cache(data_dir, cache_key(version_dir), train, test)
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)
    return train, test


def load_fashion_mnist(*, data_dir=None, manual_dir=None) -> tuple[Split, Split]:
    """(train, test) as whole host arrays: from the decoded-arrays cache when it matches the
    prepared folder (no lock needed to read: it is checksummed), else under the data dir's
    lock: prepared if needed, decoded from the tfds folder and cached. A prepared folder
    found damaged while reading is rebuilt once from the manual dir when there is one."""
    data_dir, manual_dir = resolve_data_dir(data_dir), resolve_manual_dir(manual_dir)
    cached = _cached(data_dir)
    if cached is not None:
        return cached
    with _data_dir_lock(data_dir):
        prepared = _prepare(data_dir, manual_dir)
        cached = _cached(prepared)  # another process may have cached it while we waited
        if cached is not None:
            return cached
        try:
            return _read_and_cache(prepared)
        except _Damaged as damaged:
            rebuilt = _rebuild_or_refuse(damaged, prepared, manual_dir)
        try:
            return _read_and_cache(rebuilt)
        except _Damaged as damaged:  # damaged again right after a rebuild: do not loop
            raise _damaged_error(*damaged.args) from damaged
