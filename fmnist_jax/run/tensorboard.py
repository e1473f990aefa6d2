"""TensorBoard event files of a run, written with tensorboardX (no TensorFlow at run time).

`history.EpochLog` owns the folder (RUN/tensorboard/) and calls `TensorBoardLog.epoch` with each
history row. One sub-folder per data split, so that TensorBoard draws train, validation and
test on one chart per metric:

    RUN/tensorboard/train/  loss, accuracy, learning_rate
    RUN/tensorboard/val/    loss, accuracy           (runs with a validation split)
    RUN/tensorboard/test/   loss, accuracy

The step of every event is the epoch. The history (history.jsonl) stays the source of truth:
a resumed run cuts its history back to the checkpoint's epoch, so it deletes the event files
and writes the kept epochs again from the history into new ones (`replay`), then goes on;
the events then hold exactly the history's epochs, each once. A tensorboard/ that cannot be
written (a file or a dangling link in its place, a read-only folder) costs the run its events
only: one `note:` line, and the training goes on; nothing there is deleted but the log's own
folder.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
METRICS = ("loss", "accuracy")
LEARNING_RATE = "learning_rate"  # a history column and a tag (of the train folder)


@functools.cache
def _say_no_tensorboardx() -> None:
    print("note: tensorboardX is not installed, so this run writes no TensorBoard events "
          "(history.jsonl has every value): pip install tensorboardX", file=sys.stderr,
          flush=True)


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without importing torch; None when tensorboardX
    is not installed (a GPU box given the project with --no-deps): the events are a view of
    the history, so the run goes on without them and says so once.

    tensorboardX's writer module imports torch whenever it is installed (seconds, see
    BENCHMARKS.md) only to accept torch tensors as values; we pass Python floats. So while
    it is imported, torch is marked as not importable, unless something already imported
    it."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        if e.name != "tensorboardX":
            raise
        _say_no_tensorboardx()
        return None
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardLog:
    """Writers of RUN/tensorboard/SPLIT/, made when a split first has a value."""

    def __init__(self, folder: Path):
        # A resumed run writes its kept epochs again (`replay`): the old files would repeat
        # them, and hold the epochs after the checkpoint that are being trained again.
        shutil.rmtree(folder, ignore_errors=True)
        self.folder = folder
        self._writer_class = summary_writer_class()
        self._writers: dict[str, Any] = {}

    def _writer(self, split: str):
        if split not in self._writers:
            # flush_secs: the background flush; `epoch` flushes anyway, so TensorBoard shows
            # each epoch as soon as its row is in the history.
            self._writers[split] = self._writer_class(logdir=str(self.folder / split),
                                                      flush_secs=60)
        return self._writers[split]

    def epoch(self, row: dict[str, Any]) -> None:
        """One history row ({"epoch": N, "train_loss": ..., ...}) as events at step N."""
        if self._writer_class is None:
            return
        step = row["epoch"]
        try:
            for split in SPLITS:
                for metric in METRICS:
                    if f"{split}_{metric}" in row:
                        self._writer(split).add_scalar(metric, row[f"{split}_{metric}"], step)
            if LEARNING_RATE in row:
                self._writer("train").add_scalar(LEARNING_RATE, row[LEARNING_RATE], step)
            for writer in self._writers.values():
                writer.flush()
        except OSError as e:  # makedirs or open of an event file, in the writer's constructor
            self._give_up(e)

    def _give_up(self, error: OSError) -> None:
        """No more events from this log: the history has every value, so say so once and let
        the training go on."""
        print(f"note: cannot write TensorBoard events in {self.folder} "
              f"({error.strerror or error}): this run writes none (history.jsonl has every "
              f"value)", file=sys.stderr, flush=True)
        self._writer_class = None
        self.close()
        self._writers = {}

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """Write the events of `rows` (the epochs a resumed run keeps) again."""
        for row in rows:
            self.epoch(row)

    def close(self) -> None:
        for writer in self._writers.values():
            with contextlib.suppress(OSError):  # what it could not write is in the history
                writer.close()
