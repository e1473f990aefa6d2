"""checkpoints/ and best.json: the training state of some epochs (orbax), and which epoch's
checkpoint is the run's model, with the checksums that guard it.

The model a finished run hands to evaluation, prediction and the bench is read from the
checkpoint best.json names (the best validation epoch; the last without a validation
split): the moving average's params when the run kept one, else the params, and BatchNorm's
statistics. best.json records the sha256 of every file of that checkpoint and is written
last, so a run is finished once it holds them (`folder.finished`), and only once that
checkpoint's weights are read back finite.

Each checkpoint's folder also holds its own manifest, sha256.json (the sha256 of its other
files, written once orbax has finished the save): a resume compares every checkpoint with
it before it trusts one, so a damaged file is one line, never a run trained on from garbage.
Checkpoints of versions before the manifests have none and are read as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp  # checkpoints every epoch need it from the start anyway

from fmnist_jax.errors import FmnistError
from fmnist_jax.files import first_line, quiet_absl, write_atomically
from fmnist_jax.models import get_model
from fmnist_jax.run import interrupts
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.run.folder import (BEST_FILE, CHECKPOINT_SUMS, CHECKPOINTS_DIR, OLD_PARAMS_DIR,
                                   read_json, write_json)
from fmnist_jax.run.parallel import is_writer
from fmnist_jax.steps import init_variables

MANIFEST = "sha256.json"  # in each checkpoint's folder: the sha256 of its other files


class _KeepEpochs:
    """An orbax preservation policy: keep the checkpoints of `epochs`, delete the others."""

    def __init__(self):
        self.epochs: set[int] = set()

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [checkpoint.step in self.epochs for checkpoint in checkpoints]


class Checkpoints:
    """checkpoints/: the whole training state of some epochs, through orbax's
    CheckpointManager (one folder per epoch, written to a temporary folder and renamed, so a
    kill mid-save leaves the earlier checkpoints intact and no half one that counts).

    Each save keeps the epoch saved and the best epoch so far, which the caller names: the
    history knows it, also after a resume (orbax's own best-keeping would forget its metrics
    when the run is taken back, and delete the best epoch's checkpoint at the next save).
    Nothing else deletes a checkpoint, so a finished run's model stays. The state is stored
    as `flax.serialization.to_state_dict(state)` (step, params, opt_state with the plateau
    schedule, batch_stats, the weights' moving average), with the epoch; `restore` puts it
    back into a state of the same structure, each array with the sharding of the state it is
    given (a checkpoint written elsewhere, on a GPU say, restores here on whatever devices
    this machine has).
    """

    def __init__(self, run_dir: Path, *, async_save: bool = False):
        _quiet_writes_of_failed_saves()
        self._keep = _KeepEpochs()
        self._async, self._unsealed = async_save, []
        options = ocp.CheckpointManagerOptions(
            preservation_policy=self._keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        self.path = Path(run_dir).absolute() / CHECKPOINTS_DIR
        with quiet_absl():
            self._manager = ocp.CheckpointManager(self.path, options=options)

    def epochs(self) -> list[int]:
        """The epochs with a finished checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def save(self, epoch: int, state, *, best_epoch: int = 0) -> None:
        """Save `state` as `epoch`'s checkpoint, then delete every other checkpoint but
        `best_epoch`'s (0: none yet, or no validation split)."""
        from flax import serialization

        self._keep.epochs = {epoch, best_epoch}
        tree = {"epoch": np.int32(epoch), "state": _stored(serialization.to_state_dict(state))}
        self._unsealed.append(epoch)
        try:
            with interrupts.deferred(), quiet_absl():  # Ctrl-C waits for the manifest
                self._manager.save(epoch, args=ocp.args.StandardSave(tree), force=True)
                if not self._async:
                    self._seal()
        except Exception as e:  # orbax raises ValueError (tensorstore) or OSError
            raise FmnistError(f"saving the checkpoint of epoch {epoch} to {self.path} failed "
                              f"({_reason(e)}): free some space, then continue with "
                              f"--resume") from e

    def _seal(self) -> None:
        """Write the manifest of each checkpoint saved since the last call, once orbax has
        finished it (a checkpoint already deleted by a later save needs none)."""
        with quiet_absl():
            self._manager.wait_until_finished()
        while self._unsealed:
            path = self.path / str(self._unsealed[0])
            if is_writer() and path.is_dir():
                sums = _file_digests(path, skip=MANIFEST)
                write_atomically(path / MANIFEST, json.dumps(sums, indent=1, sort_keys=True) + "\n")
            self._unsealed.pop(0)

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

        like_dict = serialization.to_state_dict(like)
        target = jax.tree_util.tree_map(
            target_of, {"epoch": np.int32(0), "state": _stored(like_dict)})
        self.wait()
        _check_manifest(self.path, epoch)
        try:
            with quiet_absl():
                tree = self._manager.restore(epoch, args=ocp.args.StandardRestore(target))
        except Exception as e:
            raise FmnistError(f"the checkpoint of epoch {epoch} in {self.path} could not be "
                              f"read ({type(e).__name__}): delete that epoch's folder to resume "
                              f"from an earlier one") from e
        if int(tree["epoch"]) != epoch:
            raise FmnistError(f"{self.path}/{epoch} holds epoch {int(tree['epoch'])}: it was "
                              f"moved by hand; put it back")
        return serialization.from_state_dict(like, {**like_dict, **tree["state"]})

    def wait(self) -> None:
        """Block until an asynchronous save is on disk, with its manifest."""
        self._seal()

    def close(self) -> None:
        with quiet_absl():
            self._manager.close()


# The state's fields stored only when set: checkpoints of runs without them keep the layout
# they had before the fields existed, so those runs resume across versions.
_STORED_WHEN_SET = ("hparams",)


def _stored(state_dict: dict) -> dict:
    """The state's dict as a checkpoint holds it: without the unset _STORED_WHEN_SET fields."""
    return {name: value for name, value in state_dict.items()
            if not (name in _STORED_WHEN_SET and value is None)}


def _reason(e: BaseException) -> str:
    """Why a save failed, in a few words: the operating system's reason when there is one
    (TensorStore gives it only as os_error_code in a long message), else the message's
    first line."""
    cause = e
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return cause.strerror or os.strerror(cause.errno)
        code = re.search(r"os_error_code='?(\d+)", str(cause))
        if code:
            return os.strerror(int(code.group(1)))
        cause = cause.__cause__ or cause.__context__
    return f"{type(e).__name__}: {first_line(e)}"


_quieted = False


def _quiet_writes_of_failed_saves() -> None:
    """Drop the reports of the writes that outlive a failed save, which the save's own
    error already covers. When one of a save's TensorStore writes fails (a full disk),
    orbax closes its event loop with the others still in flight (asyncio.gather does not
    wait for them); as each ends, TensorStore's callback meets the closed loop and Python
    prints RuntimeError "Event loop is closed" through sys.unraisablehook (the hazard
    cpython's docs note for call_soon_threadsafe, https://github.com/python/cpython/pull/27688),
    and the tasks that failed too log "Task exception was never retrieved" to the asyncio
    logger when collected, up to a few hundred lines after the one-line error."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    hook = sys.unraisablehook

    def unraisablehook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and any(
                frame.f_code.co_name == "call_soon_threadsafe"
                for frame, _ in traceback.walk_tb(unraisable.exc_traceback))):
            hook(unraisable)

    sys.unraisablehook = unraisablehook
    logging.getLogger("asyncio").addFilter(
        lambda record: not (record.getMessage().startswith("Task exception was never retrieved")
                            and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in record.getMessage()))


def _file_digests(folder: Path, *, skip: str | None = None) -> dict[str, str]:
    """sha256 of every file under `folder` (but `skip`), by path relative to it."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != skip}


def _differing(path: Path, sums: dict[str, str], *, skip: str | None = None) -> list[str]:
    """The files of the folder `path` (but `skip`) whose sha256 differs from `sums`, and
    those missing from either, sorted."""
    found = _file_digests(path, skip=skip)
    return sorted(name for name in sums.keys() | found.keys()
                  if sums.get(name) != found.get(name))


def _check_manifest(checkpoints_dir: Path, epoch: int) -> None:
    """Compare every file of the checkpoint of `epoch` with its manifest, before orbax reads
    any (a checkpoint without one, from an earlier version, is read as it is). Damaged: one
    line naming the file, and the folders to delete (that epoch's and any later one's: a
    resume goes on from the latest checkpoint, which must come before the damaged one)."""
    path = checkpoints_dir / str(epoch)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return
    try:
        sums = json.loads(manifest.read_text())
        if not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
            raise ValueError
    except ValueError:
        problem = f"{MANIFEST} is malformed"
    else:
        differ = _differing(path, sums, skip=MANIFEST)
        if not differ:
            return
        name = differ[0]
        problem = (f"{name} is missing" if not (path / name).is_file() else
                   f"{name} was added" if name not in sums else
                   f"{name} does not match its checksum")
    later = sorted(int(p.name) for p in checkpoints_dir.iterdir()
                   if p.name.isdigit() and int(p.name) > epoch)
    folders = " and ".join(str(checkpoints_dir / str(e)) for e in (epoch, *later))
    raise FmnistError(f"the checkpoint of epoch {epoch} in {checkpoints_dir} is damaged "
                      f"({problem}): delete {folders} and resume from an earlier epoch")


def check_checkpoints(run_dir: str | Path) -> None:
    """Compare every checkpoint of the run folder `run_dir` with its manifest (see
    `_check_manifest`): a resume calls it before the data goes to the device, and before it
    restores the latest checkpoint or keeps the best one."""
    checkpoints_dir = Path(run_dir).absolute() / CHECKPOINTS_DIR
    if checkpoints_dir.is_dir():
        for epoch in sorted(int(p.name) for p in checkpoints_dir.iterdir()
                            if p.name.isdigit() and p.is_dir()):
            _check_manifest(checkpoints_dir, epoch)


def _model_checkpoint(run_dir: Path, epoch: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / str(epoch)


def save_best(run_dir: Path, record: dict[str, Any], cfg: TrainConfig) -> None:
    """best.json: `record` ({"epoch", "chosen_by", "val_accuracy", "epochs_trained",
    "stopped_early"}) and the sha256 of every file of that epoch's checkpoint. The last
    file a training writes: call it once every save is on disk. Written only once that
    checkpoint matches its manifest and its weights (`cfg.model`'s) read back finite: no
    damaged or diverged model is ever handed on."""
    run_dir = Path(run_dir).absolute()
    path = _model_checkpoint(run_dir, record["epoch"])
    if not path.is_dir():
        raise FmnistError(f"{path} is missing: the checkpoint of the run's model was deleted "
                          f"during the training; train again")
    _check_manifest(path.parent, record["epoch"])
    # Every process reads it back: orbax's restore waits at a barrier of all the processes.
    _read_model(path, cfg)
    if is_writer():
        write_json(run_dir / BEST_FILE, {**record, CHECKPOINT_SUMS: _file_digests(path)})


def load_best(run_dir: str | Path) -> dict[str, Any] | None:
    """best.json: {"epoch", "chosen_by", "val_accuracy", "epochs_trained", "stopped_early",
    and the checkpoint's checksums}, or None for a run without one (not finished)."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if not (isinstance(record, dict) and type(record.get("epoch")) is int
            and type(record.get("epochs_trained")) is int):
        raise FmnistError(f"{path} is malformed (needs integers epoch and epochs_trained): "
                          f"restore it from the run")
    if not isinstance(record.get(CHECKPOINT_SUMS, {}), dict):
        raise FmnistError(f"{path} is malformed ({CHECKPOINT_SUMS} is no object): restore it "
                          f"from the run")
    return record


def _verify(path: Path, sums: dict[str, str]) -> None:
    """Compare every file of the checkpoint `path` with its checksum, before orbax reads any
    of them: a truncated or flipped file is one clear error, never a half-read checkpoint
    (whose pending reads also print asyncio tracebacks at exit)."""
    changed = _differing(path, sums)
    if changed:
        raise FmnistError(f"{path} does not match its checksum ({BEST_FILE}): {changed[0]} is "
                          f"damaged, missing or extra; the checkpoint cannot be trusted: "
                          f"restore the run folder from a copy or train again")


def load_variables(run_dir: str | Path, cfg: TrainConfig) -> dict:
    """The run's model: {"params": ...} and "batch_stats" for BatchNorm models, read from the
    checkpoint best.json names (verified against its checksums; folders written before
    the checksums existed are read as they are), checked against the structure and shapes of
    `cfg.model`'s, and finite."""
    run_dir = Path(run_dir).absolute()
    best = load_best(run_dir)
    if best is None:
        raise FmnistError(f"{run_dir} has no model ({BEST_FILE} is missing): the training did "
                          f"not finish; continue it with --resume, or train again")
    path = _model_checkpoint(run_dir, best["epoch"])
    if not path.is_dir():
        if (run_dir / OLD_PARAMS_DIR).is_dir():
            raise FmnistError(f"{run_dir} keeps its model in {OLD_PARAMS_DIR}/, which this "
                              f"version no longer reads, and its checkpoint of epoch "
                              f"{best['epoch']} is gone: train the run again")
        raise FmnistError(f"{path} is missing: the run's model (epoch {best['epoch']}) is gone; "
                          f"restore the run folder from a copy or train again")
    if CHECKPOINT_SUMS in best:
        _verify(path, best[CHECKPOINT_SUMS])
    return _read_model(path, cfg)


def _read_model(path: Path, cfg: TrainConfig) -> dict:
    """The model's variables from the checkpoint folder `path`, checked against the
    structure and shapes of `cfg.model`'s, and finite."""
    abstract = {name: tree for name, tree in jax.eval_shape(
        functools.partial(init_variables, get_model(cfg.model)), jax.random.key(0)).items()
        if tree}
    # The state's field names (flax's to_state_dict): the weights kept are the moving
    # average's when the run kept one, as evaluation and the best epoch used them.
    wanted = {"ema_params" if cfg.ema_decay else "params": abstract["params"],
              **({"batch_stats": abstract["batch_stats"]} if "batch_stats" in abstract else {})}
    with quiet_absl(), ocp.PyTreeCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(path / "default").item_metadata.tree["state"]
            if {name: _shapes(stored.get(name)) for name in wanted} != _shapes(wanted):
                raise FmnistError(f"{path} holds parameters of another model than {cfg.model!r} "
                                  f"(config.json): use the run folder the checkpoint came from")
            item = {"state": wanted}  # as numpy arrays: no device of the writer's needed
            state = checkpointer.restore(path / "default", args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True))["state"]
        except FmnistError:
            raise
        except Exception as e:  # orbax raises many types for a damaged folder
            raise FmnistError(f"{path} could not be read ({type(e).__name__}): the checkpoint "
                              f"is damaged; train again") from e
    variables = {"params": state["ema_params" if cfg.ema_decay else "params"],
                 **({"batch_stats": state["batch_stats"]} if "batch_stats" in wanted else {})}
    # numpy: the arrays are read as numpy, and a jax.numpy check would compile per shape.
    if not all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(variables)):
        raise FmnistError(f"{path} holds NaN or infinite weights: the training diverged or the "
                          f"checkpoint is damaged; train again")
    return variables


def _shapes(tree):
    return jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), tree)
