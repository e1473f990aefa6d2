"""The run folder: every file in it is named, written and read here, and nowhere else.

A run folder holds:

| file                                  | written by              | what                                  |
| ------------------------------------- | ----------------------- | ------------------------------------- |
| config.json                           | training, at the start  | the full TrainConfig                  |
| normalization.json                    | training, at the start  | the pixel mean/std the model saw      |
| data.json                             | training, at the start  | fingerprints of its train/test data   |
| history.jsonl                         | training, every epoch   | losses and accuracies (reproducible)  |
| timing.jsonl                          | training, every epoch   | compile, start-up, train, eval seconds|
| checkpoints/EPOCH/                    | training, every epoch   | the whole training state (orbax)      |
| tensorboard/{train,val,test}/         | training, every epoch   | the history as TensorBoard events     |
| best.json                             | training, at the end    | which epoch's parameters params/ holds|
| params/                               | training, at the end    | parameters and BatchNorm statistics   |
| params.sha256                         | training, at the end    | sha256 of every file under params/    |
| calibration.json                      | evaluation              | the temperature fit on validation     |
| report.txt, report.json, *.png        | evaluation              | the report and its plots              |

A run of several seeds (`--seeds K`, K > 1) is a folder of ordinary run folders, one per seed
(`seed-S/`, each exactly as above, its config.json with that seed and `seeds` 1), and:

| file                                  | written by              | what                                  |
| ------------------------------------- | ----------------------- | ------------------------------------- |
| seeds.json                            | training, at the start  | the config (with `seeds`), the folders|
| summary.json                          | training, at the end    | each seed's test accuracy, mean, std, |
|                                       |                         | 95% confidence interval               |

Timings live apart from the history, so that the same seed writes the same history bytes.
An existing run is never overwritten: a run claims its folder by creating config.json with
O_EXCL (`claim`), so of two trainings started on one folder exactly one gets it, and a folder
holding anything else is refused. `reopen` takes an interrupted run back for --resume.

With several processes (`parallel`), process 0 alone claims the folder and writes its files;
the others only take part in orbax's collective saves of checkpoints/ and params/ (orbax
writes each array once, from the replicas it picks, and syncs the processes).

A run is finished once params.sha256 exists: it is written last. checkpoints/ keeps the
latest epoch's state and, with a validation split, the best epoch's (by validation accuracy);
params/ holds the best epoch's variables (the last epoch's without a validation split), and
best.json says which epoch that is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp  # checkpoints every epoch need it from the start anyway

from fmnist_jax.run.config import TrainConfig
from fmnist_jax.data import Normalization, Split, fingerprint
from fmnist_jax.errors import FmnistError
from fmnist_jax.files import first_line, quiet_absl, write_atomically
from fmnist_jax.models import get_model
from fmnist_jax.run.parallel import is_writer
from fmnist_jax.steps import init_variables
from fmnist_jax.run.tensorboard import TensorBoardLog

CONFIG_FILE = "config.json"
NORMALIZATION_FILE = "normalization.json"
DATA_FILE = "data.json"
HISTORY_FILE = "history.jsonl"
TIMING_FILE = "timing.jsonl"
PARAMS_DIR = "params"
PARAMS_CHECKSUM_FILE = "params.sha256"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
BEST_FILE = "best.json"
CALIBRATION_FILE = "calibration.json"
REPORT_TEXT_FILE = "report.txt"
REPORT_JSON_FILE = "report.json"
SEEDS_FILE = "seeds.json"
SUMMARY_FILE = "summary.json"
PLOT_FILES = {"confusion_matrix": "confusion_matrix.png", "reliability": "reliability.png",
              "curves": "curves.png"}


# ---------------------------------------------------------------------------------------
# The folder


@dataclasses.dataclass(frozen=True)
class Claim:
    """A run folder this process owns: it created the folder's config.json exclusively."""

    path: Path
    config: TrainConfig
    made_folder: bool  # the folder did not exist before: `abandon` may remove it
    resumed: bool = False  # taken back by `reopen`: continue it, never give it back
    # An open file of the folder, flock-ed for as long as this process lives: a second
    # --resume of the same folder is refused while this one runs (a killed process's lock
    # goes with it). None for claims made in other ways.
    lock: Any = dataclasses.field(default=None, compare=False, repr=False)
    # A run of several seeds: the claim of each seed's run folder, in seed order (`path` is
    # then the folder holding them, and `config` the config with `seeds`).
    members: tuple[Claim, ...] = ()

    def release(self) -> None:
        """Close the locks of this claim and of its seeds' claims: another process may then
        --resume the folder. The files stay; a claim released twice is released once."""
        for claim in (self, *self.members):
            if claim.lock is not None:
                claim.lock.close()


def default_workdir(preset: str, seed: int, seeds: int = 1) -> Path:
    """runs/PRESET-seedN-TIMESTAMP-PID (runs/PRESET-seedsN-M-... for seeds N..M): the pid
    keeps apart two runs started in the same second (the exclusive claim refuses any
    collision that is left)."""
    name = f"seed{seed}" if seeds == 1 else f"seeds{seed}-{seed + seeds - 1}"
    return Path("runs") / f"{preset}-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def member_dir(run_dir: str | Path, seed: int) -> Path:
    """The run folder of `seed` inside the folder of a run of several seeds."""
    return Path(run_dir) / f"seed-{seed}"


def claim(workdir: str | Path, cfg: TrainConfig) -> Claim:
    """Claim `workdir` for a new run of `cfg`: make it (parents too) unless it exists, refuse a
    folder holding anything, then create its config.json with O_EXCL, the atomic step that
    lets exactly one of two trainings started together have the folder. Cheap: call it
    before loading any data, so that a bad --workdir fails within a second. Processes other
    than process 0 of a run with several get a claim that touches nothing.

    With `cfg.seeds` > 1 the file created exclusively is seeds.json, and then each seed's
    run folder `seed-S/` inside is claimed for its own config (`TrainConfig.members`)."""
    run_dir = Path(workdir)
    if not is_writer():
        return _claim_of_another_process(run_dir, cfg)
    made_folder = _empty_folder(run_dir)
    if cfg.seeds > 1:
        members = cfg.members()
        _create_exclusively(run_dir, SEEDS_FILE, json.dumps(
            {"config": json.loads(cfg.to_json()),
             "runs": [member_dir(".", m.seed).name for m in members]}, indent=2) + "\n")
        claimed: list[Claim] = []
        try:
            for member in members:
                claimed.append(claim(member_dir(run_dir, member.seed), member))
        except BaseException:
            abandon(Claim(path=run_dir, config=cfg, made_folder=made_folder,
                          members=tuple(claimed)))
            raise
        return Claim(path=run_dir, config=cfg, made_folder=made_folder, members=tuple(claimed))
    _create_exclusively(run_dir, CONFIG_FILE, cfg.to_json() + "\n")
    return Claim(path=run_dir, config=cfg, made_folder=made_folder,
                 lock=_lock(run_dir, wait=True))


def _claim_of_another_process(run_dir: Path, cfg: TrainConfig, *, resumed: bool = False) -> Claim:
    """What a process other than process 0 gets from `claim` and `reopen`: a claim of the
    shape process 0's has (so it runs the same loop) that touches nothing."""
    return Claim(path=run_dir, config=cfg, made_folder=False, resumed=resumed, members=tuple(
        Claim(path=member_dir(run_dir, member.seed), config=member, made_folder=False,
              resumed=resumed) for member in (cfg.members() if cfg.seeds > 1 else ())))


def _empty_folder(run_dir: Path) -> bool:
    """Make `run_dir` unless it exists; FmnistError unless it is an empty folder. Returns
    whether it was made."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FmnistError(f"--workdir {run_dir} is a file, not a folder: pass a new folder")
    made_folder = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        entries = sorted(os.listdir(run_dir))
    except OSError as e:
        raise FmnistError(f"cannot make the run folder {run_dir} ({e.strerror}): pass another "
                          f"--workdir") from e
    if CONFIG_FILE in entries or HISTORY_FILE in entries or SEEDS_FILE in entries:
        raise _already_a_run(run_dir)
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FmnistError(f"--workdir {run_dir} already holds files that are not a run "
                          f"({shown}): pass a new or empty folder")
    return made_folder


def _create_exclusively(run_dir: Path, name: str, text: str) -> None:
    """Create run_dir/name holding `text`, failing if it exists (O_EXCL): the claim."""
    try:
        fd = os.open(run_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError as e:  # another training claimed it since the listing above
        raise _already_a_run(run_dir) from e
    except OSError as e:
        raise FmnistError(f"cannot write in the run folder {run_dir} ({e.strerror}): pass a "
                          f"writable --workdir") from e
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as e:
        (run_dir / name).unlink(missing_ok=True)
        raise FmnistError(f"cannot write in the run folder {run_dir} ({e.strerror}): pass a "
                          f"writable --workdir") from e


def _lock(run_dir: Path, *, wait: bool):
    """Hold an exclusive flock on the folder's config.json (no new file needed); None when
    another process holds it and `wait` is False."""
    handle = open(run_dir / CONFIG_FILE)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


def finished(run_dir: str | Path) -> bool:
    """Whether the run's training finished: its parameters and their checksum were written
    (for the folder of a run of several seeds: its summary.json, written after every seed's)."""
    run_dir = Path(run_dir)
    if _holds_seeds(run_dir):
        return (run_dir / SUMMARY_FILE).is_file()
    return (run_dir / PARAMS_CHECKSUM_FILE).is_file()


def seed_run_dirs(run_dir: str | Path) -> list[Path] | None:
    """Each seed's run folder, in seed order, when `run_dir` is the folder of a run of
    several seeds; None for any other folder."""
    run_dir = Path(run_dir)
    if not _holds_seeds(run_dir):
        return None
    return [member_dir(run_dir, member.seed) for member in stored_config(run_dir).members()]


def _holds_seeds(run_dir: Path) -> bool:
    """Whether `run_dir` is the folder of a run of several seeds (seeds.json, no config.json)."""
    return (run_dir / SEEDS_FILE).is_file() and not (run_dir / CONFIG_FILE).is_file()


def reopen(run_dir: str | Path) -> Claim:
    """Take back an interrupted run (it holds config.json, maybe a history and checkpoints)
    to continue it with its stored config. FmnistError when it is no run, when it finished
    (see `finished`: check that first to say so kindly) or when another process trains in it.
    With several processes, process 0 alone takes the folder back; the others get a claim of
    the same shape that touches nothing.

    The folder of a run of several seeds is taken back whole, while its summary.json is
    missing: every seed's folder, each of which must hold the config seeds.json gives that
    seed. One a kill left finished (before summary.json was written) is taken back too: its
    params/ are redone from its checkpoints."""
    run_dir = Path(run_dir)
    if not is_writer():
        return _claim_of_another_process(run_dir, stored_config(run_dir), resumed=True)
    if _holds_seeds(run_dir):
        return _reopen_seeds(run_dir)
    cfg = load_config(run_dir)
    if finished(run_dir):
        raise FmnistError(f"{run_dir} has finished training: nothing to resume")
    lock = _lock_to_resume(run_dir)
    # Whatever a kill during the final save left of params/ is redone from the checkpoints.
    _remove_params(run_dir.absolute())
    return Claim(path=run_dir, config=cfg, made_folder=False, resumed=True, lock=lock)


def _reopen_seeds(run_dir: Path) -> Claim:
    cfg = stored_config(run_dir)
    if finished(run_dir):
        raise FmnistError(f"{run_dir} has finished training: nothing to resume")
    members: list[Claim] = []
    try:
        for member_cfg in cfg.members():
            path = member_dir(run_dir, member_cfg.seed)
            if load_config(path) != member_cfg:
                raise FmnistError(f"{path / CONFIG_FILE} is not the config {run_dir / SEEDS_FILE} "
                                  f"gives seed {member_cfg.seed}: restore it from the run")
            members.append(Claim(path=path, config=member_cfg, made_folder=False, resumed=True,
                                 lock=_lock_to_resume(path)))
    except BaseException:
        for member in members:
            member.release()
        raise
    for member in members:  # finished or not (a kill before summary.json): redone
        _remove_params(member.path.absolute())
    return Claim(path=run_dir, config=cfg, made_folder=False, resumed=True,
                 members=tuple(members))


def _lock_to_resume(run_dir: Path):
    lock = _lock(run_dir, wait=False)
    if lock is None:
        raise FmnistError(f"{run_dir} is being trained by another process: wait for it, or "
                          f"stop it first")
    return lock


def _already_a_run(run_dir: Path) -> FmnistError:
    return FmnistError(f"{run_dir} already holds a run: pass another --workdir or delete it")


def abandon(run: Claim) -> None:
    """Give back a claim before the first epoch was written (the data failed to load, the
    setup was refused, Ctrl-C during compilation): remove what `claim` and the setup wrote,
    so the same --workdir can be used again. Never touches a folder with a history, nor
    a resumed one. Its locks are released either way, after the files are gone (a --resume
    racing with this finds the folder locked or no run in it, never half of one)."""
    try:
        _remove_unstarted(run)
    finally:
        run.release()


def _remove_unstarted(run: Claim) -> None:
    if run.members:
        for member in run.members:
            _remove_unstarted(member)
        if any((member.path / HISTORY_FILE).exists() for member in run.members):
            return
    if run.resumed or not is_writer() or (run.path / HISTORY_FILE).exists():
        return
    for name in (NORMALIZATION_FILE, DATA_FILE, CONFIG_FILE, SEEDS_FILE):
        (run.path / name).unlink(missing_ok=True)
    if run.made_folder:
        with contextlib.suppress(OSError):  # not empty: someone put files there meanwhile
            run.path.rmdir()


def _write_text(path: Path, text: str) -> None:
    """Write to a temporary file, then rename: a crash or a full disk never leaves a half
    file in place of a good one. Only process 0 writes (see the module's docstring)."""
    if not is_writer():
        return
    try:
        write_atomically(path, text)
    except OSError as e:
        raise FmnistError(f"cannot write {path} ({e.strerror}): free some space or check the "
                          f"folder's permissions, then run again") from e


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> Any:
    """A JSON file of the run; a hand-edited or truncated one is an FmnistError."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FmnistError(f"{path} is malformed ({e.msg}): restore it from the run") from e


# ---------------------------------------------------------------------------------------
# What training writes


def load_config(run_dir: str | Path) -> TrainConfig:
    """The config of one model's run folder (for the folder of several seeds, the error
    names one of its seeds' folders)."""
    path = Path(run_dir) / CONFIG_FILE
    if _holds_seeds(Path(run_dir)):
        first = member_dir(run_dir, stored_config(run_dir).seed)
        raise FmnistError(f"{run_dir} holds the runs of several seeds, one folder each: pass "
                          f"one of them, e.g. {first}")
    if not path.is_file():
        raise FmnistError(f"{run_dir} is not a run folder (no {CONFIG_FILE}): pass the folder "
                          f"that scripts/train.py wrote")
    return _config_from(path, _read_json(path), "not a JSON object")


def stored_config(run_dir: str | Path) -> TrainConfig:
    """The config a run folder was started with: config.json's, or for the folder of a run
    of several seeds the one in seeds.json (with `seeds`)."""
    path = Path(run_dir) / SEEDS_FILE
    if not _holds_seeds(Path(run_dir)):
        return load_config(run_dir)
    fields = _read_json(path)
    return _config_from(path, fields.get("config") if isinstance(fields, dict) else None,
                        "no config object")


def _config_from(path: Path, fields: Any, malformed: str) -> TrainConfig:
    if not isinstance(fields, dict):
        raise FmnistError(f"{path} is malformed ({malformed}): restore it from the run")
    try:
        return TrainConfig.from_dict(fields)
    except FmnistError as e:  # name the file: the user did not type these values
        raise FmnistError(f"{path}: {e}: restore it from the run") from e


def save_normalization(run_dir: Path, norm: Normalization) -> None:
    _write_json(run_dir / NORMALIZATION_FILE, norm._asdict())


def load_normalization(run_dir: str | Path) -> Normalization:
    path = Path(run_dir) / NORMALIZATION_FILE
    if not path.is_file():
        raise FmnistError(f"{run_dir} has no {NORMALIZATION_FILE}: the training did not "
                          f"finish; train again")
    fields = _read_json(path)
    try:
        if not isinstance(fields, dict) or not all(
                type(fields[k]) in (int, float) for k in ("mean", "std")):
            raise TypeError("mean and std must be JSON numbers")
        norm = Normalization(float(fields["mean"]), float(fields["std"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FmnistError(f"{path} is malformed (needs numbers mean and std): restore it from "
                          f"the run") from e
    if not (math.isfinite(norm.mean) and math.isfinite(norm.std) and norm.std > 0):
        raise FmnistError(f"{path} has mean {norm.mean} and std {norm.std}: std must be a "
                          f"positive number; restore it from the run")
    return norm


def save_data_fingerprints(run_dir: Path | list[Path], train: Split, test: Split) -> None:
    """data.json of the run (or of each of a list of runs: the sums are computed once)."""
    record = {"train_sha256": fingerprint(train), "test_sha256": fingerprint(test),
              "n_train": len(train), "n_test": len(test)}
    for path in [run_dir] if isinstance(run_dir, Path) else run_dir:
        _write_json(path / DATA_FILE, record)


def check_data(run_dir: str | Path, train: Split, test: Split) -> None:
    """FmnistError unless `train` and `test` are the images (in the same order) the run was
    trained on: its validation split is only held out of those. Runs without data.json pass."""
    path = Path(run_dir) / DATA_FILE
    if not path.is_file():
        return
    stored = _read_json(path)
    if not isinstance(stored, dict):
        raise FmnistError(f"{path} is malformed (not a JSON object): restore it from the run")
    for name, split in (("train", train), ("test", test)):
        if stored.get(f"{name}_sha256") != fingerprint(split):
            raise FmnistError(f"the {name} images given are not the ones {run_dir} was trained "
                              f"on ({len(split)} images here, {stored.get(f'n_{name}')} then): "
                              f"pass the same data (the same tfds folder, or the same CSV files)")


class EpochLog:
    """history.jsonl and timing.jsonl, appended to and flushed once per epoch, and the
    history's values as TensorBoard events in tensorboard/ (see `tensorboard_log`).

    Use as a context manager: `with folder.EpochLog(run_dir) as log: log.epoch(row, seconds)`.
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
    _write_text(path, b"".join(line + b"\n" for line in kept).decode())


def load_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run (empty if it has no history yet)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FmnistError(f"{path} line {number} is malformed ({e.msg}): restore it from "
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


def _checkpointer():
    # orbax takes ~0.4 s to import: imported when the parameters are saved or loaded, not
    # before a run's first epoch.
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by path relative to it."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_params(run_dir: Path, params) -> None:
    """The orbax checkpoint, then the checksum of its files (what `load_variables` verifies)."""
    with quiet_absl(), _checkpointer() as checkpointer:
        checkpointer.save(run_dir / PARAMS_DIR, params)
        checkpointer.wait_until_finished()  # on every process: all files are written
    if is_writer():
        _write_json(run_dir / PARAMS_CHECKSUM_FILE,
                    {"sha256": _file_digests(run_dir / PARAMS_DIR)})


def _remove_params(run_dir: Path) -> None:
    """Whatever a failed save left: orbax's temporary folder, a partial params/, the sum."""
    for partial in [run_dir / PARAMS_DIR, *run_dir.glob(f"{PARAMS_DIR}.orbax-checkpoint-tmp*")]:
        shutil.rmtree(partial, ignore_errors=True)
    (run_dir / PARAMS_CHECKSUM_FILE).unlink(missing_ok=True)


def save_variables(run_dir: Path, params) -> None:
    """The trained variables ({"params": ...}, and "batch_stats" for BatchNorm models) into
    the run folder, with their checksum. When that fails (a
    full disk is the usual cause) the partial files are removed and the parameters are
    saved to a fresh folder under the system's temporary folder instead, so the trained
    model survives; the FmnistError says where and what to do."""
    run_dir = Path(run_dir).absolute()
    try:
        _write_params(run_dir, params)
        return
    except Exception as e:  # orbax raises ValueError (tensorstore) or OSError
        _remove_params(run_dir)
        reason = ("no space left on device" if "No space left" in str(e) or getattr(
            e, "errno", None) == errno.ENOSPC else f"{type(e).__name__}: {first_line(e)}")
        failure = e
    fallback = Path(tempfile.mkdtemp(prefix="fmnist_jax-params-"))
    try:
        _write_params(fallback, params)
    except Exception:
        shutil.rmtree(fallback, ignore_errors=True)
        raise FmnistError(f"saving the parameters to {run_dir / PARAMS_DIR} failed ({reason}) "
                          f"and so did saving them to {fallback.parent}: free some space and "
                          f"train again") from failure
    raise FmnistError(f"saving the parameters to {run_dir / PARAMS_DIR} failed ({reason}); "
                      f"they were saved to {fallback} instead: free some space, then move "
                      f"{PARAMS_DIR}/ and {PARAMS_CHECKSUM_FILE} from there into {run_dir}"
                      ) from failure


def _verify_params_files(run_dir: Path, path: Path) -> None:
    """Compare every file under params/ with the checksum written at save time, before orbax
    reads any of them: a truncated or flipped file is one clear error, never a half-read
    checkpoint (whose pending reads also print asyncio tracebacks at exit). Runs saved
    before checksums existed have no checksum file and are read as they are."""
    sum_path = run_dir / PARAMS_CHECKSUM_FILE
    if not sum_path.is_file():
        return
    stored = _read_json(sum_path)
    if not (isinstance(stored, dict) and isinstance(stored.get("sha256"), dict)):
        raise FmnistError(f"{sum_path} is malformed: restore it from the run")
    found = _file_digests(path)
    changed = sorted(name for name in stored["sha256"].keys() | found.keys()
                     if stored["sha256"].get(name) != found.get(name))
    if changed:
        raise FmnistError(f"{path} does not match its checksum ({PARAMS_CHECKSUM_FILE}): "
                          f"{changed[0]} is damaged, missing or extra; the checkpoint cannot "
                          f"be trusted: restore the run folder from a copy or train again")


def load_variables(run_dir: str | Path, cfg: TrainConfig) -> dict:
    """The run's variables, verified against their checksum, checked against the structure
    and shapes of `cfg.model`'s, and finite."""
    path = Path(run_dir).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise FmnistError(f"{run_dir} has no model ({PARAMS_DIR}/ is missing): the training did "
                          f"not finish; train again")
    _verify_params_files(Path(run_dir).absolute(), path)
    abstract = {name: tree for name, tree in jax.eval_shape(
        functools.partial(init_variables, get_model(cfg.model)), jax.random.key(0)).items()
        if tree}
    with quiet_absl(), _checkpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(path).item_metadata.tree  # shapes, no data
            if _shapes(stored) != _shapes(abstract):
                raise FmnistError(f"{path} holds parameters of another model than {cfg.model!r} "
                                  f"(config.json): use the run folder the checkpoint came from")
            variables = checkpointer.restore(path, abstract)
        except FmnistError:
            raise
        except Exception as e:  # orbax raises many types for a damaged folder
            raise FmnistError(f"{path} could not be read ({type(e).__name__}): the checkpoint "
                              f"is damaged; train again") from e
    if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(variables)):
        raise FmnistError(f"{path} holds NaN or infinite weights: the training diverged or the "
                          f"checkpoint is damaged; train again")
    return variables


def _shapes(tree):
    return jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), tree)


# ---------------------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
    """checkpoints/: the whole training state of some epochs, through orbax's
    CheckpointManager (one folder per epoch, written to a temporary folder and renamed, so a
    kill mid-save leaves the earlier checkpoints intact and no half one that counts).

    It keeps the latest epoch and, when `val_accuracy` is given to `save`, the epoch with the
    best one: orbax's best-only keeping would delete the latest, so the preservation policy
    keeps whatever either rule keeps. The state is stored as
    `flax.serialization.to_state_dict(state)` (step, params, opt_state with the plateau
    schedule, batch_stats, the weights' moving average), with the epoch; `restore` puts it
    back into a state of the same structure, each array with the sharding of the state it is
    given (a checkpoint written elsewhere, on a GPU say, restores here on whatever devices
    this machine has).
    """

    def __init__(self, run_dir: Path, *, keep_best: bool, async_save: bool = False):
        from orbax.checkpoint.checkpoint_managers import preservation_policy as keep

        policies = [keep.LatestN(n=1)]
        if keep_best:
            policies.append(keep.BestN(get_metric_fn=lambda m: m["val_accuracy"], n=1,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self.path = Path(run_dir).absolute() / CHECKPOINTS_DIR
        with quiet_absl():
            self._manager = ocp.CheckpointManager(self.path, options=options)

    def epochs(self) -> list[int]:
        """The epochs with a finished checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def save(self, epoch: int, state, new_best_val_accuracy: float | None = None) -> None:
        """Save `state` as `epoch`'s checkpoint. Pass `new_best_val_accuracy` only when this
        epoch raised the best validation accuracy: only such checkpoints carry the metric,
        so the best kept is the earliest epoch of the best accuracy (orbax would break a tie
        its own way) and the one the training reports."""
        from flax import serialization

        tree = {"epoch": np.int32(epoch), "state": serialization.to_state_dict(state)}
        metrics = (None if new_best_val_accuracy is None
                   else {"val_accuracy": new_best_val_accuracy})
        try:
            with quiet_absl():
                self._manager.save(epoch, args=ocp.args.StandardSave(tree), metrics=metrics,
                                   force=True)
        except Exception as e:  # orbax raises ValueError (tensorstore) or OSError
            raise FmnistError(f"saving the checkpoint of epoch {epoch} to {self.path} failed "
                              f"({type(e).__name__}: {first_line(e)}): free some space, then "
                              f"continue with --resume") from e

    def restore(self, epoch: int, like):
        """The state saved at `epoch`, in the structure, dtypes and shardings of the state
        `like` (its host values, numpy arrays and Python numbers, go to this process's first
        local device)."""
        from flax import serialization

        first_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def target_of(x):
            # Explicit target shardings: orbax would otherwise place each array as the
            # checkpoint's metadata says, on devices this machine may not have (a GPU's).
            sharding = x.sharding if isinstance(x, jax.Array) else first_device
            return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding)

        target = jax.tree_util.tree_map(
            target_of, {"epoch": np.int32(0), "state": serialization.to_state_dict(like)})
        try:
            with quiet_absl():
                self.wait()
                tree = self._manager.restore(epoch, args=ocp.args.StandardRestore(target))
        except Exception as e:
            raise FmnistError(f"the checkpoint of epoch {epoch} in {self.path} could not be "
                              f"read ({type(e).__name__}): delete that epoch's folder to resume "
                              f"from an earlier one") from e
        if int(tree["epoch"]) != epoch:
            raise FmnistError(f"{self.path}/{epoch} holds epoch {int(tree['epoch'])}: it was "
                              f"moved by hand; put it back")
        return serialization.from_state_dict(like, tree["state"])

    def wait(self) -> None:
        """Block until an asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        with quiet_absl():
            self._manager.close()


def save_best(run_dir: Path, record: dict[str, Any]) -> None:
    """Which epoch's variables params/ holds and why (see `load_best`)."""
    _write_json(run_dir / BEST_FILE, record)


def load_best(run_dir: str | Path) -> dict[str, Any] | None:
    """{"epoch", "chosen_by", "val_accuracy", "epochs_trained", "stopped_early"}, or None for
    a run trained before best.json existed (its params/ are the last epoch's)."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    record = _read_json(path)
    if not (isinstance(record, dict) and type(record.get("epoch")) is int
            and type(record.get("epochs_trained")) is int):
        raise FmnistError(f"{path} is malformed (needs integers epoch and epochs_trained): "
                          f"restore it from the run")
    return record


def save_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """The results of a run of several seeds (see `train`): written last, once every seed's
    run folder is complete."""
    _write_json(Path(run_dir) / SUMMARY_FILE, summary)


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FmnistError(f"{run_dir} has no {SUMMARY_FILE}: it is no finished run of several "
                          f"seeds")
    return _read_json(path)


# ---------------------------------------------------------------------------------------
# What evaluation writes


def save_calibration(run_dir: Path, temperature: float, n_validation: int) -> None:
    _write_json(run_dir / CALIBRATION_FILE, {"temperature": temperature, "fit_on": "validation",
                                             "n_validation": n_validation})


def load_temperature(run_dir: str | Path) -> float | None:
    """The calibrated temperature, or None when the run was not calibrated."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    fields = _read_json(path)
    try:
        temperature = float(fields["temperature"])
    except (KeyError, TypeError, ValueError) as e:
        raise FmnistError(f"{path} is malformed (needs a number temperature): calibrate again "
                          f"or delete it") from e
    if not (math.isfinite(temperature) and temperature > 0):
        raise FmnistError(f"{path} has temperature {temperature}, not a positive number: "
                          f"calibrate again or delete it")
    return temperature


def save_report(run_dir: Path, text: str, report: dict[str, Any]) -> None:
    _write_text(run_dir / REPORT_TEXT_FILE, text)
    _write_json(run_dir / REPORT_JSON_FILE, report)


def plot_path(run_dir: Path, plot: str) -> Path:
    """Where the evaluation's `plot` (a key of PLOT_FILES) goes."""
    return run_dir / PLOT_FILES[plot]
