import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fmnist_jax import FmnistError, data
from tests.helpers import REPO, needs, one_error_line, run_script


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
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FmnistError, match="a_file is a file, not a folder: pass --manual-dir"):
        data.prepare(tmp_path / "tfds", tmp_path / "a_file")


@pytest.mark.slow
def test_truncated_file_fails_its_checksum(copied_manual_dir, tmp_path):
    path = copied_manual_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(FmnistError, match=r"t10k-images-idx3-ubyte.gz has the wrong checksum"):
        data.prepare(tmp_path / "tfds", copied_manual_dir)
    assert not data.is_prepared(tmp_path / "tfds")


@pytest.mark.parametrize("process", ["this", pytest.param("real", marks=pytest.mark.slow)])
def test_no_internet_and_no_manual_dir_fails_fast_with_one_line(tmp_path, process, run_main,
                                                                monkeypatch):
    """The CLI path end to end: one line naming --manual-dir and exit 1. In a real process
    (slow) the subprocess's timeout stands for "fast": tfds alone would retry for minutes."""
    from fmnist_jax.data import tfds_source

    args = ["--epochs", "1", "--data-dir", str(tmp_path / "tfds"), "--workdir",
            str(tmp_path / "run")]
    if process == "this":
        monkeypatch.setattr(tfds_source, "DOWNLOAD_HOST", "fashion-mnist.invalid")
        monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
        result = run_main("train.py", *args)
    else:
        code = ("import fmnist_jax.data.tfds_source as d; "
                "d.DOWNLOAD_HOST = 'fashion-mnist.invalid'; "
                f"from fmnist_jax.cli import train_main; train_main({args!r})")
        env = {k: v for k, v in os.environ.items() if k != data.MANUAL_DIR_ENV}
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


def test_a_data_dir_that_cannot_be_written_is_named(tmp_path):
    # /proc/self cannot take a folder, even for root; the manual dir is never looked at.
    with pytest.raises(FmnistError, match="cannot write the data dir /proc/self/tfds"):
        data.prepare("/proc/self/tfds", tmp_path / "nowhere")


@pytest.fixture
def damaged_copy(prepared_data_dir, tmp_path):
    """A copy of the prepared data dir (the original is never touched) and its version
    folder, to damage."""
    copy = shutil.copytree(prepared_data_dir / "fashion_mnist", tmp_path / "tfds" / "fashion_mnist")
    (version_dir,) = [p for p in copy.iterdir() if p.is_dir()]
    return copy.parent, version_dir


@pytest.fixture
def folder_to_damage(request, tmp_path):
    """(data dir, version folder) to damage: "real", a copy of the prepared folder (slow: the
    session prepares it once, about 30 s); "fake", `_fake_prepared_dir`'s folder, which has
    the real one's file names and passes the same checks until tfds reads a split."""
    if request.param == "real":
        return request.getfixturevalue("damaged_copy")
    return tmp_path / "tfds", _fake_prepared_dir(tmp_path / "tfds")



def _damage(version_dir, how):
    train_file = version_dir / "fashion_mnist-train.array_record-00000-of-00001"
    if how == "truncated":
        train_file.write_bytes(train_file.read_bytes()[:1_000_000])
    elif how == "split file deleted":
        (version_dir / "fashion_mnist-test.array_record-00000-of-00001").unlink()
    else:
        (version_dir / "dataset_info.json").unlink()


# A truncated split file shows only when tfds reads it: the real folder. A deleted file shows
# in the folder's listing: the fake one, in the fast set, too.
@needs("tensorflow_datasets")
@pytest.mark.parametrize("folder_to_damage,how", [
    *(pytest.param("real", how, marks=pytest.mark.slow)
      for how in ("truncated", "split file deleted", "dataset_info.json deleted")),
    ("fake", "split file deleted"), ("fake", "dataset_info.json deleted")],
    indirect=["folder_to_damage"])
def test_a_damaged_prepared_folder_gets_one_line_saying_how_to_rebuild(folder_to_damage, how,
                                                                      tmp_path, run_main):
    data_dir, version_dir = folder_to_damage
    _damage(version_dir, how)
    # Through the command: the claimed run folder is given back when the data fails.
    result = run_main("train.py", "--data-dir", data_dir, "--workdir", tmp_path / "run",
                      "--epochs", "1", env={data.MANUAL_DIR_ENV: ""})
    line = one_error_line(result)
    assert f"{version_dir} is damaged" in line
    assert "delete that folder and run again with --manual-dir" in line
    assert not (tmp_path / "run").exists()


# tfds.data_source is replaced: the fake folder, whose split files are never read, stands
# for the real one in the fast set.
@needs("tensorflow_datasets")
@pytest.mark.parametrize("folder_to_damage", [pytest.param("real", marks=pytest.mark.slow),
                                              "fake"], indirect=True)
@pytest.mark.parametrize("raised", ["named", "renamed by tfds"])
def test_a_missing_dependency_of_tfds_is_named_and_the_folder_kept(folder_to_damage, manual_dir,
                                                                  monkeypatch, tmp_path,
                                                                  run_main, raised):
    """A GPU box given tfds without all of its dependencies: tfds imports dm-tree only while
    reading. That is not a damaged folder: one line names the module and its package, and
    the folder is neither deleted nor rebuilt, even with a manual dir to rebuild it from."""
    import tensorflow_datasets as tfds

    data_dir, version_dir = folder_to_damage
    before = {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()}

    def data_source_without_tree(*args, **kwargs):
        missing = ModuleNotFoundError("No module named 'tree'", name="tree")
        if raised == "named":
            raise missing
        # as tfds's builder re-raises it: a new ImportError, the module only in its text
        raise ImportError(f'Failed to construct dataset "fashion_mnist": {missing}') from missing

    monkeypatch.setattr(tfds, "data_source", data_source_without_tree)
    result = run_main("train.py", "--data-dir", data_dir, "--manual-dir", manual_dir,
                      "--workdir", tmp_path / "run", "--epochs", "1")
    line = one_error_line(result)
    assert line.startswith(f"error: cannot read the prepared dataset under {data_dir}: the "
                           f"module 'tree' is missing: pip install dm-tree "), line
    assert "damaged" not in result.stderr and "rebuilding" not in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()} == before
    assert not (data_dir / data.ARRAYS_DIR).exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_dependency_that_tfds_hides_at_import_is_named():
    """tfds's __init__ logs a failed import of its core and goes on; the reader then names
    the module in one line (no traceback from tfds's log). In a subprocess: this process has
    imported tfds whole."""
    code = ("import sys; sys.modules['toml'] = None\n"
            "from fmnist_jax.data import tfds_source\n"
            "try:\n"
            "    tfds_source._tfds('read the prepared dataset under DIR')\n"
            "except tfds_source.FmnistError as e:\n"
            "    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == ("cannot read the prepared dataset under DIR: the module 'toml' is "
                             "missing: pip install toml (tensorflow-datasets needs it); offline, "
                             "install the wheels docs/data.md lists (a prepared tfds folder "
                             "instead)\n")
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


# TensorFlow as if not installed: every finder of imports passes over it, so `import
# tensorflow` fails and importlib.util.find_spec (how etils, under tfds, asks) finds nothing.
_WITHOUT_TENSORFLOW = """
import sys

class PassOverTensorFlow:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow" or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

sys.meta_path[:] = [PassOverTensorFlow(finder) for finder in sys.meta_path]
from fmnist_jax import data

data.load_fashion_mnist(data_dir=sys.argv[1])
print("tensorflow imported:", sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
"""


@pytest.mark.slow
def test_a_prepared_folder_is_read_without_tensorflow(prepared_data_dir, fashion_mnist,
                                                      tmp_path):
    """What a GPU box without TensorFlow does with a folder prepared elsewhere: decode it and
    write the cache, with `import tensorflow` made to fail, in a fresh process."""
    data_dir = tmp_path / "tfds"
    shutil.copytree(prepared_data_dir / "fashion_mnist", data_dir / "fashion_mnist")
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, str(data_dir)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "tensorflow imported: []"
    train, test = data.load_fashion_mnist(data_dir=data_dir)  # the cache it wrote
    for got, want in zip((train, test), fashion_mnist):
        np.testing.assert_array_equal(got.images_NxHxWx1, want.images_NxHxWx1)
        np.testing.assert_array_equal(got.labels_N, want.labels_N)


@pytest.mark.slow
def test_a_damaged_prepared_folder_is_rebuilt_from_the_manual_dir(damaged_copy, manual_dir,
                                                                  fashion_mnist, capfd):
    data_dir, version_dir = damaged_copy
    _damage(version_dir, "truncated")
    train, test = data.load_fashion_mnist(data_dir=data_dir, manual_dir=manual_dir)
    assert "rebuilding it from" in capfd.readouterr().err
    np.testing.assert_array_equal(train.images_NxHxWx1, fashion_mnist[0].images_NxHxWx1)
    np.testing.assert_array_equal(test.labels_N, fashion_mnist[1].labels_N)


@pytest.mark.slow
def test_a_folder_prepared_as_tfrecord_is_read(manual_dir, fashion_mnist, tmp_path):
    import tensorflow_datasets as tfds

    builder = tfds.builder("fashion_mnist", data_dir=str(tmp_path), file_format="tfrecord")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual_dir), try_download_gcs=False))
    train, test = data.load_fashion_mnist(data_dir=tmp_path)
    for got, want in zip((train, test), fashion_mnist):  # tfds writes both in one order
        np.testing.assert_array_equal(got.images_NxHxWx1, want.images_NxHxWx1)
        np.testing.assert_array_equal(got.labels_N, want.labels_N)


# ---------------------------------------------------------------------------------------
# The decoded-arrays cache and the data dir's lock


def _fake_prepared_dir(data_dir, info=b'{"splits": []}'):
    """A data dir that passes the prepared-folder checks without tfds: a dataset_info.json
    listing one (empty) shard per split. Its arrays can only come from the cache."""
    import json

    version_dir = data_dir / "fashion_mnist" / "3.0.1"
    version_dir.mkdir(parents=True)
    splits = [{"name": s, "shardLengths": ["1"]} for s in ("train", "test")]
    (version_dir / "dataset_info.json").write_text(json.dumps(
        {"fileFormat": "array_record", "splits": splits, "note": info.decode()}))
    for split in ("train", "test"):
        (version_dir / f"fashion_mnist-{split}.array_record-00000-of-00001").write_bytes(b"")
    return version_dir


def _cached_fake(tmp_path):
    from fmnist_jax.data import arrays_cache
    from tests.helpers import make_split

    data_dir = tmp_path / "tfds"
    version_dir = _fake_prepared_dir(data_dir)
    train, test = make_split(64, seed=0), make_split(32, seed=1)
    arrays_cache.write_cache(data_dir, arrays_cache.cache_key(version_dir), train, test)
    return data_dir, version_dir, train, test


def test_the_cache_gives_back_the_arrays_it_was_given(tmp_path):
    data_dir, _, train, test = _cached_fake(tmp_path)
    got_train, got_test = data.load_fashion_mnist(data_dir=data_dir)  # never reaches tfds
    for got, want in ((got_train, train), (got_test, test)):
        np.testing.assert_array_equal(got.images_NxHxWx1, want.images_NxHxWx1)
        np.testing.assert_array_equal(got.labels_N, want.labels_N)
        assert got.images_NxHxWx1.dtype == np.uint8 and got.labels_N.dtype == np.int32
    assert sorted(p.name for p in (data_dir / data.ARRAYS_DIR).iterdir()) == [
        "manifest.json", "test_images.npy", "test_labels.npy", "train_images.npy",
        "train_labels.npy"]  # no temporary file left behind


@pytest.mark.parametrize("change", ["byte flipped", "truncated", "manifest deleted",
                                    "dataset_info.json changed", "split file deleted"])
def test_a_stale_or_damaged_cache_is_not_used(tmp_path, change):
    from fmnist_jax.data import tfds_source

    data_dir, version_dir, _, _ = _cached_fake(tmp_path)
    cache_dir = data_dir / data.ARRAYS_DIR
    images = cache_dir / "train_images.npy"
    if change == "byte flipped":
        raw = bytearray(images.read_bytes())
        raw[5000] ^= 1
        images.write_bytes(bytes(raw))
    elif change == "truncated":
        images.write_bytes(images.read_bytes()[:-10])
    elif change == "manifest deleted":
        (cache_dir / "manifest.json").unlink()
    elif change == "dataset_info.json changed":  # tfds rebuilt or upgraded the folder
        info = version_dir / "dataset_info.json"
        info.write_text(info.read_text() + "\n")
    else:
        (version_dir / "fashion_mnist-test.array_record-00000-of-00001").unlink()
    assert tfds_source._cached(data_dir) is None


def test_the_lock_makes_a_second_process_wait(tmp_path):
    """While one process holds the data dir's lock, another one's `prepare` waits: it says
    so on stdout and returns only after the lock is given back."""
    from fmnist_jax.data import tfds_source

    data_dir = tmp_path / "tfds"
    _fake_prepared_dir(data_dir)
    code = ("from fmnist_jax.data import prepare; import sys; "
            f"prepare({str(data_dir)!r}); print('prepared', flush=True)")
    with tfds_source._data_dir_lock(data_dir):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True,
                                env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = proc.stdout.readline()  # blocks until the child prints: it found the lock held
        assert first.startswith(f"waiting for another process preparing {data_dir}"), first
        assert proc.poll() is None
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "prepared"


@pytest.mark.slow
def test_cached_arrays_are_the_tfds_arrays(prepared_data_dir, tmp_path, capfd):
    """A copy of the prepared folder: the first load decodes it and writes the cache (one line
    says so), the second reads the cache; both give exactly tfds's arrays."""
    from fmnist_jax.data import tfds_source

    data_dir = tmp_path / "tfds"
    shutil.copytree(prepared_data_dir / "fashion_mnist", data_dir / "fashion_mnist")
    want = tfds_source._read_split("train", data_dir), tfds_source._read_split("test", data_dir)
    capfd.readouterr()
    first = data.load_fashion_mnist(data_dir=data_dir)
    assert capfd.readouterr().out.startswith(f"decoding Fashion-MNIST once into "
                                             f"{data_dir / data.ARRAYS_DIR}... done in ")
    second = data.load_fashion_mnist(data_dir=data_dir)
    assert capfd.readouterr().out == ""  # from the cache: nothing decoded
    for got in (first, second):
        for split, want_split in zip(got, want):
            np.testing.assert_array_equal(split.images_NxHxWx1, want_split.images_NxHxWx1)
            np.testing.assert_array_equal(split.labels_N, want_split.labels_N)
            assert split.images_NxHxWx1.dtype == np.uint8 and split.labels_N.dtype == np.int32


@pytest.mark.slow
def test_two_first_runs_on_a_fresh_data_dir_both_succeed(manual_dir, fashion_mnist, tmp_path):
    """Two commands started together on an empty data dir: one prepares under the lock, the
    other waits and then reads the same arrays. The preparation says what it does in one line
    of its own, without tfds's progress bars."""
    from concurrent.futures import ThreadPoolExecutor

    data_dir = tmp_path / "tfds"
    # bench --quick: loads all the data, then trains only briefly.
    args = [["--quick", "--pipelines", "jax", "--data-dir", data_dir, "--manual-dir",
             manual_dir, "--out", tmp_path / f"bench{i}.json"] for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda a: run_script("bench.py", *a, timeout=600), args))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Generating splits" not in result.stdout + result.stderr
        assert "Dl Completed" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        # TensorFlow's C++ start-up lines, which ignore TF_CPP_MIN_LOG_LEVEL, held back
        assert "absl::InitializeLog" not in result.stderr, result.stderr[-3000:]
        assert "oneDNN custom operations" not in result.stderr, result.stderr[-3000:]
    outs = [r.stdout for r in results]
    assert sum("preparing Fashion-MNIST in" in out for out in outs) == 1, outs
    preparing = next(line for out in outs for line in out.splitlines()
                     if line.startswith("preparing"))
    assert re.fullmatch(r"preparing Fashion-MNIST in \S+ \(once, about \d+ s\)\.\.\. done in "
                        r"[\d.]+ s", preparing), preparing
    train, test = data.load_fashion_mnist(data_dir=data_dir)
    np.testing.assert_array_equal(train.images_NxHxWx1, fashion_mnist[0].images_NxHxWx1)
    np.testing.assert_array_equal(test.labels_N, fashion_mnist[1].labels_N)


def test_stderr_held_back_while_preparing_and_replayed_on_unexpected_errors(capfd):
    """TensorFlow's C++ lines (written to descriptor 2) are hidden while tfds builds; an
    unexpected failure replays them, our own errors (which name the fix) do not."""
    from fmnist_jax.data.tfds_source import _stderr_held_back
    from fmnist_jax.errors import FmnistError

    with _stderr_held_back():
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError), _stderr_held_back():
        os.write(2, b"the cause of a crash\n")
        raise RuntimeError("boom")
    assert capfd.readouterr().err == "the cause of a crash\n"
    with pytest.raises(FmnistError), _stderr_held_back():
        os.write(2, b"start-up noise\n")
        raise FmnistError("x.gz has the wrong checksum")
    assert capfd.readouterr().err == ""
    os.write(2, b"after\n")  # descriptor 2 is back
    assert capfd.readouterr().err == "after\n"
