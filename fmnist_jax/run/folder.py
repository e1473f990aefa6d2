"""The run folder: its file names, claiming it (claim, reopen, abandon), its normalization
and data fingerprints (its config is read back by `folder_config`). Each file of a run folder
is named here and written and read by the modules of `run` (history, checkpoints, results),
and nowhere else.

A run folder holds:

| file                                  | written by              | what                                  |
| ------------------------------------- | ----------------------- | ------------------------------------- |
| config.json                           | training, at the start  | the full TrainConfig                  |
| claim.json                            | training, at the start  | config.json as the run began (a resume|
|                                       |                         | refuses an edited one); train options |
| normalization.json                    | training, at the start  | the pixel mean/std the model saw      |
| data.json                             | training, at the start  | fingerprints of its train/test data   |
| history.jsonl                         | training, every epoch   | losses and accuracies (reproducible)  |
| timing.jsonl                          | training, every epoch   | compile, start-up, train, eval seconds|
| checkpoints/EPOCH/                    | training                | the whole training state (orbax) of   |
|                                       |                         | the latest and the best epoch         |
| tensorboard/{train,val,test}/         | training, every epoch   | the history as TensorBoard events     |
| best.json                             | training, at the end    | which epoch's checkpoint is the model,|
|                                       |                         | sha256 of each of its files           |
| calibration.json                      | evaluation              | the temperature fit on validation     |
| report.txt, report.json, *.png        | evaluation              | the report and its plots              |

A run of several seeds (`--seeds K`, K > 1) is a folder of ordinary run folders, one per seed
(`seed-S/`, each exactly as above, its config.json with that seed and `seeds` 1), and:

| file                                  | written by              | what                                  |
| ------------------------------------- | ----------------------- | ------------------------------------- |
| seeds.json                            | training, at the start  | the config (with `seeds`), the folders|
| summary.json                          | training, at the end    | each seed's test accuracy, mean, std, |
|                                       |                         | 95% confidence interval               |
| seeds_report.json                     | evaluation              | each seed's report figures (accuracy, |
|                                       |                         | ECE, flip TTA...), their means and    |
|                                       |                         | 95% intervals                         |

A sweep (`--sweep`) is the same with one folder per grid point and seed, `POINT/seed-S/`
(POINT as `config.point_name`: lr=0.003,wd=0.0005), each an ordinary run folder of that
point's config, and sweep.json (each point's validation accuracy over its seeds, the point
chosen by it, its test accuracy) and sweep.png in place of summary.json.

An existing run is never overwritten: a run claims its folder by creating config.json with
O_EXCL (`claim`), so of two trainings started on one folder exactly one gets it, and a folder
holding anything else is refused. `reopen` takes an interrupted run back for --resume.
Folders written before claim.json existed have none; they resume unchecked.

With several processes (`parallel`), process 0 alone claims the folder and writes its files;
the others only take part in orbax's collective saves of checkpoints/ (orbax writes each
array once, from the replicas it picks, and syncs the processes).

A run is finished once best.json holds the checksums of its model's checkpoint: it is written
last (`checkpoints.save_best`). Folders written by earlier versions kept the model in params/
as well, with params.sha256 written last; they count as finished too, and their model is read
from the checkpoint their best.json names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fmnist_jax.data import Normalization, Split, fingerprint
from fmnist_jax.errors import FmnistError
from fmnist_jax.files import lock_file, write_atomically
from fmnist_jax.run.config import TrainConfig
# The config files, read back: `folder_config` (this module hands its names on).
from fmnist_jax.run.folder_config import (CLAIM_FILE, CONFIG_FILE, OPTIONS_KEY,  # noqa: F401
                                          SEEDS_FILE, check_config_unchanged, holds_seeds, load_config,
                                          member_dir, member_dirs, read_json, seed_run_dirs, seeds_run_of,
                                          stored_config)
from fmnist_jax.run.parallel import is_writer

NORMALIZATION_FILE = "normalization.json"
DATA_FILE = "data.json"
HISTORY_FILE = "history.jsonl"
TIMING_FILE = "timing.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
BEST_FILE = "best.json"
CALIBRATION_FILE = "calibration.json"
REPORT_TEXT_FILE = "report.txt"
REPORT_JSON_FILE = "report.json"
SUMMARY_FILE = "summary.json"
SEEDS_REPORT_FILE = "seeds_report.json"
SWEEP_FILE = "sweep.json"
SWEEP_PLOT_FILE = "sweep.png"
PLOT_FILES = {"confusion_matrix": "confusion_matrix.png", "reliability": "reliability.png",
              "curves": "curves.png"}
CHECKPOINT_SUMS = "checkpoint_sha256"  # best.json's field: the model checkpoint's checksums
# What earlier versions wrote at the end beside the checkpoints: read no more, never written.
OLD_PARAMS_DIR = "params"
OLD_PARAMS_CHECKSUM_FILE = "params.sha256"


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


def default_workdir(preset: str, seed: int, seeds: int = 1, sweep: bool = False) -> Path:
    """runs/PRESET-seedN-TIMESTAMP-PID (runs/PRESET-seedsN-M-... for seeds N..M; -sweep-
    after PRESET for a sweep): the pid keeps apart two runs started in the same second (the
    exclusive claim refuses any collision that is left)."""
    name = f"seed{seed}" if seeds == 1 else f"seeds{seed}-{seed + seeds - 1}"
    name = f"sweep-{name}" if sweep else name
    return Path("runs") / f"{preset}-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def claim(workdir: str | Path, cfg: TrainConfig, options: dict[str, Any] | None = None) -> Claim:
    """Claim `workdir` for a new run of `cfg`: make it (parents too) unless it exists, refuse a
    folder holding anything, then create its config.json with O_EXCL, the atomic step that
    lets exactly one of two trainings started together have the folder. Cheap: call it
    before loading any data, so that a bad --workdir fails within a second. Processes other
    than process 0 of a run with several get a claim that touches nothing. `options`, the
    command's own (`recorded_options`), go into claim.json and seeds.json.

    With `cfg.seeds` > 1 or a sweep the file created exclusively is seeds.json, and then
    each member's run folder inside (`member_dirs`) is claimed for its own config
    (`TrainConfig.members`)."""
    run_dir = Path(workdir)
    if not is_writer():
        return _claim_of_another_process(run_dir, cfg)
    made_folder = _empty_folder(run_dir)
    if cfg.many:
        members = cfg.members()
        _create_exclusively(run_dir, SEEDS_FILE, json.dumps(
            {"config": json.loads(cfg.to_json()), "runs": cfg.member_names(),
             **({} if options is None else {OPTIONS_KEY: options})}, indent=2) + "\n")
        claimed: list[Claim] = []
        try:
            for member, path in zip(members, member_dirs(run_dir, cfg)):
                claimed.append(claim(path, member, options))
        except BaseException:
            abandon(Claim(path=run_dir, config=cfg, made_folder=made_folder,
                          members=tuple(claimed)))
            raise
        return Claim(path=run_dir, config=cfg, made_folder=made_folder, members=tuple(claimed))
    _create_exclusively(run_dir, CONFIG_FILE, cfg.to_json() + "\n")
    run = Claim(path=run_dir, config=cfg, made_folder=made_folder, lock=_lock(run_dir, wait=True))
    try:
        write_json(run_dir / CLAIM_FILE, {"config": json.loads(cfg.to_json()), **(
            {} if options is None else {OPTIONS_KEY: options})})
    except BaseException:
        abandon(run)
        raise
    return run


def _claim_of_another_process(run_dir: Path, cfg: TrainConfig, *, resumed: bool = False) -> Claim:
    """What a process other than process 0 gets from `claim` and `reopen`: a claim of the
    shape process 0's has (so it runs the same loop) that touches nothing."""
    return Claim(path=run_dir, config=cfg, made_folder=False, resumed=resumed, members=tuple(
        Claim(path=path, config=member, made_folder=False, resumed=resumed)
        for member, path in (zip(cfg.members(), member_dirs(run_dir, cfg)) if cfg.many
                             else ())))


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
        raise _already_a_run(run_dir, probe=True)
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
        raise _already_a_run(run_dir, probe=False) from e
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
    if not lock_file(handle, wait=wait):
        handle.close()
        return None
    return handle


def finished(run_dir: str | Path) -> bool:
    """Whether the run's training finished: best.json with its model's checksums was written
    (by an earlier version: params.sha256); for the folder of a run of several seeds, its
    summary.json, written after every seed's."""
    run_dir = Path(run_dir)
    if holds_seeds(run_dir):
        return (run_dir / SUMMARY_FILE).is_file() or (run_dir / SWEEP_FILE).is_file()
    if (run_dir / OLD_PARAMS_CHECKSUM_FILE).is_file():
        return True
    try:
        return CHECKPOINT_SUMS in json.loads((run_dir / BEST_FILE).read_text())
    except (OSError, ValueError, TypeError):  # none, or cut by a kill: not finished
        return False


def reopen(run_dir: str | Path) -> Claim:
    """Take back an interrupted run (it holds config.json, maybe a history and checkpoints)
    to continue it with its stored config. FmnistError when it is no run, when it finished
    (see `finished`: check that first to say so kindly), when its config was edited since it
    began (`check_config_unchanged`), when its data.json is gone (`check_data_file`) or when
    another process trains in it.
    With several processes, process 0 alone takes the folder back; the others get a claim of
    the same shape that touches nothing.

    The folder of a run of several seeds is taken back whole, while its summary.json is
    missing: every seed's folder, each of which must hold the config seeds.json gives that
    seed. One a kill left finished (before summary.json was written) is taken back too: it
    trains no more, and its best.json is written again, the same."""
    run_dir = Path(run_dir)
    if not is_writer():
        return _claim_of_another_process(run_dir, stored_config(run_dir), resumed=True)
    if holds_seeds(run_dir):
        return _reopen_seeds(run_dir)
    cfg = load_config(run_dir)
    if finished(run_dir):
        raise FmnistError(f"{run_dir} has finished training: nothing to resume")
    check_config_unchanged(run_dir)
    check_data_file(run_dir)
    lock = _lock_to_resume(run_dir)
    _remove_old_params(run_dir)
    return Claim(path=run_dir, config=cfg, made_folder=False, resumed=True, lock=lock)


def _reopen_seeds(run_dir: Path) -> Claim:
    cfg = stored_config(run_dir)
    if finished(run_dir):
        raise FmnistError(f"{run_dir} has finished training: nothing to resume")
    check_config_unchanged(run_dir)
    members: list[Claim] = []
    try:
        for member_cfg, path in zip(cfg.members(), member_dirs(run_dir, cfg)):
            if load_config(path) != member_cfg:
                raise FmnistError(f"{path / CONFIG_FILE} is not the config {run_dir / SEEDS_FILE} "
                                  f"gives {path.relative_to(run_dir)}: restore it from the run")
            check_data_file(path)
            members.append(Claim(path=path, config=member_cfg, made_folder=False, resumed=True,
                                 lock=_lock_to_resume(path)))
    except BaseException:
        for member in members:
            member.release()
        raise
    for member in members:
        _remove_old_params(member.path)
    return Claim(path=run_dir, config=cfg, made_folder=False, resumed=True,
                 members=tuple(members))


def _remove_old_params(run_dir: Path) -> None:
    """What an earlier version left of params/ in a run taken back: its model will be the
    checkpoint best.json names."""
    for partial in [run_dir / OLD_PARAMS_DIR,
                    *run_dir.glob(f"{OLD_PARAMS_DIR}.orbax-checkpoint-tmp*")]:
        shutil.rmtree(partial, ignore_errors=True)
    (run_dir / OLD_PARAMS_CHECKSUM_FILE).unlink(missing_ok=True)


def _lock_to_resume(run_dir: Path):
    lock = _lock(run_dir, wait=False)
    if lock is None:
        raise FmnistError(f"{run_dir} is being trained by another process: wait for it, or "
                          f"stop it first")
    return lock


def _already_a_run(run_dir: Path, *, probe: bool) -> FmnistError:
    """The refusal of a --workdir holding a run; an unfinished one can be continued, and
    (`probe`) one that no process trains now is told so."""
    try:
        if not finished(run_dir):
            if not probe or _being_trained(run_dir):
                return FmnistError(f"{run_dir} already holds a run, being trained by another "
                                   f"process: pass another --workdir")
            return FmnistError(f"{run_dir} already holds a run, unfinished "
                               f"({_progress(run_dir)}): continue it with `python "
                               f"scripts/train.py --resume {run_dir}`, or pass another --workdir")
    except FmnistError:  # a damaged seeds.json: the plain answer
        pass
    return FmnistError(f"{run_dir} already holds a run: pass another --workdir or delete it")


def check_finished(run_dir: str | Path) -> None:
    """FmnistError unless the run in `run_dir` finished training; an unfinished one names
    the command that continues it (for a seed's folder, the resume of the whole run)."""
    run_dir = Path(run_dir)
    if finished(run_dir):
        return
    if _being_trained(run_dir):
        raise FmnistError(f"{run_dir} is still being trained by another process: wait for it "
                          f"to finish")
    whole = seeds_run_of(run_dir) or run_dir
    raise FmnistError(f"{run_dir} holds an unfinished run ({_progress(run_dir)}): continue it "
                      f"with `python scripts/train.py --resume {whole}`")


def _progress(run_dir: Path) -> str:
    """How far an unfinished run got: its latest checkpoint (of a run of several seeds, the
    earliest of its seeds' latest)."""
    def latest(path: Path) -> int:
        epochs = [int(p.name) for p in (path / CHECKPOINTS_DIR).glob("*") if p.name.isdigit()]
        return max(epochs, default=0)

    epoch = min(latest(path) for path in seed_run_dirs(run_dir) or [run_dir])
    return f"checkpoints up to epoch {epoch}" if epoch else "no checkpoint yet"


def _being_trained(run_dir: Path) -> bool:
    """Whether a process holds the lock of the run (of any of its seeds' runs) now."""
    for path in seed_run_dirs(run_dir) or [run_dir]:
        try:
            lock = _lock(path, wait=False)
        except OSError:  # no config.json: nobody trains there
            continue
        if lock is None:
            return True
        lock.close()
    return False


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
        if run.made_folder or not run.resumed:  # a sweep's point folders, if left empty
            for point_dir in {m.path.parent for m in run.members} - {run.path}:
                with contextlib.suppress(OSError):
                    point_dir.rmdir()
    if run.resumed or not is_writer() or (run.path / HISTORY_FILE).exists():
        return
    for name in (NORMALIZATION_FILE, DATA_FILE, CLAIM_FILE, CONFIG_FILE, SEEDS_FILE):
        (run.path / name).unlink(missing_ok=True)
    if run.made_folder:
        with contextlib.suppress(OSError):  # not empty: someone put files there meanwhile
            run.path.rmdir()


def write_file(path: Path, data: str | bytes) -> None:
    """Write to a temporary file, then rename: a crash or a full disk never leaves a half
    file in place of a good one. Only process 0 writes (see the module's docstring)."""
    if not is_writer():
        return
    try:
        write_atomically(path, data)
    except OSError as e:
        raise FmnistError(f"cannot write {path} ({e.strerror}): free some space or check the "
                          f"folder's permissions, then run again") from e


def write_json(path: Path, obj: Any) -> None:
    write_file(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------
# What training writes at the start


def save_normalization(run_dir: Path, norm: Normalization) -> None:
    write_json(run_dir / NORMALIZATION_FILE, norm._asdict())


def load_normalization(run_dir: str | Path) -> Normalization:
    path = Path(run_dir) / NORMALIZATION_FILE
    if not path.is_file():  # a finished run wrote it before its first epoch
        raise FmnistError(f"{path} is missing: restore it from a copy of the run")
    fields = read_json(path)
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
        write_json(path / DATA_FILE, record)


def check_data(run_dir: str | Path, train: Split, test: Split) -> None:
    """FmnistError unless `train` and `test` are the images (in the same order) the run was
    trained on: its validation split is only held out of those. Runs written before data.json
    existed pass without it; a missing one that must be there is refused (`check_data_file`)."""
    path = Path(run_dir) / DATA_FILE
    check_data_file(run_dir)
    if not path.is_file():
        return
    stored = read_json(path)
    if not isinstance(stored, dict):
        raise FmnistError(f"{path} is malformed (not a JSON object): restore it from the run")
    for name, split in (("train", train), ("test", test)):
        if stored.get(f"{name}_sha256") != fingerprint(split):
            raise FmnistError(f"the {name} images given are not the ones {run_dir} was trained "
                              f"on ({len(split)} images here, {stored.get(f'n_{name}')} then): "
                              f"pass the same data (the same tfds folder, or the same CSV files)")


def recorded_test_sha256(run_dir: str | Path) -> str | None:
    """The fingerprint of the test images the run was evaluated on (data.json's), None when
    the run has no data.json (written before it existed)."""
    path = Path(run_dir) / DATA_FILE
    stored = read_json(path) if path.is_file() else None
    return stored.get("test_sha256") if isinstance(stored, dict) else None


def check_data_file(run_dir: str | Path) -> None:
    """FmnistError when the run's data.json is missing though the version that wrote the run
    wrote one (claim.json, and best.json's checksums, came after it) before
    normalization.json: the images it was trained on (CSV files, say) cannot be checked.
    Cheap: call it before any data loads."""
    run_dir = Path(run_dir)
    if (run_dir / DATA_FILE).is_file() or not (run_dir / NORMALIZATION_FILE).is_file():
        return
    try:
        recent = CHECKPOINT_SUMS in json.loads((run_dir / BEST_FILE).read_text())
    except (OSError, ValueError, TypeError):
        recent = False
    if recent or (run_dir / CLAIM_FILE).is_file():
        raise FmnistError(f"{run_dir / DATA_FILE} is missing: without it the images given "
                          f"cannot be checked against those {run_dir} was trained on (CSV "
                          f"files, say): restore it from a copy of the run")
