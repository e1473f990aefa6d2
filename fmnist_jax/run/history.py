"""history.jsonl and timing.jsonl: a run's metrics and timings, one line per epoch, and the
same metrics as TensorBoard events; on resume, the history cut back to its checkpoint.

Timings live apart from the history, so that the same seed writes the same history bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fmnist_jax.errors import FmnistError
from fmnist_jax.run.folder import HISTORY_FILE, TENSORBOARD_DIR, TIMING_FILE, write_file
from fmnist_jax.run.parallel import is_writer
from fmnist_jax.run.tensorboard import TensorBoardLog


class EpochLog:
    """history.jsonl and timing.jsonl, appended to and flushed once per epoch, and the
    history's values as TensorBoard events in tensorboard/ (see `tensorboard_log`).

    Use as a context manager: `with history.EpochLog(run_dir) as log: log.epoch(row, seconds)`.
    `resume_after=k` continues a run from its checkpoint of epoch k: the first k history
    lines are kept byte for byte, and whatever was written after them (epochs past the
    checkpoint, a line cut by a kill) is dropped, to be written again the same way. The
    event files are written anew from the k kept lines, so they too hold each epoch once.
    """

    def __init__(self, run_dir: Path, *, resume_after: int | None = None):
        if not is_writer():  # the other processes of a run log nowhere
            self._history, self._timing = open(os.devnull, "w"), open(os.devnull, "w")
            self._events = None
            return
        if resume_after is None:
            self._history = open(run_dir / HISTORY_FILE, "w")
            self._timing = open(run_dir / TIMING_FILE, "w")
            self._events = TensorBoardLog(run_dir / TENSORBOARD_DIR)
            return
        _truncate_history(run_dir, resume_after)
        self._history = open(run_dir / HISTORY_FILE, "a")
        self._timing = open(run_dir / TIMING_FILE, "a")
        self._timing.write(json.dumps({"resumed_after_epoch": resume_after}) + "\n")
        self._timing.flush()
        self._events = TensorBoardLog(run_dir / TENSORBOARD_DIR)
        self._events.replay(load_history(run_dir))

    def compile_seconds(self, seconds: float, *, startup_seconds: float | None = None) -> None:
        """The first line: compile seconds, and the command's seconds to its first epoch."""
        row = {"compile_seconds": seconds}
        if startup_seconds is not None:
            row["startup_seconds"] = startup_seconds
        self._timing.write(json.dumps(row) + "\n")
        self._timing.flush()

    def checkpoint_seconds(self, epoch: int, seconds: float) -> None:
        """How long the checkpoint after `epoch` took (to return, when asynchronous)."""
        self._timing.write(json.dumps({"epoch": epoch, "checkpoint_seconds": seconds}) + "\n")
        self._timing.flush()

    def epoch(self, row: dict[str, Any], timing: dict[str, float]) -> None:
        """One epoch: its metrics `row` (with "epoch") to the history and the events,
        `timing` apart."""
        self._history.write(json.dumps(row) + "\n")
        self._history.flush()
        if self._events is not None:
            self._events.epoch(row)
        self._timing.write(json.dumps({"epoch": row["epoch"], **timing}) + "\n")
        self._timing.flush()

    def __enter__(self) -> EpochLog:
        return self

    def __exit__(self, *exc) -> None:
        self._history.close()
        self._timing.close()
        if self._events is not None:
            self._events.close()


def _truncate_history(run_dir: Path, epochs: int) -> None:
    """Keep the first `epochs` lines of history.jsonl (they must be epochs 1..epochs)."""
    path = run_dir / HISTORY_FILE
    lines = path.read_bytes().split(b"\n") if path.is_file() else []
    kept = lines[:epochs]
    try:
        ok = len(kept) == epochs and all(json.loads(line)["epoch"] == number
                                         for number, line in enumerate(kept, start=1))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise FmnistError(f"{path} does not hold epochs 1 to {epochs}, the ones its checkpoint "
                          f"has: it was edited or damaged; train again in a new folder")
    write_file(path, b"".join(line + b"\n" for line in kept))


def load_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run (empty if it has no history yet)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    rows = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:  # a line of binary garbage is as damaged as one of bad JSON
            line = raw.decode()
            if not line.strip():
                continue
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            reason = (f"not UTF-8 text: {e.reason}" if isinstance(e, UnicodeDecodeError)
                      else e.msg)
            raise FmnistError(f"{path} line {number} is malformed ({reason}): restore it from "
                              f"the run or delete the line") from e
        if not (isinstance(row, dict) and type(row.get("epoch")) is int and all(
                type(v) in (int, float) for v in row.values())):
            raise FmnistError(f"{path} line {number} is not an epoch's metrics (an object of "
                              f"numbers with an integer epoch): restore it from the run or "
                              f"delete the line")
        if rows and row.keys() != rows[0].keys():
            raise FmnistError(f"{path} line {number} has other fields than line 1: restore it "
                              f"from the run or delete the line")
        rows.append(row)
    return rows
