"""Time the CSV reader on the full 60,000-row training file, made from the official .gz files:
`python -m benchmarks.time_csv --manual-dir DIR` (median of 3 reads, compile-free: pure parsing)."""

import argparse
import gzip
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fmnist_jax.data import Split, read_csv_split, resolve_manual_dir, write_csv_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manual-dir", help="the four official .gz files ($FMNIST_MANUAL_DIR)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    manual_dir = resolve_manual_dir(args.manual_dir)
    with gzip.open(manual_dir / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(manual_dir / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fashion-mnist_train.csv"
        write_csv_split(Split(images, labels), path)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            split = read_csv_split(path)
            seconds.append(time.perf_counter() - start)
        assert np.array_equal(split.images_NxHxWx1, images)
        print(f"{len(split)} rows, {path.stat().st_size / 2**20:.1f} MiB: parse and validate "
              f"median {statistics.median(seconds):.3f} s (all: "
              f"{', '.join(f'{s:.3f}' for s in seconds)})")


if __name__ == "__main__":
    main()
