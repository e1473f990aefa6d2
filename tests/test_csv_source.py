"""Kaggle's Fashion-MNIST CSV: exact round trips, and one precise error line per bad input.

Fast tests write tiny CSVs into tmp_path; the real-image tests decode the official .gz files
directly (idx format) so they check the CSV reader against the release bytes, not against
another reader of ours.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmnist_jax.data.csv_source import HEADER, read_csv_split, write_csv_split
from fmnist_jax.data import Split
from fmnist_jax.errors import FmnistError
from tests.helpers import REPO, SHARED_MANUAL_DIR

OFFICIAL_DIR = Path(os.environ.get("FMNIST_MANUAL_DIR", SHARED_MANUAL_DIR))  # the .gz files
N_PIXELS = 28 * 28


def _random_split(n: int, seed: int = 0) -> Split:
    """n images using every pixel value 0..255 and every label, so no range goes untested."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    images.reshape(-1)[:256] = np.arange(256)
    labels = (np.arange(n) % 10).astype(np.int32)
    return Split(images_NxHxWx1=images, labels_N=labels)


def _rows(n: int) -> list[list[str]]:
    """n valid data rows as lists of cell strings (label, then 784 pixels)."""
    split = _random_split(n)
    return [[str(split.labels_N[i])] + [str(v) for v in split.images_NxHxWx1[i].reshape(-1)]
            for i in range(n)]


def _write_rows(path: Path, rows: list[list[str]], *, header: list[str] | None = None,
                eol: str = "\n", final_eol: bool = True, bom: bool = False) -> Path:
    """A CSV with `header` (default: the real one) and `rows`, in the given line style."""
    lines = [",".join(HEADER if header is None else header)] + [",".join(r) for r in rows]
    text = eol.join(lines) + (eol if final_eol else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def _official(prefix: str, n: int) -> Split:
    """The first n images and labels of an official .gz pair (idx: 16- and 8-byte headers)."""
    with gzip.open(OFFICIAL_DIR / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(16 + n * N_PIXELS), np.uint8, offset=16)
    with gzip.open(OFFICIAL_DIR / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(8 + n), np.uint8, offset=8)
    return Split(images_NxHxWx1=images.reshape(-1, 28, 28, 1), labels_N=labels.astype(np.int32))


def _assert_same(got: Split, want: Split) -> None:
    assert got.images_NxHxWx1.dtype == np.uint8 and got.labels_N.dtype == np.int32
    assert got.images_NxHxWx1.shape == want.images_NxHxWx1.shape
    assert got.images_NxHxWx1.flags.c_contiguous
    np.testing.assert_array_equal(got.images_NxHxWx1, want.images_NxHxWx1)
    np.testing.assert_array_equal(got.labels_N, want.labels_N)


def _error(path: Path) -> str:
    """The FmnistError message for reading `path`, checked to be one line naming the file."""
    with pytest.raises(FmnistError) as info:
        read_csv_split(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message
    return message


# ---- valid files -------------------------------------------------------------------------

@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("final_eol", [True, False])
@pytest.mark.parametrize("bom", [False, True])
def test_line_styles_round_trip(tmp_path, eol, final_eol, bom):
    """LF, Windows CRLF and old-Mac CR files, with or without a final line break or BOM."""
    want = _random_split(5)
    rows = [[str(want.labels_N[i])] + [str(v) for v in want.images_NxHxWx1[i].reshape(-1)]
            for i in range(5)]
    path = _write_rows(tmp_path / "f.csv", rows, eol=eol, final_eol=final_eol, bom=bom)
    _assert_same(read_csv_split(path), want)


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_writer_round_trip(tmp_path, eol):
    want = _random_split(37, seed=3)
    path = tmp_path / "f.csv"
    write_csv_split(want, path, eol=eol)
    assert path.read_bytes().startswith(b"label,pixel1,pixel2,")
    assert path.read_bytes().count(eol.encode()) == 38
    _assert_same(read_csv_split(path), want)


def test_leading_zeros_are_integers(tmp_path):
    rows = _rows(2)
    rows[1][0], rows[1][5] = "07", "00255"
    got = read_csv_split(_write_rows(tmp_path / "f.csv", rows))
    assert got.labels_N[1] == 7 and got.images_NxHxWx1[1].reshape(-1)[4] == 255


def test_pixel_order_is_row_major(tmp_path):
    """pixel(28*i + j + 1) is row i, column j, as in the idx files."""
    rows = [["3"] + ["0"] * N_PIXELS]
    rows[0][HEADER.index("pixel30")] = "200"  # row 1, column 1
    got = read_csv_split(_write_rows(tmp_path / "f.csv", rows))
    assert got.images_NxHxWx1[0, 1, 1, 0] == 200 and got.images_NxHxWx1.sum() == 200


def test_writer_rejects_wrong_arrays(tmp_path):
    split = _random_split(3)
    with pytest.raises(ValueError, match="uint8"):
        write_csv_split(Split(split.images_NxHxWx1.astype(np.int32), split.labels_N),
                        tmp_path / "f.csv")
    with pytest.raises(ValueError, match="0..9"):
        write_csv_split(Split(split.images_NxHxWx1, split.labels_N + 10), tmp_path / "f.csv")


@pytest.mark.skipif(not OFFICIAL_DIR.is_dir(), reason="official .gz files not present")
def test_official_images_round_trip(tmp_path):
    want = _official("train", 2000)
    write_csv_split(want, tmp_path / "train.csv", eol="\r\n")
    _assert_same(read_csv_split(tmp_path / "train.csv"), want)


@pytest.mark.slow
@pytest.mark.skipif(not OFFICIAL_DIR.is_dir(), reason="official .gz files not present")
def test_full_train_split_round_trip(tmp_path):
    """All 60,000 train images (its parse time is measured by `python -m benchmarks.time_csv`)."""
    want = _official("train", 60_000)
    write_csv_split(want, tmp_path / "fashion-mnist_train.csv")
    _assert_same(read_csv_split(tmp_path / "fashion-mnist_train.csv"), want)


@pytest.mark.slow
@pytest.mark.skipif(not OFFICIAL_DIR.is_dir(), reason="official .gz files not present")
def test_error_in_last_row_of_full_file(tmp_path):
    """The diagnostic pass reaches the last of 60,000 rows and reports it exactly."""
    write_csv_split(_official("train", 60_000), tmp_path / "train.csv")
    path = tmp_path / "train.csv"
    path.write_bytes(path.read_bytes().rstrip(b"\n") + b"x\n")
    message = _error(path)
    assert "line 60001 (data row 60000), column pixel784: " in message


# ---- errors in cells ---------------------------------------------------------------------

@pytest.mark.parametrize("column, value, expected", [
    ("pixel213", "", "the value is missing (empty cell)"),
    ("label", "", "the value is missing (empty cell)"),
    ("pixel784", "", "the value is missing (empty cell)"),
    ("pixel213", "12.5", "'12.5' is not an integer"),
    ("pixel213", "abc", "'abc' is not an integer"),
    ("pixel213", " 5", "' 5' is not an integer"),
    ("pixel213", "0x5", "'0x5' is not an integer"),
    ("pixel213", '"5"', "'\"5\"' is not an integer"),
    ("pixel213", "1e2", "'1e2' is not an integer"),
    ("pixel213", "+5", "'+5' is not an integer"),
    ("pixel1", "٣", "'٣' is not an integer"),  # a non-ASCII digit
    ("pixel213", "256", "256 is outside 0..255"),
    ("pixel213", "-1", "-1 is outside 0..255"),
    ("pixel213", "-0", "-0 has a minus sign"),
    ("label", "-00", "-00 has a minus sign"),
    ("pixel213", "9" * 30, "'99999999999999999999...' is outside 0..255"),
    ("label", "10", "10 is outside 0..9"),
    ("label", "-3", "-3 is outside 0..9"),
    ("label", "abc", "'abc' is not an integer"),
    ("label", "2.0", "'2.0' is not an integer"),
])
@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_bad_cell_names_file_line_and_column(tmp_path, column, value, expected, eol):
    rows = _rows(5)
    rows[3][HEADER.index(column)] = value  # data row 4, physical line 5
    message = _error(_write_rows(tmp_path / "bad.csv", rows, eol=eol))
    assert f"line 5 (data row 4), column {column}: {expected}" in message


def test_first_bad_cell_in_file_order_is_reported(tmp_path):
    rows = _rows(4)
    rows[1][HEADER.index("pixel700")] = "300"
    rows[1][HEADER.index("pixel9")] = "x"
    rows[2][0] = "11"
    message = _error(_write_rows(tmp_path / "bad.csv", rows))
    assert "line 3 (data row 2), column pixel9: 'x' is not an integer" in message


def test_bad_label_in_last_row_without_final_line_break(tmp_path):
    rows = _rows(3)
    rows[2][0] = "12"
    message = _error(_write_rows(tmp_path / "bad.csv", rows, final_eol=False, bom=True))
    assert "line 4 (data row 3), column label: 12 is outside 0..9" in message


# ---- errors in the shape of rows ---------------------------------------------------------

def test_short_row_names_first_missing_column(tmp_path):
    rows = _rows(3)
    rows[1] = rows[1][:-1]
    message = _error(_write_rows(tmp_path / "bad.csv", rows))
    assert "line 3 (data row 2) has 784 values, the header has 785: column pixel784" in message


def test_long_row_names_extra_column(tmp_path):
    rows = _rows(3)
    rows[2].append("0")
    message = _error(_write_rows(tmp_path / "bad.csv", rows, eol="\r\n"))
    assert "line 4 (data row 3) has 786 values" in message
    assert "after column pixel784 is extra" in message


def test_one_value_row(tmp_path):
    rows = _rows(3)
    rows[0] = ["4"]
    message = _error(_write_rows(tmp_path / "bad.csv", rows))
    assert "line 2 (data row 1) has 1 values, the header has 785: column pixel1" in message


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_blank_line_inside_is_an_error(tmp_path, eol):
    rows = _rows(3)
    rows.insert(1, [""])
    message = _error(_write_rows(tmp_path / "bad.csv", rows, eol=eol))
    assert "line 3 (data row 2) is empty, so column label and all pixels are missing" in message


def test_blank_line_at_end_is_an_error(tmp_path):
    path = _write_rows(tmp_path / "bad.csv", _rows(2))
    path.write_bytes(path.read_bytes() + b"\n")
    assert "line 4 (data row 3) is empty" in _error(path)


# ---- errors in the header ----------------------------------------------------------------

def test_misspelled_header_names_the_column(tmp_path):
    header = list(HEADER)
    header[13] = "pixle13"
    message = _error(_write_rows(tmp_path / "bad.csv", _rows(2), header=header))
    assert "line 1 (the header), column 14: found 'pixle13' where pixel13 belongs" in message


def test_capitalised_label_header(tmp_path):
    header = ["Label"] + list(HEADER[1:])
    message = _error(_write_rows(tmp_path / "bad.csv", _rows(2), header=header, eol="\r\n"))
    assert "line 1 (the header), column 1: found 'Label' where label belongs" in message


def test_missing_header_line(tmp_path):
    rows = _rows(3)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    message = _error(path)
    assert f"line 1 (the header), column 1: found '{rows[0][0]}' where label belongs" in message
    assert "no header line" in message


def test_header_missing_a_column(tmp_path):
    message = _error(_write_rows(tmp_path / "bad.csv", _rows(2), header=list(HEADER[:-1])))
    assert "line 1 (the header) has 784 columns, 785 expected: column pixel784 is missing" \
        in message


def test_header_with_extra_column(tmp_path):
    header = list(HEADER) + ["extra"]
    message = _error(_write_rows(tmp_path / "bad.csv", _rows(2), header=header))
    assert "line 1 (the header) has 786 columns, 785 expected: column 786 'extra' after " \
           "pixel784 is extra" in message


def test_header_only_file(tmp_path):
    for final_eol in (True, False):
        path = _write_rows(tmp_path / "bad.csv", [], final_eol=final_eol)
        assert "has the header but no data rows (line 2 is missing)" in _error(path)


# ---- errors in the file itself -----------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n", b"\xef\xbb\xbf", b"  \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    assert f"{path} is empty" in _error(path)


def test_missing_file(tmp_path):
    assert f"{tmp_path / 'nope.csv'} does not exist" in _error(tmp_path / "nope.csv")


def test_folder(tmp_path):
    assert f"{tmp_path} is a folder, not a CSV file" in _error(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    """Root ignores chmod 000, so the OS refusal is simulated at the one read."""
    path = _write_rows(tmp_path / "locked.csv", _rows(1))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    assert f"{path} cannot be read (Permission denied)" in _error(path)


def _read_in_child(path: Path, timeout: float = 20) -> str:
    """`read_csv_split(path)` in a child process, its memory capped at 2 GiB: what it printed
    (the error, or "read"); a read that hangs or grows without end fails the test instead of
    stopping it."""
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))\n"
            "from fmnist_jax.data.csv_source import read_csv_split\n"
            "from fmnist_jax.errors import FmnistError\n"
            "try:\n    read_csv_split(sys.argv[1]); print('read')\n"
            "except FmnistError as e:\n    print(e)\n"
            "except MemoryError:\n    print('out of memory')\n")
    try:
        result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                text=True, timeout=timeout,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} did not end within {timeout} s")
    return result.stdout.strip() or result.stderr[-2000:]


@pytest.mark.slow
def test_a_named_pipe_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "train.csv"
    os.mkfifo(fifo)
    assert _read_in_child(fifo) == (f"{fifo} is a named pipe, not a regular file: pass the "
                                    f"path of a Fashion-MNIST CSV file, such as Kaggle's "
                                    f"fashion-mnist_train.csv or fashion-mnist_test.csv")


@pytest.mark.slow
def test_a_device_is_refused_not_read_without_end():
    assert _read_in_child(Path("/dev/zero")).startswith(
        "/dev/zero is a device, not a regular file: pass the path of a Fashion-MNIST CSV")


def test_a_file_larger_than_any_fashion_mnist_csv_is_refused_unread(tmp_path, monkeypatch):
    from fmnist_jax.data import csv_source

    path = write_csv_split_for_test(tmp_path)
    monkeypatch.setattr(csv_source, "MAX_FILE_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(Path, "open", lambda *a, **k: pytest.fail("the file was opened"))
    assert "more than a Fashion-MNIST CSV of 340,000 images holds" in _error(path)


@pytest.mark.slow
def test_a_sparse_file_of_more_than_1_gib_is_refused_at_once(tmp_path):
    """Its size alone refuses it: nothing is read (in a child, so that the unchecked read,
    a GiB of zeros, cannot slow the other tests)."""
    path = tmp_path / "huge.csv"
    with path.open("wb") as f:
        f.write((",".join(HEADER) + "\n").encode())
        f.truncate((1 << 30) + 1)
    assert _read_in_child(path, timeout=10) == (
        f"{path} is over 1 GiB, more than a Fashion-MNIST CSV of 340,000 images holds "
        f"(Kaggle's training file is 133 MB): pass the path of a Fashion-MNIST CSV file, such "
        f"as Kaggle's fashion-mnist_train.csv or fashion-mnist_test.csv")


@pytest.mark.slow
def test_a_bad_header_is_refused_before_the_body_is_read(tmp_path):
    """Only the first 64 KiB are read: a misnamed header over 300 MB of zeros (a sparse
    file) is refused without the process reading them (its peak memory stays put)."""
    path = tmp_path / "foreign.csv"
    with path.open("wb") as f:
        f.write(b"id,name,value\n1,a,2\n")
        f.truncate(300 << 20)
    code = ("import resource, sys\n"
            "from fmnist_jax.data.csv_source import read_csv_split, _pyarrow\n"
            "_pyarrow('')\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    read_csv_split(sys.argv[1])\n"
            "except Exception as e:\n    print(e)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) >> 10)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    message, grown_mib = result.stdout.strip().splitlines()
    assert message.startswith(f"{path}: line 1 (the header), column 1: found 'id' where label "
                              f"belongs"), result.stderr[-2000:]
    assert int(grown_mib) < 50


def test_a_first_line_without_end_is_refused_after_64_kib(tmp_path):
    path = tmp_path / "one-line.csv"
    long_line = (",".join(HEADER) + ",0" * 20_000).encode()  # 46,953 bytes: read whole
    path.write_bytes(long_line)
    assert "line 1 (the header) has 20785 columns" in _error(path)
    path.write_bytes(long_line * 2)
    assert (f"{path}: line 1 (the header) runs on past 64 KiB without a line break; the header "
            f"is 6953 bytes") in _error(path)
    path.write_bytes(b"label,pixel1,pixel3" + b",0" * 40_000)  # a wrong name comes first
    assert "column 3: found 'pixel3' where pixel2 belongs" in _error(path)


@pytest.mark.slow
def test_same_images_as_the_tfds_path(tmp_path, fashion_mnist):
    """The test split's CSV holds exactly tfds's images and labels (tfds stores them shuffled,
    so rows are compared sorted)."""
    write_csv_split(_official("t10k", 10_000), tmp_path / "fashion-mnist_test.csv")
    got, want = read_csv_split(tmp_path / "fashion-mnist_test.csv"), fashion_mnist[1]

    def sorted_rows(split: Split) -> np.ndarray:
        rows = np.concatenate([split.labels_N[:, None].astype(np.uint8),
                               split.images_NxHxWx1.reshape(len(split), -1)], axis=1)
        return rows[np.lexsort(rows.T[::-1])]

    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(want))


@pytest.mark.skipif(not OFFICIAL_DIR.is_dir(), reason="official .gz files not present")
def test_foreign_file_fails_on_the_header():
    """The idx .gz file passed by mistake: its first bytes are not the header."""
    path = OFFICIAL_DIR / "t10k-labels-idx1-ubyte.gz"
    assert "line 1 (the header), column 1: found '\\x1f" in _error(path)


def test_missing_pyarrow(tmp_path, monkeypatch):
    path = _write_rows(tmp_path / "f.csv", _rows(1))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    monkeypatch.setitem(sys.modules, "pyarrow.csv", None)
    assert "needs pyarrow: pip install pyarrow" in _error(path)


# --- the CSV as a data source of the commands ---------------------------------------------

def test_both_csv_files_or_neither(tmp_path):
    from fmnist_jax.data import load

    path = write_csv_split_for_test(tmp_path)
    with pytest.raises(FmnistError, match="pass both --train-csv and --test-csv"):
        load(train_csv=path)
    train, test = load(train_csv=path, test_csv=path)
    _assert_same(train, test)


def write_csv_split_for_test(tmp_path) -> Path:
    path = tmp_path / "small.csv"
    write_csv_split(_random_split(12), path)
    return path


def test_train_script_reports_a_bad_csv_cell_in_one_line(tmp_path, run_main):
    rows = _rows(3)
    rows[1][214] = "x"
    bad = _write_rows(tmp_path / "train.csv", rows)
    result = run_main("train.py", "--train-csv", bad, "--test-csv", bad,
                      "--workdir", tmp_path / "run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}: line 3 (data row 2), column pixel214: 'x' is not an integer; pixels are "
        f"integers 0..255: correct the value in the file"]


@pytest.mark.slow
def test_one_epoch_from_csv_equals_one_epoch_from_tfds(tmp_path, fashion_mnist):
    """CSV files holding the tfds arrays in tfds's order train to the same bytes: the source
    changes nothing downstream. (A CSV of the official files has the same images in the
    release's order, which tfds shuffles: same accuracy within seed noise, other bytes.)"""
    from fmnist_jax.run import folder
    from fmnist_jax.run.presets import get_config
    from fmnist_jax.data import load
    from tests.helpers import train_quietly

    train, test = fashion_mnist
    write_csv_split(train, tmp_path / "train.csv")
    write_csv_split(test, tmp_path / "test.csv")
    csv_train, csv_test = load(train_csv=tmp_path / "train.csv", test_csv=tmp_path / "test.csv")
    cfg = get_config(epochs=1)
    _, from_csv = train_quietly(cfg, tmp_path / "csv_run", (csv_train, csv_test))
    _, from_tfds = train_quietly(cfg, tmp_path / "tfds_run", fashion_mnist)
    assert from_csv == from_tfds and from_csv[0]["test_accuracy"] > 0.8
    folder.check_data(tmp_path / "csv_run", train, test)  # same data: accepted
    with pytest.raises(FmnistError, match="not the ones .* was trained on"):
        folder.check_data(tmp_path / "csv_run", _official("train", 60_000), test)
