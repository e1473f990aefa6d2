"""Fashion-MNIST from Kaggle's CSV release (`fashion-mnist_train.csv`, `fashion-mnist_test.csv`).

Format: header `label,pixel1,...,pixel784`, then one image per line: its label 0..9 and its
784 pixels 0..255, row-major, so `pixel(28*i + j + 1)` is row i, column j of the image. An
image reads as the same uint8 array (and int32 label) as through the tfds path, and the Split
keeps the file's order (tfds stores its records shuffled).

Two passes, so that a valid file is fast and a broken one is reported exactly:
- fast: pyarrow's multithreaded C++ parser reads all 785 columns as uint8 (it rejects empty
  cells, non-numbers, values over 255 and rows of the wrong width), after a byte check that
  the body holds only digits, commas and line breaks (pyarrow alone would accept ` 5` and
  `0x5`);
- diagnostic, only when the fast pass fails: pyarrow re-reads the lines in chunks, and the
  first chunk it rejects is checked cell by cell in Python, to raise one FmnistError naming
  the file, the line and the header column of the first bad cell.
Nothing is skipped or replaced. Line endings may be LF, CRLF (Windows) or CR; a final line
break and a UTF-8 byte-order mark are optional.

Before the body is read, the path must be a regular file (a pipe or a device could hang or
never end), no larger than `MAX_FILE_BYTES`, and its first line the header.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np

from fmnist_jax.data.splits import Split
from fmnist_jax.errors import FmnistError

HEIGHT = WIDTH = 28
NUM_CLASSES = 10
HEADER = ("label",) + tuple(f"pixel{k}" for k in range(1, HEIGHT * WIDTH + 1))
_HEADER_TEXT = "label,pixel1,...,pixel784"
_LINE_HEADER = ",".join(HEADER)
_BOM = b"\xef\xbb\xbf"
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")  # what pyarrow splits lines on, so line numbers agree
_CHUNK_ROWS = 1024  # lines the diagnostic pass re-reads at once (see _raise_first_error)
_SIGNED_INT = re.compile(rb"-?[0-9]+")  # in a message, "-1" is out of range, not a non-integer
_SHOWN_CHARS = 20  # a cell quoted in a message is cut to this, so the message stays one line
# A line is at most 3,139 bytes (a label, 784 pixels of 3 digits, their commas, CRLF), so 1 GiB
# holds over 340,000 images, five times Fashion-MNIST's 70,000 (Kaggle's training file is
# 133 MB); the reader needs several times a file's size in memory, so a larger file is
# something else, refused before it is read.
MAX_FILE_BYTES = 1 << 30
_HEADER_READ = 1 << 16  # the header is 6,953 bytes: its line must end within this
_FIX = ("pass the path of a Fashion-MNIST CSV file, such as Kaggle's "
        "fashion-mnist_train.csv or fashion-mnist_test.csv")


def read_csv_split(path: str | os.PathLike) -> Split:
    """The whole CSV file as a Split (images uint8 (N, 28, 28, 1), labels int32 (N,)).

    Raises FmnistError naming the file, the line and the column of the first bad cell.
    """
    path = Path(path)
    _pyarrow(path)
    body = _read_body(path)
    if not body:
        raise FmnistError(f"{path} has the header but no data rows (line 2 is missing): "
                          f"expected one line per image after the header")
    columns_DxN = _parse_rows(body)
    if columns_DxN is None:
        _raise_first_error(path, body)
        raise FmnistError(f"{path} could not be parsed as a Fashion-MNIST CSV: check that it "
                          f"is Kaggle's format, header {_HEADER_TEXT}")  # not reached
    images_NxHxWx1 = np.ascontiguousarray(columns_DxN[1:].T).reshape(-1, HEIGHT, WIDTH, 1)
    return Split(images_NxHxWx1=images_NxHxWx1, labels_N=columns_DxN[0].astype(np.int32))


def write_csv_split(split: Split, path: str | os.PathLike, *, eol: str = "\n") -> None:
    """Write `split` in Kaggle's CSV format, to turn the official .gz data into CSV files.

    `eol="\\r\\n"` writes Windows line endings, as a file saved on Windows would have.
    """
    pa, pacsv = _pyarrow(path)

    images_NxHxWx1, labels_N = np.asarray(split.images_NxHxWx1), np.asarray(split.labels_N)
    n = len(labels_N)
    if images_NxHxWx1.dtype != np.uint8 or images_NxHxWx1.shape != (n, HEIGHT, WIDTH, 1):
        raise ValueError(f"images must be uint8 ({n}, {HEIGHT}, {WIDTH}, 1), got "
                         f"{images_NxHxWx1.dtype} {images_NxHxWx1.shape}")
    if labels_N.ndim != 1 or (n and not 0 <= labels_N.min() <= labels_N.max() < NUM_CLASSES):
        raise ValueError(f"labels must be a vector of class indices 0..{NUM_CLASSES - 1}")
    # Column-major, so that each of the 785 columns handed to pyarrow is one contiguous array.
    columns_DxN = np.empty((len(HEADER), n), np.uint8)
    columns_DxN[0] = labels_N
    columns_DxN[1:] = images_NxHxWx1.reshape(n, -1).T
    table = pa.table([pa.array(c) for c in columns_DxN], names=list(HEADER))
    with open(path, "wb") as f:
        # Our own header line: pyarrow would quote the names ("label","pixel1",...).
        f.write((",".join(HEADER) + eol).encode())
        pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, eol=eol))


def _read_body(path: Path) -> bytes:
    """The data rows of the file, read once its kind, its size and its header are checked; a
    missing, folder, special, too large, unreadable or empty path becomes one FmnistError."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FmnistError(f"{path} does not exist: {_FIX}") from None
    except OSError as e:
        raise FmnistError(f"{path} cannot be read ({e.strerror or e}): check its permissions, "
                          f"or {_FIX}") from e
    if stat.S_ISDIR(info.st_mode):
        raise FmnistError(f"{path} is a folder, not a CSV file: {_FIX}")
    if not stat.S_ISREG(info.st_mode):
        raise FmnistError(f"{path} is {_special_kind(info.st_mode)}, not a regular file: "
                          f"{_FIX}")
    _check_size(path, info.st_size)
    try:
        with path.open("rb") as f:
            head = f.read(_HEADER_READ)
            if len(head) < 64 and not head.strip(_BOM + b" \t\r\n"):  # a header is longer
                raise FmnistError(f"{path} is empty: expected Kaggle's Fashion-MNIST CSV, a "
                                  f"header {_HEADER_TEXT} and one line per image")
            f.seek(_check_header(path, head, whole=len(head) < _HEADER_READ))
            body = f.read(MAX_FILE_BYTES + 1)  # bounded: the file may grow while it is read
    except OSError as e:
        raise FmnistError(f"{path} cannot be read ({e.strerror or e}): check its permissions, "
                          f"or {_FIX}") from e
    _check_size(path, len(body))
    return body


def _special_kind(mode: int) -> str:
    """What a path that is neither a regular file nor a folder is, for a message."""
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _check_size(path: Path, size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise FmnistError(f"{path} is over {MAX_FILE_BYTES >> 30} GiB, more than a "
                          f"Fashion-MNIST CSV of 340,000 images holds (Kaggle's training file "
                          f"is 133 MB): {_FIX}")


def _check_header(path: Path, head: bytes, *, whole: bool) -> int:
    """Where the data rows start, after a header that must be exactly `HEADER`, from `head`:
    the file's first bytes (`whole`: all of them).

    A file without a header would otherwise lose its first image or fail with a confusing
    "label is not an integer"; a misspelled name means a different format, so it is fatal.
    """
    start = len(_BOM) if head.startswith(_BOM) else 0
    found = _LINE_BREAK.search(head, start)
    end, body_start = (found.start(), found.end()) if found else (len(head), len(head))
    names = head[start:end].decode("utf-8", "replace").split(",")
    where = f"{path}: line 1 (the header)"
    fix = f"the first line must be the header {_HEADER_TEXT}"
    cut = not found and not whole  # the first line runs on past `head`
    for k, (got, want) in enumerate(zip(names[:-1] if cut else names, HEADER), start=1):
        if got != want:
            no_header = " (the file has no header line?)" if got.strip().isdigit() else ""
            raise FmnistError(f"{where}, column {k}: found {_show(got)} where {want} belongs"
                              f"{no_header}: {fix}")
    if cut:
        raise FmnistError(f"{where} runs on past {_HEADER_READ // 1024} KiB without a line "
                          f"break; the header is {len(_LINE_HEADER)} bytes: {fix}")
    if len(names) < len(HEADER):
        raise FmnistError(f"{where} has {len(names)} columns, {len(HEADER)} expected: column "
                          f"{HEADER[len(names)]} is missing: {fix}")
    if len(names) > len(HEADER):
        raise FmnistError(f"{where} has {len(names)} columns, {len(HEADER)} expected: column "
                          f"{len(HEADER) + 1} {_show(names[len(HEADER)])} after "
                          f"{HEADER[-1]} is extra: {fix}")
    return body_start


def _pyarrow(path: Path | str):
    """(pyarrow, pyarrow.csv), imported late: tensorflow-datasets requires pyarrow, so it is
    there wherever tfds is; elsewhere one FmnistError line says what to install."""
    try:
        import pyarrow
        import pyarrow.csv
    except ImportError as e:
        raise FmnistError(f"{path}: reading or writing Fashion-MNIST CSV files needs "
                          f"pyarrow: pip install pyarrow") from e
    return pyarrow, pyarrow.csv


def _parse_rows(body: bytes) -> np.ndarray | None:
    """uint8 (785, N): the label column then the pixel columns; None if any row is wrong."""
    import pyarrow as pa  # read_csv_split checked with _pyarrow that these import
    import pyarrow.csv as pacsv

    if body.translate(None, b"0123456789,\r\n"):  # what is left once the allowed bytes go
        return None
    try:
        table = pacsv.read_csv(
            pa.BufferReader(body),
            read_options=pacsv.ReadOptions(column_names=list(HEADER)),
            # Quotes are not part of the format; blank lines must fail, not vanish.
            parse_options=pacsv.ParseOptions(quote_char=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.uint8() for name in HEADER}, null_values=[],
                strings_can_be_null=False))
    except pa.ArrowInvalid:
        return None
    if table.num_rows == 0:
        return None
    columns_DxN = np.stack([column.to_numpy() for column in table.columns])
    return None if columns_DxN[0].max() >= NUM_CLASSES else columns_DxN


def _raise_first_error(path: Path, body: bytes) -> None:
    """Raise FmnistError for the first bad line of the body, in file order.

    Python per cell is far too slow for a whole file, so pyarrow first re-reads the lines in
    chunks and only the first chunk it rejects is checked cell by cell.
    """
    lines = _LINE_BREAK.split(body)
    if lines[-1] == b"":
        lines.pop()  # the line break that ends the last line starts no new line
    for first in range(0, len(lines), _CHUNK_ROWS):
        chunk = lines[first:first + _CHUNK_ROWS]
        if _parse_rows(b"\n".join(chunk) + b"\n") is None:
            for row, line in enumerate(chunk, start=first + 1):
                _check_line(f"{path}: line {row + 1} (data row {row})", line)


def _check_line(where: str, line: bytes) -> None:
    """Raise FmnistError, prefixed by `where`, for the first problem in one data line.

    A cell is valid if it is a non-empty run of ASCII digits within its column's range.
    """
    if not line:
        raise FmnistError(f"{where} is empty, so column label and all pixels are missing: "
                          f"delete the blank line")
    cells = line.split(b",")
    if len(cells) < len(HEADER):
        raise FmnistError(f"{where} has {len(cells)} values, the header has {len(HEADER)}: "
                          f"column {HEADER[len(cells)]} and after are missing: each line "
                          f"needs a label and {HEIGHT * WIDTH} pixels")
    if len(cells) > len(HEADER):
        raise FmnistError(f"{where} has {len(cells)} values, the header has {len(HEADER)}: "
                          f"a value after column {HEADER[-1]} is extra: each line needs a "
                          f"label and {HEIGHT * WIDTH} pixels")
    for name, cell in zip(HEADER, cells):
        top = NUM_CLASSES - 1 if name == "label" else 255
        problem = _cell_problem(cell, top)
        if problem:
            kind = "labels" if name == "label" else "pixels"
            raise FmnistError(f"{where}, column {name}: {problem}; {kind} are integers "
                              f"0..{top}: correct the value in the file")


def _cell_problem(cell: bytes, top: int) -> str:
    """What is wrong with one cell, or "" if it is a valid integer 0..top."""
    if cell == b"":
        return "the value is missing (empty cell)"
    if not _SIGNED_INT.fullmatch(cell):
        return f"{_show(cell.decode('utf-8', 'replace'))} is not an integer"
    shown = cell.decode() if len(cell) <= _SHOWN_CHARS else _show(cell.decode())
    if not 0 <= int(cell) <= top:
        return f"{shown} is outside 0..{top}"
    if cell.startswith(b"-"):  # "-0": in range, yet the fast pass refuses its sign
        return f"{shown} has a minus sign"
    return ""


def _show(text: str) -> str:
    """`text` quoted and escaped for a one-line message, cut if long."""
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")
