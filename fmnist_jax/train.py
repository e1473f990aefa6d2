"""The host loop: `train_and_evaluate(cfg, workdir, train=..., test=...)` -> (state, history).

The data goes to the device once; each epoch is one call of the jitted `train_epoch` (a
`lax.scan` over every step) and one of `evaluate` per eval set; the host reads metrics once
per epoch. Compilation is done ahead of time and timed apart from the epochs.
Only the command line imports this module.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
from tqdm import tqdm

from fmnist_jax import data, runs, streams
from fmnist_jax.config import TrainConfig
from fmnist_jax.epochs import CompiledEpochs, rates, step_options
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_lr_schedule, make_optimizer, make_plateau
from fmnist_jax.steps import TrainState, create_train_state, evaluation_state, plateau_update


def train_and_evaluate(cfg: TrainConfig, workdir: str | Path | runs.Claim, *,
                       train: data.Split, test: data.Split,
                       log_fn: Callable[[str], Any] = tqdm.write,
                       progress: bool = True,
                       started: float | None = None) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train `cfg` on `train` (less its validation split) and evaluate on the validation
    split and `test` after every epoch; write the run folder `workdir` (see `runs`).

    `workdir` is a folder to claim, or a `runs.Claim` made earlier (the command line claims
    the folder before loading the data). Until the first epoch is written, any failure
    (a refused setup, Ctrl-C while compiling) gives the claim back. A claim from
    `runs.reopen` continues the run from its latest checkpoint (from the start without one):
    the epochs after it are trained again with the same keys, so the history and the
    parameters come out as an uninterrupted run's.

    Every `cfg.checkpoint_every` epochs, at every new best validation accuracy and at the
    last epoch, the whole state goes to checkpoints/. With `cfg.patience`, training stops
    once the validation accuracy has not risen for that many epochs. params/ gets the best
    epoch's variables (by validation accuracy; the last epoch's without a validation split).

    `started`, a `time.perf_counter()` reading taken when the command started: timing.jsonl
    then records `startup_seconds`, the time from it to the first epoch.

    Returns (final TrainState, list of per-epoch metric dicts).
    """
    cfg.validate()
    run = workdir if isinstance(workdir, runs.Claim) else runs.claim(workdir, cfg)
    if run.config != cfg:
        raise ValueError("the run folder was claimed for another config")
    try:
        return _train(cfg, run, train, test, log_fn, progress, started)
    finally:
        if run.lock is not None:
            run.lock.close()


def _train(cfg: TrainConfig, run: runs.Claim, train: data.Split, test: data.Split,
           log_fn: Callable[[str], Any], progress: bool, started: float | None):
    run_dir = run.path
    try:
        state, compiled, eval_sets, lr_fn = _set_up(cfg, run_dir, train, test, log_fn,
                                                    resumed=run.resumed)
    except BaseException:
        runs.abandon(run)
        raise
    has_val = "val" in eval_sets
    checkpoints = (runs.Checkpoints(run_dir, keep_best=has_val, async_save=ASYNC_CHECKPOINTS)
                   if cfg.checkpoint_every else None)
    try:
        return _epochs(cfg, run, state, compiled, eval_sets, lr_fn, checkpoints, len(test),
                       log_fn, progress, started)
    finally:
        if checkpoints is not None:
            checkpoints.close()


# Orbax's asynchronous save: the state is copied off the device, then written while the next
# epoch trains. Off: a synchronous checkpoint is already a small share of a CPU epoch
# (BENCHMARKS.md has no async measurement yet), and a background writer would race the epoch
# that donates the state's buffers.
ASYNC_CHECKPOINTS = False


class _Best:
    """The best validation accuracy so far and its epoch (ties: the earlier epoch), rebuilt
    from the history on resume; its variables are kept on the host."""

    def __init__(self, history: list[dict[str, Any]]):
        self.epoch, self.val_accuracy, self.variables = 0, -1.0, None
        for row in history:
            self.improves(row)

    def improves(self, row: dict[str, Any]) -> bool:
        if "val_accuracy" not in row or row["val_accuracy"] <= self.val_accuracy:
            return False
        self.epoch, self.val_accuracy = row["epoch"], row["val_accuracy"]
        return True


def _variables(state: TrainState) -> dict:
    """{"params": ...} and "batch_stats" for BatchNorm models, copied to the host; the
    moving average's params when the run keeps one."""
    state = evaluation_state(state)
    return jax.device_get({"params": state.params,
                           **({"batch_stats": state.batch_stats} if state.batch_stats else {})})


def _epochs(cfg, run, state, compiled, eval_sets, lr_fn, checkpoints, n_test, log_fn, progress,
            started):
    run_dir, has_val = run.path, "val" in eval_sets
    start = 0
    if run.resumed and checkpoints is not None and checkpoints.latest_epoch():
        start = checkpoints.latest_epoch()
        state = checkpoints.restore(start, state)
    # Opening the log on resume cuts the history back to the checkpoint's epoch.
    with runs.EpochLog(run_dir, resume_after=start if run.resumed else None) as epoch_log:
        history = runs.load_history(run_dir) if start else []
        best = _Best(history)
        if has_val and best.epoch:  # resumed: the best epoch's variables, from its checkpoint
            best.variables = _variables(state if best.epoch == start else
                                        checkpoints.restore(best.epoch, state))
        if start:
            log_fn(f"resumed {run_dir} after epoch {start}")

        def stop_now(epoch: int) -> bool:
            return bool(cfg.patience) and epoch - best.epoch >= cfg.patience

        epoch = start
        startup_s = None if started is None else time.perf_counter() - started
        epoch_log.compile_seconds(compiled.compile_seconds, startup_seconds=startup_s)
        if startup_s is not None:
            log_fn(f"first epoch starts {startup_s:.2f} s after the command started")
        bar = tqdm(total=cfg.epochs, initial=start, desc="epochs", unit="epoch",
                   disable=not progress, file=sys.stderr, leave=False)
        while epoch < cfg.epochs and not (start and stop_now(epoch)):
            epoch += 1
            learning_rate = _learning_rate(state, lr_fn)  # this epoch's (its first step's)
            state, train_sums, train_s = compiled.train(
                state, streams.epoch_shuffle_key(cfg.seed, epoch))
            train_loss, train_acc = rates(train_sums)
            if not math.isfinite(train_loss):
                raise FmnistError(f"training diverged at epoch {epoch} (loss {train_loss}): "
                                  f"lower --learning-rate or set --clip-norm")
            row = {"epoch": epoch, "learning_rate": learning_rate, "train_loss": train_loss,
                   "train_accuracy": train_acc}
            eval_s = _evaluate_into(row, compiled, state)
            if state.plateau is not None:
                state = plateau_update(state, row["val_loss"])
            history.append(row)
            improved = best.improves(row)
            if improved:
                best.variables = _variables(state)
            stopping = stop_now(epoch)
            # The history row first, then the checkpoint: a kill between them resumes from
            # the earlier checkpoint and writes this row again, identically.
            epoch_log.epoch(row, {"train_seconds": train_s, "eval_seconds": eval_s})
            if checkpoints is not None and (epoch % cfg.checkpoint_every == 0 or improved
                                            or stopping or epoch == cfg.epochs):
                t0 = time.perf_counter()
                checkpoints.save(epoch, state, row["val_accuracy"] if improved else None)
                epoch_log.checkpoint_seconds(epoch, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", test_acc=f"{row['test_accuracy']:.4f}")
            evals = "  ".join(f"{name} loss {row[f'{name}_loss']:.4f} acc "
                              f"{row[f'{name}_accuracy']:.4f}" for name in eval_sets)
            log_fn(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                   f"{evals}  {train_s:.2f} s (+{eval_s:.2f} s eval)")
            if stopping:
                log_fn(f"early stop: validation accuracy has not risen for {cfg.patience} "
                       f"epochs (best {best.val_accuracy:.4f} at epoch {best.epoch})")
                break
        bar.close()
    if checkpoints is not None:
        checkpoints.wait()
    last = history[-1]["epoch"] if history else epoch
    chosen = best.epoch if has_val else last
    runs.save_best(run_dir, {
        "epoch": chosen, "chosen_by": "val_accuracy" if has_val else "last epoch",
        "val_accuracy": best.val_accuracy if has_val else None, "epochs_trained": epoch,
        "stopped_early": epoch < cfg.epochs})
    runs.save_variables(run_dir, best.variables if has_val else _variables(state))
    model_row = history[chosen - 1]  # rows 1..last: the resumed ones were read back
    correct = int(round(model_row["test_accuracy"] * n_test))
    which = (f"epoch {chosen}, the best validation accuracy ({best.val_accuracy:.4f})"
             if has_val else f"epoch {chosen}, the last")
    log_fn(f"model kept: {which}; its test accuracy: {model_row['test_accuracy']:.4f} "
           f"({correct}/{n_test}); run folder: {run_dir}")
    return state, history


def _set_up(cfg: TrainConfig, run_dir: Path, train: data.Split, test: data.Split,
            log_fn: Callable[[str], Any], *, resumed: bool = False):
    """Everything before the first epoch: the split, the checks that need the data, the
    normalization, the initial state, the compilation."""
    n_given = len(train)
    if resumed:  # the epochs left need the images the run started with
        runs.check_data(run_dir, train, test)
    runs.save_data_fingerprints(run_dir, train, test)
    train, val = data.split_train_val(train, cfg.val_fraction, cfg.seed)
    if cfg.batch_size > len(train):
        if val is not None and cfg.batch_size <= n_given:  # the split left too few images
            raise FmnistError(
                f"val fraction {cfg.val_fraction} holds out {len(val)} of the {n_given} "
                f"training images and leaves {len(train)}, fewer than one batch of "
                f"{cfg.batch_size}: lower --val-fraction (or --batch-size)")
        raise FmnistError(f"batch size {cfg.batch_size} is larger than the {len(train)} training "
                          f"images: lower --batch-size")
    log_fn(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
           f"jax {jax.__version__}")
    log_fn(f"config: {json.dumps(json.loads(cfg.to_json()))}")

    norm = data.normalization_for(cfg.normalization, train.images_NxHxWx1)
    runs.save_normalization(run_dir, norm)
    steps_per_epoch = len(train) // cfg.batch_size
    state = create_train_state(get_model(cfg.model), make_optimizer(cfg, steps_per_epoch),
                               streams.stream_key(cfg.seed, streams.INIT),
                               plateau_tx=make_plateau(cfg), ema_decay=cfg.ema_decay)
    eval_sets = {"test": jax.device_put((test.images_NxHxWx1, test.labels_N))}
    if val is not None:
        eval_sets = {"val": jax.device_put((val.images_NxHxWx1, val.labels_N)), **eval_sets}
    log_fn(f"images: {len(train)} train, {len(val) if val else 0} validation (held out), "
           f"{len(test)} test")

    compiled = CompiledEpochs(state, jax.device_put((train.images_NxHxWx1, train.labels_N)),
                              eval_sets, batch_size=cfg.batch_size,
                              eval_batch_size=cfg.eval_batch_size, norm=norm,
                              key=streams.epoch_shuffle_key(cfg.seed, 1),
                              options=step_options(cfg))
    log_fn(f"compiled train epoch and eval in {compiled.compile_seconds:.2f} s "
           f"({steps_per_epoch} steps of {cfg.batch_size} per epoch)")
    return state, compiled, eval_sets, make_lr_schedule(cfg, steps_per_epoch)


def _learning_rate(state: TrainState, lr_fn) -> float:
    """The rate the next step uses: the schedule's, times the plateau schedule's scale."""
    scale = 1.0 if state.plateau is None else float(state.plateau.scale)
    return float(lr_fn(int(state.step))) * scale


def _evaluate_into(row: dict[str, Any], compiled: CompiledEpochs, state: TrainState) -> float:
    """Add each eval set's loss and accuracy to `row`; return the seconds it took."""
    t0 = time.perf_counter()
    for name in compiled.eval_sets:
        row[f"{name}_loss"], row[f"{name}_accuracy"] = rates(compiled.evaluate(state, name))
    return time.perf_counter() - t0
