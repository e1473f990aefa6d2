"""TensorBoard event files: they hold the history, each epoch once, also after a resume."""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fmnist_jax.data import write_csv_split
from fmnist_jax.run import folder
from fmnist_jax.run.history import EpochLog, load_history
from tests.helpers import REPO, make_split, needs, read_tensorboard_scalars


def _as_events(history):
    """What the event files should hold for `history`: {split: {tag: {epoch: float32}}}."""
    expected: dict = {}
    for row in history:
        for key, value in row.items():
            if key == "epoch":
                continue
            split, tag = ("train", key) if key == "learning_rate" else key.split("_", 1)
            expected.setdefault(split, {}).setdefault(tag, {})[row["epoch"]] = float(
                np.float32(value))  # TensorBoard scalars are float32
    return expected


@needs("tensorboardX")
def test_a_run_writes_its_history_as_events(tiny_run):
    run_dir, _, history = tiny_run
    events = read_tensorboard_scalars(run_dir / folder.TENSORBOARD_DIR)
    assert events == _as_events(history)
    assert set(events) == {"train", "test"}  # no validation split in the tiny run
    assert set(events["train"]) == {"loss", "accuracy", "learning_rate"}


def _row(epoch: int, shift: float = 0.0):
    return {"epoch": epoch, "learning_rate": 1e-3 / epoch, "train_loss": 1.0 / epoch + shift,
            "train_accuracy": 0.5, "val_loss": 2.0 / epoch, "val_accuracy": 0.4 + shift,
            "test_loss": 3.0 / epoch, "test_accuracy": 0.3}


@needs("tensorboardX")
def test_a_resumed_log_holds_each_epoch_once(tmp_path):
    with EpochLog(tmp_path) as log:  # killed after epoch 3, its checkpoint of epoch 1
        for epoch in (1, 2, 3):
            log.epoch(_row(epoch), {})
    # As if written seconds before the resume (tensorboardX names files by the second).
    for path in (tmp_path / folder.TENSORBOARD_DIR).glob("*/events.out.tfevents.*"):
        path.rename(path.with_name("events.out.tfevents.1000000000.killed"))
    with EpochLog(tmp_path, resume_after=1) as log:
        log.epoch(_row(2, shift=0.01), {})  # epoch 2 again (other numbers, to tell them apart)
    history = load_history(tmp_path)
    assert history == [_row(1), _row(2, shift=0.01)]
    assert read_tensorboard_scalars(tmp_path / folder.TENSORBOARD_DIR) == _as_events(history)


@needs("tensorboardX")
def test_writing_events_imports_neither_tensorflow_nor_torch(tmp_path):
    code = ("import json, sys; from pathlib import Path\n"
            "from fmnist_jax.run.tensorboard import TensorBoardLog\n"
            f"log = TensorBoardLog(Path({str(tmp_path)!r}))\n"
            "log.epoch({'epoch': 1, 'train_loss': 0.5})\n"
            "log.close()\n"
            "print(json.dumps(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == []
    assert read_tensorboard_scalars(tmp_path) == {
        "train": {"loss": {1: 0.5}}}


def test_without_tensorboardx_a_run_logs_its_history_and_says_so_once(tmp_path, monkeypatch,
                                                                        capsys):
    """A GPU box given the project with --no-deps may lack tensorboardX: the events are a
    view of the history, so the run goes on without them. Two logs (as of two seeds), one
    note."""
    from fmnist_jax.run import tensorboard

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` fails
    tensorboard._say_no_tensorboardx.cache_clear()
    for seed_dir in (tmp_path / "seed-0", tmp_path / "seed-1"):
        seed_dir.mkdir()
        with EpochLog(seed_dir) as log:
            log.epoch(_row(1), {})
            log.epoch(_row(2), {})
        assert load_history(seed_dir) == [_row(1), _row(2)]
        assert not list((seed_dir / folder.TENSORBOARD_DIR).glob("**/events.out.tfevents.*"))
    err = capsys.readouterr().err
    assert err == ("note: tensorboardX is not installed, so this run writes no TensorBoard "
                   "events (history.jsonl has every value): pip install tensorboardX\n")


def _unwritable(tmp_path, how, monkeypatch):
    """RUN/tensorboard made unwritable: a file or a dangling link in its place, or (as root
    writes into any folder, a folder that refuses) every event file refused."""
    from fmnist_jax.run import tensorboard

    events = tmp_path / folder.TENSORBOARD_DIR
    shutil.rmtree(events)
    if how == "file":
        events.write_text("mine")
    elif how == "dangling link":
        events.symlink_to(tmp_path / "nowhere")
    else:
        class ReadOnly:
            def __init__(self, logdir, **kwargs):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), logdir)

        monkeypatch.setattr(tensorboard, "summary_writer_class", lambda: ReadOnly)


@needs("tensorboardX")
@pytest.mark.parametrize("how", ["file", "dangling link", "read-only"])
def test_an_unwritable_tensorboard_folder_is_one_note_and_the_run_goes_on(tmp_path, how,
                                                                          monkeypatch, capsys):
    with EpochLog(tmp_path) as log:  # killed after epoch 3, its checkpoint of epoch 1
        for epoch in (1, 2, 3):
            log.epoch(_row(epoch), {})
    _unwritable(tmp_path, how, monkeypatch)
    capsys.readouterr()
    with EpochLog(tmp_path, resume_after=1) as log:
        log.epoch(_row(2), {})
        log.epoch(_row(3), {})
    assert load_history(tmp_path) == [_row(1), _row(2), _row(3)]
    err = capsys.readouterr().err
    assert err.startswith(f"note: cannot write TensorBoard events in "
                          f"{tmp_path / folder.TENSORBOARD_DIR} (") and err.count("\n") == 1, err
    if how == "file":  # the user's file is kept
        assert (tmp_path / folder.TENSORBOARD_DIR).read_text() == "mine"


@needs("tensorboardX")
@pytest.mark.slow
def test_resume_with_a_file_in_place_of_tensorboard_finishes_with_one_note(tiny_run, tmp_path,
                                                                            run_main):
    run_dir = shutil.copytree(tiny_run[0], tmp_path / "run")
    (run_dir / folder.BEST_FILE).unlink()  # killed after its last checkpoint
    shutil.rmtree(run_dir / folder.TENSORBOARD_DIR)
    (run_dir / folder.TENSORBOARD_DIR).write_text("mine")
    write_csv_split(make_split(512, seed=0), tmp_path / "train.csv")  # the tiny run's data
    write_csv_split(make_split(300, seed=1), tmp_path / "test.csv")
    result = run_main("train.py", "--resume", run_dir, "--train-csv", tmp_path / "train.csv",
                      "--test-csv", tmp_path / "test.csv", "--no-report", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("note: cannot write TensorBoard events in ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert folder.finished(run_dir)
    assert load_history(run_dir) == tiny_run[2]
