"""The four official .gz files read with numpy alone, in tfds's order."""

import gzip
import hashlib
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

from fmnist_jax import FmnistError, data
from fmnist_jax.cli_flags import Parser, add_data_flags, load_data
from fmnist_jax.data import idx_source
from tests.helpers import SHARED_MANUAL_DIR, make_split, one_error_line, run_script


def _write_idx(path, magic, array):
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


@pytest.fixture
def fake_release(tmp_path):
    """A manual dir of four small idx files, with their checksums: (dir, sha256s, train,
    test) where train and test are the splits in the files' own order."""
    folder = tmp_path / "manual"
    folder.mkdir()
    splits = {"train": make_split(300, seed=0), "t10k": make_split(70, seed=1)}
    for prefix, split in splits.items():
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, split.images_NxHxWx1[..., 0])
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, split.labels_N)
    sums = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in data.MANUAL_FILES}
    return folder, sums, splits["train"], splits["t10k"]


def test_the_files_are_read_in_tfds_order(fake_release):
    folder, sums, train_in_file, test_in_file = fake_release
    train, test = data.load_idx(folder, sums)
    for split, in_file, name in ((train, train_in_file, "train"), (test, test_in_file, "test")):
        order = data.tfds_order(name, len(in_file))
        assert sorted(order) == list(range(len(in_file))) and list(order) != sorted(order)
        np.testing.assert_array_equal(split.images_NxHxWx1, in_file.images_NxHxWx1[order])
        np.testing.assert_array_equal(split.labels_N, in_file.labels_N[order])
        assert split.images_NxHxWx1.dtype == np.uint8 and split.labels_N.dtype == np.int32


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is None,
                    reason="needs tensorflow-datasets")
@pytest.mark.parametrize("split", ["train", "test"])
def test_the_order_is_the_one_tfds_stores(split):
    from tensorflow_datasets.core import hashing

    hasher = hashing.Hasher(split)
    expected = sorted(range(5000), key=hasher.hash_key)
    np.testing.assert_array_equal(data.tfds_order(split, 5000), expected)


@pytest.mark.slow
def test_the_idx_path_gives_the_tfds_arrays(manual_dir, fashion_mnist):
    """All 70,000 images and labels, in the same order, so runs move between sources."""
    for from_idx, from_tfds in zip(data.load_idx(manual_dir), fashion_mnist):
        assert len(from_idx) == len(from_tfds)
        np.testing.assert_array_equal(from_idx.images_NxHxWx1, from_tfds.images_NxHxWx1)
        np.testing.assert_array_equal(from_idx.labels_N, from_tfds.labels_N)
        assert data.fingerprint(from_idx) == data.fingerprint(from_tfds)


def test_the_official_checksums_are_those_of_the_shared_copy():
    sums_file = SHARED_MANUAL_DIR / "SHA256SUMS"
    if not sums_file.is_file():
        pytest.skip("no shared copy of the release")
    listed = dict(reversed(line.split()) for line in sums_file.read_text().splitlines())
    assert listed == data.OFFICIAL_SHA256


@pytest.mark.parametrize("how, expected", [
    ("missing", "train-labels-idx1-ubyte.gz is missing"),
    ("empty", "train-labels-idx1-ubyte.gz is empty"),
    ("foreign", "train-labels-idx1-ubyte.gz has the wrong checksum"),
])
def test_a_bad_file_is_named(fake_release, how, expected):
    folder, sums, _, _ = fake_release
    path = folder / "train-labels-idx1-ubyte.gz"
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(b"" if how == "empty" else path.read_bytes()[:-3])
    with pytest.raises(FmnistError, match=expected):
        data.load_idx(folder, sums)


def _labels_gz(magic, count, body):
    return gzip.compress(struct.pack(">ii", magic, count) + body, mtime=0)


@pytest.mark.parametrize("content, expected", [
    (b"not gzip at all", "is not a readable .gz file"),
    (_labels_gz(2051, 300, b""), "is not an idx file of labels"),
    (_labels_gz(2049, 301, bytes(300)), "holds 300 bytes after its header, not the 301 items"),
    (_labels_gz(2049, 299, bytes(299)), "holds 300 images but"),
    (_labels_gz(2049, 300, bytes([12] * 300)), "holds a label 12"),
], ids=["not-gzip", "images-magic", "short-body", "count-mismatch", "label-12"])
def test_a_file_that_passes_its_checksum_but_is_not_the_release_is_named(fake_release, content,
                                                                        expected):
    folder, sums, _, _ = fake_release
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(content)
    sums = {**sums, path.name: hashlib.sha256(content).hexdigest()}
    with pytest.raises(FmnistError, match=expected):
        data.load_idx(folder, sums)


def test_idx_needs_the_manual_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
    with pytest.raises(FmnistError, match="pass --manual-dir DIR"):
        data.load(data_dir=tmp_path, source="idx")
    with pytest.raises(FmnistError, match="does not exist"):
        data.load(data_dir=tmp_path, manual_dir=tmp_path / "nowhere", source="idx")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FmnistError, match="a_file is a file, not a folder: pass --manual-dir"):
        data.load(data_dir=tmp_path, manual_dir=tmp_path / "a_file", source="idx")


def test_an_unreadable_gz_file_is_named_in_one_line(fake_release, monkeypatch):
    folder, sums, _, _ = fake_release
    real_open = Path.open

    def open_refusing_one(path, *args, **kwargs):  # as chmod 000 does, even for root
        if path.name == "t10k-images-idx3-ubyte.gz":
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(Path, "open", open_refusing_one)
    with pytest.raises(FmnistError, match=r"cannot read \S+t10k-images-idx3-ubyte.gz "
                                          r"\(Permission denied\): make it readable"):
        data.load_idx(folder, sums)


def test_idx_and_csv_together_are_refused(tmp_path):
    with pytest.raises(FmnistError, match="--data-source idx reads the official release"):
        data.load(train_csv=tmp_path / "a.csv", test_csv=tmp_path / "b.csv", source="idx")


def test_without_tfds_the_files_are_read_with_numpy(fake_release, monkeypatch, capsys):
    folder, sums, _, _ = fake_release
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == "tensorflow_datasets" else real_find_spec(name, *a)))
    monkeypatch.setattr(idx_source, "OFFICIAL_SHA256", sums)
    train, test = data.load(data_dir=folder / "tfds", manual_dir=folder)
    assert (len(train), len(test)) == (300, 70)
    assert "reading the official .gz files with numpy" in capsys.readouterr().err
    assert not (folder / "tfds").exists()  # nothing prepared


def test_without_tfds_or_the_files_one_error_says_both(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == "tensorflow_datasets" else real_find_spec(name, *a)))
    monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
    with pytest.raises(FmnistError, match=r"^tensorflow-datasets cannot read or build its "
                       r"folder here .*, and reading the official .gz files needs .* "
                       r"--manual-dir DIR"):
        data.load(data_dir=tmp_path / "tfds")
    assert capsys.readouterr().err == ""  # the error alone, no note before it


def test_the_flag_reaches_the_reader(fake_release, monkeypatch):
    folder, sums, _, _ = fake_release
    monkeypatch.setattr(idx_source, "OFFICIAL_SHA256", sums)
    parser = Parser()
    add_data_flags(parser)
    args = parser.parse_args(["--data-source", "idx", "--manual-dir", str(folder)])
    train, _ = load_data(args)
    assert len(train) == 300


@pytest.mark.slow
def test_a_bad_file_is_one_line_from_the_script(fake_release, tmp_path):
    folder, _, _, _ = fake_release
    result = run_script("train.py", "--workdir", tmp_path / "run", "--data-source", "idx",
                        "--manual-dir", folder, "--compile-cache", "none")
    assert "train-images-idx3-ubyte.gz has the wrong checksum" in one_error_line(result)
