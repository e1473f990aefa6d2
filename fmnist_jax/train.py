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
from fmnist_jax.steps import TrainState, create_train_state, plateau_update


def train_and_evaluate(cfg: TrainConfig, workdir: str | Path | runs.Claim, *,
                       train: data.Split, test: data.Split,
                       log_fn: Callable[[str], Any] = tqdm.write,
                       progress: bool = True,
                       started: float | None = None) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train `cfg` on `train` (less its validation split) and evaluate on the validation
    split and `test` after every epoch; write the run folder `workdir` (see `runs`).

    `workdir` is a folder to claim, or a `runs.Claim` made earlier (the command line claims
    the folder before loading the data). Until the first epoch is written, any failure
    (a refused setup, Ctrl-C while compiling) gives the claim back.

    `started`, a `time.perf_counter()` reading taken when the command started: timing.jsonl
    then records `startup_seconds`, the time from it to the first epoch.

    Returns (final TrainState, list of per-epoch metric dicts).
    """
    cfg.validate()
    run = workdir if isinstance(workdir, runs.Claim) else runs.claim(workdir, cfg)
    if run.config != cfg:
        raise ValueError("the run folder was claimed for another config")
    run_dir = run.path
    try:
        state, compiled, eval_sets, lr_fn = _set_up(cfg, run_dir, train, test, log_fn)
    except BaseException:
        runs.abandon(run)
        raise

    history: list[dict[str, Any]] = []
    with runs.EpochLog(run_dir) as epoch_log:
        startup_s = None if started is None else time.perf_counter() - started
        epoch_log.compile_seconds(compiled.compile_seconds, startup_seconds=startup_s)
        if startup_s is not None:
            log_fn(f"first epoch starts {startup_s:.2f} s after the command started")
        bar = tqdm(range(1, cfg.epochs + 1), desc="epochs", unit="epoch", disable=not progress,
                   file=sys.stderr, leave=False)
        for epoch in bar:
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
            epoch_log.epoch(row, {"train_seconds": train_s, "eval_seconds": eval_s})
            bar.set_postfix(loss=f"{train_loss:.4f}", test_acc=f"{row['test_accuracy']:.4f}")
            evals = "  ".join(f"{name} loss {row[f'{name}_loss']:.4f} acc "
                              f"{row[f'{name}_accuracy']:.4f}" for name in eval_sets)
            log_fn(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                   f"{evals}  {train_s:.2f} s (+{eval_s:.2f} s eval)")
        bar.close()
    runs.save_variables(run_dir, {"params": state.params,
                                  **({"batch_stats": state.batch_stats} if state.batch_stats
                                     else {})})
    correct = int(round(history[-1]["test_accuracy"] * len(test)))
    log_fn(f"final test accuracy: {history[-1]['test_accuracy']:.4f} ({correct}/{len(test)}); "
           f"run folder: {run_dir}")
    return state, history


def _set_up(cfg: TrainConfig, run_dir: Path, train: data.Split, test: data.Split,
            log_fn: Callable[[str], Any]):
    """Everything before the first epoch: the split, the checks that need the data, the
    normalization, the initial state, the compilation."""
    n_given = len(train)
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
                               plateau_tx=make_plateau(cfg))
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
