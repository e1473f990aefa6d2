"""The host loop: `train_and_evaluate(cfg, workdir, train=..., test=...)` -> (state, history).

The data goes to the device once; each epoch is one call of the jitted `train_epoch` (a
`lax.scan` over every step) and one of `evaluate` per eval set; the host reads metrics once
per epoch. Compilation is done ahead of time and timed apart from the epochs.
Only the command line imports this module.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fmnist_jax import data, metrics, streams
from fmnist_jax.run import folder, interrupts
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.run.compiled import CompiledEpochs, CompiledSeedEpochs, rates, step_options
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_lr_schedule, make_optimizer, make_plateau
from fmnist_jax.run.parallel import check_batch_sizes, describe_devices, is_writer
from fmnist_jax.seeds import plateau_update_seeds
from fmnist_jax.steps import TrainState, create_train_state, evaluation_state, plateau_update


def train_and_evaluate(cfg: TrainConfig, workdir: str | Path | folder.Claim, *,
                       train: data.Split, test: data.Split,
                       log_fn: Callable[[str], Any] = tqdm.write,
                       progress: bool = True,
                       started: float | None = None) -> tuple[TrainState, list[Any]]:
    """Train `cfg` on `train` (less its validation split) and evaluate on the validation
    split and `test` after every epoch; write the run folder `workdir` (see `run.folder`).

    `workdir` is a folder to claim, or a `folder.Claim` made earlier (the command line claims
    the folder before loading the data). Until the first epoch is written, any failure
    (a refused setup, Ctrl-C while compiling) gives the claim back. A claim from
    `folder.reopen` continues the run from its latest checkpoint (from the start without one):
    the epochs after it are trained again with the same keys, so the history and the
    parameters come out as an uninterrupted run's.

    Every `cfg.checkpoint_every` epochs, at every new best validation accuracy and at the
    last epoch, the whole state goes to checkpoints/. With `cfg.patience`, training stops
    once the validation accuracy has not risen for that many epochs. params/ gets the best
    epoch's variables (by validation accuracy; the last epoch's without a validation split).

    With `cfg.seeds` = M > 1, M models (seeds cfg.seed, cfg.seed + 1, ...) train as one
    program (`seeds.train_epoch_seeds`: in lockstep under `jax.vmap` on a GPU, one after
    another on a CPU), each in its own run folder `workdir/seed-S/` with everything above,
    each trained as a run of `cfg.members()[m]` is (the same keys and batches; bit for bit
    on a CPU; in lockstep or with a seed's batches split over several devices the float
    sums run in another order, so the numbers agree to the last bits at first and drift
    apart over many steps, as on another machine); one that stops early keeps its state
    while the others go on. summary.json in `workdir` then gets each seed's test accuracy
    and their mean with a 95% interval.

    `started`, a `time.perf_counter()` reading taken when the command started: timing.jsonl
    then records `startup_seconds`, the time from it to the first epoch.

    The batches are split over every device (`parallel`; the batch sizes must be multiples
    of the device count); with M > 1 seeds the devices are first shared out to groups of
    seeds (`parallel.seed_groups`), each batch then split over its group. With several
    processes (`parallel.initialize_distributed`) every process calls this with the same
    arguments; process 0 alone logs and writes the files.

    Returns (final TrainState, list of per-epoch metric dicts); with M > 1 seeds, the state's
    leaves have a leading axis M and the list holds each seed's history.
    """
    cfg.validate()
    check_batch_sizes(cfg.batch_size, cfg.eval_batch_size, jax.device_count(), cfg.seeds)
    if not is_writer():
        log_fn, progress = (lambda line: None), False
    run = workdir if isinstance(workdir, folder.Claim) else folder.claim(workdir, cfg)
    if run.config != cfg:
        raise ValueError("the run folder was claimed for another config")
    try:
        return _train(cfg, run, train, test, log_fn, progress, started)
    finally:
        run.release()


def _train(cfg: TrainConfig, run: folder.Claim, train: data.Split, test: data.Split,
           log_fn: Callable[[str], Any], progress: bool, started: float | None):
    try:
        if run.members:
            state, program, lr_fn = _set_up_seeds(cfg, run, train, test, log_fn)
        else:
            state, compiled, _, lr_fn = _set_up(cfg, run.path, train, test, log_fn,
                                                resumed=run.resumed)
            program = _OneModel(compiled)
        interrupts.raise_if_pending()  # Ctrl-C while compiling, swallowed: give the claim back
    except BaseException:
        folder.abandon(run)
        raise
    has_val = "val" in program.eval_sets
    checkpoints = [folder.Checkpoints(member.path, keep_best=has_val, async_save=ASYNC_CHECKPOINTS)
                   if cfg.checkpoint_every else None for member in run.members or (run,)]
    try:
        return _epochs(cfg, run, state, program, lr_fn, checkpoints, len(test), log_fn,
                       progress, started)
    finally:
        for member_checkpoints in checkpoints:
            if member_checkpoints is not None:
                member_checkpoints.close()


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


class _OneModel:
    """One run's compiled epochs as the host loop sees them: per member (here one), the
    train and eval (loss, accuracy), and the member's state."""

    def __init__(self, compiled: CompiledEpochs):
        self.compiled, self.eval_sets = compiled, compiled.eval_sets

    def train(self, state, seeds, epoch, active):
        state, sums, seconds = self.compiled.train(state,
                                                   streams.epoch_shuffle_key(seeds[0], epoch))
        return state, [rates(sums)], seconds

    def evaluate(self, state, name, active):
        return [rates(self.compiled.evaluate(state, name))]

    def plateau(self, state, val_losses, active):
        return plateau_update(state, val_losses[0])

    def learning_rates(self, state, lr_fn):
        return [_learning_rate(state, lr_fn)]

    def member_states(self, state):
        return [state]

    def with_member_states(self, state, member_states):
        """`state` with each member's replaced by `member_states` (restored checkpoints)."""
        return member_states[0]


class _SeedModels(_OneModel):
    """`CompiledSeedEpochs` as the host loop sees it: M members, one state with a leading
    axis M, `active` a list of M bools (False: stopped early, its state kept)."""

    def train(self, state_M, seeds, epoch, active):
        key_M = jnp.stack([streams.epoch_shuffle_key(seed, epoch) for seed in seeds])
        state_M, sums, seconds = self.compiled.train(state_M, key_M, jnp.asarray(active))
        return state_M, _member_rates(sums), seconds

    def evaluate(self, state_M, name, active):
        """Each member's (loss, accuracy) on `name`; None for one stopped (not evaluated)."""
        return _member_rates(self.compiled.evaluate(state_M, name, jnp.asarray(active)))

    def plateau(self, state_M, val_losses, active):
        # float32 on the host as the one-model path's Python float becomes float32 in jit.
        return plateau_update_seeds(state_M, np.asarray(val_losses, np.float32),
                                    jnp.asarray(active))

    def learning_rates(self, state_M, lr_fn):
        steps = jax.device_get(state_M.step)
        scales = (np.ones(len(steps)) if state_M.plateau is None
                  else jax.device_get(state_M.plateau.scale))
        rate_of = functools.cache(lambda step: float(lr_fn(step)))  # the members share steps
        return [rate_of(int(step)) * float(scale) for step, scale in zip(steps, scales)]

    def member_states(self, state_M):
        """Each member's state on the host (one copy off the device for all of them)."""
        host = jax.device_get(state_M)
        return [jax.tree_util.tree_map(lambda leaf, m=m: leaf[m], host)
                for m in range(len(host.step))]

    def with_member_states(self, state_M, member_states):
        return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *member_states)


def _member_rates(sums) -> list[tuple[float, float] | None]:
    """[(mean loss, accuracy)] per member from sums of shape (M,), read in one transfer and
    divided as `rates` divides (Python floats); None for a member that was skipped (stopped
    early: nothing counted)."""
    loss_M, correct_M, count_M = jax.device_get(sums)
    return [(float(loss) / float(count), float(correct) / float(count)) if count else None
            for loss, correct, count in zip(loss_M, correct_M, count_M)]


def _epochs(cfg, run, state, program, lr_fn, checkpoints, n_test, log_fn, progress, started):
    """The host loop, for one run or for the M members of a run of several seeds: each epoch
    trains every member still active in one call, then does each one's bookkeeping (history,
    best epoch, checkpoint, early stop) in its own run folder. A resumed run goes on from
    each member's latest checkpoint."""
    members = run.members or (run,)
    many = len(members) > 1
    seeds = [member.config.seed for member in members]
    has_val = "val" in program.eval_sets
    # Each member goes on from its own latest checkpoint: a kill during an epoch's saves can
    # leave the seeds of one run a checkpoint apart.
    starts = [(c.latest_epoch() or 0) if run.resumed and c is not None else 0
              for c in checkpoints]
    if any(starts):
        member_states = program.member_states(state)
        state = program.with_member_states(state, [
            checkpoints[m].restore(start, member_states[m]) if start else member_states[m]
            for m, start in enumerate(starts)])
    with contextlib.ExitStack() as open_logs:
        # Opening the log on resume cuts the history back to the checkpoint's epoch.
        epoch_logs = [open_logs.enter_context(folder.EpochLog(
            member.path, resume_after=start if run.resumed else None))
            for member, start in zip(members, starts)]
        # Cut here too: with several processes, the others may read before process 0 cuts.
        histories = [folder.load_history(member.path)[:start] if start else []
                     for member, start in zip(members, starts)]
        bests = [_Best(history) for history in histories]
        if has_val and any(best.epoch for best in bests):
            # resumed: the best epoch's variables, from its checkpoint
            member_states = program.member_states(state)
            for m, best in enumerate(bests):
                if best.epoch:
                    best.variables = _variables(
                        member_states[m] if best.epoch == starts[m] else
                        checkpoints[m].restore(best.epoch, member_states[m]))
        if any(starts):
            log_fn(f"resumed {run.path} after epoch {starts[0]}" if not many else
                   f"resumed {run.path}: " + ", ".join(
                       f"seed {seed} after epoch {start}" for seed, start in zip(seeds, starts)))

        def stop_now(best: _Best, epoch: int) -> bool:
            return bool(cfg.patience) and epoch - best.epoch >= cfg.patience

        # A member is active until it stops early or has trained every epoch. Each epoch of
        # the loop trains the active members furthest behind: after a resume from
        # checkpoints a seed apart, the ones behind catch up before all go on together.
        active = [start < cfg.epochs and not (start and stop_now(best, start))
                  for best, start in zip(bests, starts)]
        trained_until = list(starts)
        startup_s = None if started is None else time.perf_counter() - started
        for epoch_log in epoch_logs:
            epoch_log.compile_seconds(program.compiled.compile_seconds, startup_seconds=startup_s)
        if startup_s is not None:
            log_fn(f"first epoch starts {startup_s:.2f} s after the command started")
        first = min((start for start, go in zip(starts, active) if go), default=cfg.epochs)
        bar = tqdm(total=cfg.epochs, initial=first, desc="epochs", unit="epoch",
                   disable=not progress, file=sys.stderr, leave=False)
        while any(active):
            interrupts.raise_if_pending()
            epoch = 1 + min(trained_until[m] for m in range(len(members)) if active[m])
            now = [active[m] and trained_until[m] == epoch - 1 for m in range(len(members))]
            trained = [m for m in range(len(members)) if now[m]]
            learning_rates = program.learning_rates(state, lr_fn)  # this epoch's first step's
            state, train_rates, train_s = program.train(state, seeds, epoch, now)
            rows = {}
            for m in trained:
                train_loss, train_acc = train_rates[m]
                if not math.isfinite(train_loss):
                    raise FmnistError(f"{f'seed {seeds[m]}: ' if many else ''}training diverged "
                                      f"at epoch {epoch} (loss {train_loss}): lower "
                                      f"--learning-rate or set --clip-norm")
                rows[m] = {"epoch": epoch, "learning_rate": learning_rates[m],
                           "train_loss": train_loss, "train_accuracy": train_acc}
            t0 = time.perf_counter()
            for name in program.eval_sets:
                for m, member_rates in enumerate(program.evaluate(state, name, now)):
                    if m in rows:
                        rows[m][f"{name}_loss"], rows[m][f"{name}_accuracy"] = member_rates
            eval_s = time.perf_counter() - t0
            if state.plateau is not None:
                state = program.plateau(state, [rows[m]["val_loss"] if m in rows else 0.0
                                                for m in range(len(members))], now)
            member_states = None  # copied off the device when the first member needs it
            stop_lines = []
            for m, row in rows.items():
                histories[m].append(row)
                trained_until[m] = epoch
                improved = bests[m].improves(row)
                stopping = stop_now(bests[m], epoch)
                saving = checkpoints[m] is not None and (
                    epoch % cfg.checkpoint_every == 0 or improved or stopping
                    or epoch == cfg.epochs)
                if (improved or saving) and member_states is None:
                    member_states = program.member_states(state)
                if improved:
                    bests[m].variables = _variables(member_states[m])
                # The history row first, then the checkpoint: a kill between them resumes
                # from the earlier checkpoint and writes this row again, identically.
                epoch_logs[m].epoch(row, {"train_seconds": train_s, "eval_seconds": eval_s,
                                          **({"seeds_trained_together": len(members)}
                                             if many else {})})
                if saving:
                    t0 = time.perf_counter()
                    checkpoints[m].save(epoch, member_states[m],
                                        row["val_accuracy"] if improved else None)
                    epoch_logs[m].checkpoint_seconds(epoch, time.perf_counter() - t0)
                if stopping or epoch == cfg.epochs:
                    active[m] = False
                if stopping:
                    stop_lines.append(
                        f"{f'seed {seeds[m]}: ' if many else ''}early stop: validation "
                        f"accuracy has not risen for {cfg.patience} epochs (best "
                        f"{bests[m].val_accuracy:.4f} at epoch {bests[m].epoch})")
            bar.update(1)
            bar.set_postfix(loss=f"{_mean(rows, 'train_loss'):.4f}",
                            test_acc=f"{_mean(rows, 'test_accuracy'):.4f}")
            log_fn(_epoch_line(epoch, rows, program.eval_sets, train_s, eval_s, len(members)))
            for line in stop_lines:
                log_fn(line)
        bar.close()
    last_states = [None] * len(members) if has_val else program.member_states(state)
    kept = [_keep_best(cfg, member, histories[m], bests[m], checkpoints[m], last_states[m],
                       trained_until[m], n_test, log_fn,
                       prefix=f"seed {seeds[m]}: " if many else "")
            for m, member in enumerate(members)]
    if not many:
        return state, histories[0]
    summary = {"metric": "test accuracy of each seed's kept model (" + (
        "the best validation accuracy" if has_val else "the last epoch") + ")",
        "seeds": kept, **metrics.mean_and_interval([row["test_accuracy"] for row in kept])}
    folder.save_summary(run.path, summary)
    for line in summary_lines(summary):
        log_fn(line)
    log_fn(f"summary: {run.path / folder.SUMMARY_FILE}")
    return state, histories


def _mean(rows: dict[int, dict[str, Any]], key: str) -> float:
    return sum(row[key] for row in rows.values()) / len(rows)


def _epoch_line(epoch, rows, eval_sets, train_s, eval_s, n_members) -> str:
    """The epoch's log line: one run's metrics, or the means over the seeds that trained."""
    names = ["train", *eval_sets]
    metrics_text = "  ".join(f"{name} loss {_mean(rows, f'{name}_loss'):.4f} acc "
                             f"{_mean(rows, f'{name}_accuracy'):.4f}" for name in names)
    if n_members == 1:
        return f"epoch {epoch:3d}  {metrics_text}  {train_s:.2f} s (+{eval_s:.2f} s eval)"
    return (f"epoch {epoch:3d}  mean of {len(rows)} seeds  {metrics_text}  {train_s:.2f} s "
            f"(+{eval_s:.2f} s eval) for all {n_members}")


def _keep_best(cfg, member, history, best, checkpoints, last_state, epochs_trained, n_test,
               log_fn, prefix) -> dict[str, Any]:
    """The end of one run: best.json, params/ (the best epoch's variables; `last_state`'s
    without a validation split), the "model kept" line. Returns that model's row for a
    summary of several seeds."""
    if checkpoints is not None:
        checkpoints.wait()
    has_val = last_state is None
    last = history[-1]["epoch"] if history else epochs_trained
    chosen = best.epoch if has_val else last
    folder.save_best(member.path, {
        "epoch": chosen, "chosen_by": "val_accuracy" if has_val else "last epoch",
        "val_accuracy": best.val_accuracy if has_val else None,
        "epochs_trained": epochs_trained, "stopped_early": epochs_trained < cfg.epochs})
    folder.save_variables(member.path, best.variables if has_val else _variables(last_state))
    model_row = history[chosen - 1]  # rows 1..last: the resumed ones were read back
    correct = int(round(model_row["test_accuracy"] * n_test))
    which = (f"epoch {chosen}, the best validation accuracy ({best.val_accuracy:.4f})"
             if has_val else f"epoch {chosen}, the last")
    log_fn(f"{prefix}model kept: {which}; its test accuracy: {model_row['test_accuracy']:.4f} "
           f"({correct}/{n_test}); run folder: {member.path}")
    return {"seed": member.config.seed, "run": member.path.name, "epoch": chosen,
            "epochs_trained": epochs_trained, "val_accuracy": best.val_accuracy if has_val
            else None, "test_accuracy": model_row["test_accuracy"]}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A run of several seeds' summary.json as a table and its mean line."""
    lines = ["seed  epochs  kept epoch  val acc  test acc"]
    for row in summary["seeds"]:
        val = "      -" if row["val_accuracy"] is None else f"{row['val_accuracy']:.4f}"
        lines.append(f"{row['seed']:4d}  {row['epochs_trained']:6d}  {row['epoch']:10d}  "
                     f"{val:>7s}  {row['test_accuracy']:.4f}")
    low, high = summary["interval"]
    lines.append(f"test accuracy over {summary['n']} seeds: mean {summary['mean']:.4f}, std "
                 f"{summary['std']:.4f}, {summary['confidence']:.0%} CI [{low:.4f}, {high:.4f}] "
                 f"(Student t, {summary['n'] - 1} degrees of freedom)")
    return lines


def _set_up(cfg: TrainConfig, run_dir: Path, train: data.Split, test: data.Split,
            log_fn: Callable[[str], Any], *, resumed: bool = False):
    """Everything before the first epoch: the split, the checks that need the data, the
    normalization, the initial state, the compilation."""
    n_given = len(train)
    if resumed:  # the epochs left need the images the run started with
        folder.check_data(run_dir, train, test)
    folder.save_data_fingerprints(run_dir, train, test)
    train, val = data.split_train_val(train, cfg.val_fraction, cfg.seed)
    _check_one_batch_fits(cfg, n_given, len(train), len(val) if val else 0)
    _log_device_and_config(cfg, log_fn)

    norm = data.normalization_for(cfg.normalization, train.images_NxHxWx1)
    folder.save_normalization(run_dir, norm)
    steps_per_epoch = len(train) // cfg.batch_size
    state = create_train_state(get_model(cfg.model), make_optimizer(cfg, steps_per_epoch),
                               streams.stream_key(cfg.seed, streams.INIT),
                               plateau_tx=make_plateau(cfg), ema_decay=cfg.ema_decay)
    # Host arrays: CompiledEpochs puts them on every device.
    eval_sets = {"test": (test.images_NxHxWx1, test.labels_N)}
    if val is not None:
        eval_sets = {"val": (val.images_NxHxWx1, val.labels_N), **eval_sets}
    log_fn(f"images: {len(train)} train, {len(val) if val else 0} validation (held out), "
           f"{len(test)} test")

    compiled = CompiledEpochs(state, (train.images_NxHxWx1, train.labels_N),
                              eval_sets, batch_size=cfg.batch_size,
                              eval_batch_size=cfg.eval_batch_size, norm=norm,
                              key=streams.epoch_shuffle_key(cfg.seed, 1),
                              options=step_options(cfg))
    log_fn(f"compiled train epoch and eval in {compiled.compile_seconds:.2f} s "
           f"({steps_per_epoch} steps of {cfg.batch_size} per epoch)")
    return state, compiled, eval_sets, make_lr_schedule(cfg, steps_per_epoch)


def _check_one_batch_fits(cfg: TrainConfig, n_given: int, n_train: int, n_val: int) -> None:
    if cfg.batch_size > n_train:
        if n_val and cfg.batch_size <= n_given:  # the split left too few images
            raise FmnistError(
                f"val fraction {cfg.val_fraction} holds out {n_val} of the {n_given} "
                f"training images and leaves {n_train}, fewer than one batch of "
                f"{cfg.batch_size}: lower --val-fraction (or --batch-size)")
        raise FmnistError(f"batch size {cfg.batch_size} is larger than the {n_train} training "
                          f"images: lower --batch-size")


def _log_device_and_config(cfg: TrainConfig, log_fn: Callable[[str], Any]) -> None:
    log_fn(f"device: {describe_devices(cfg.seeds)}, jax {jax.__version__}")
    log_fn(f"config: {json.dumps(json.loads(cfg.to_json()))}")


def seed_members(cfg: TrainConfig, labels_N: np.ndarray, seeds: list[int]):
    """The M members of a run of several seeds before training (`train.py --seeds` and
    `seed_timing` share it): each member's (train, validation) indices into the training
    images, drawn from its seed (stratified per class, so every member's split has the same
    sizes); their initial states stacked, a leading axis M on every leaf; the steps per epoch."""
    splits = [data.train_val_indices(labels_N, cfg.val_fraction, seed) for seed in seeds]
    steps_per_epoch = len(splits[0][0]) // cfg.batch_size
    # One model and optimizer object for all: the stacked states' static fields must match.
    model, tx = get_model(cfg.model), make_optimizer(cfg, steps_per_epoch)
    plateau_tx = make_plateau(cfg)
    state_M = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *[
        create_train_state(model, tx, streams.stream_key(seed, streams.INIT),
                           plateau_tx=plateau_tx, ema_decay=cfg.ema_decay)
        for seed in seeds])
    return splits, state_M, steps_per_epoch


def _set_up_seeds(cfg: TrainConfig, run: folder.Claim, train: data.Split, test: data.Split,
                  log_fn: Callable[[str], Any]):
    """`_set_up` for the M members of a run of several seeds: each its own validation split
    (indices into the one copy of the training images on the device), normalization and
    initial state (stacked: a leading axis M on every leaf), all compiled as one program."""
    member_cfgs = [member.config for member in run.members]
    splits, state_M, steps_per_epoch = seed_members(cfg, train.labels_N,
                                                    [member.seed for member in member_cfgs])
    n_train, n_val = len(splits[0][0]), 0 if splits[0][1] is None else len(splits[0][1])
    _check_one_batch_fits(cfg, len(train), n_train, n_val)
    _log_device_and_config(cfg, log_fn)
    if run.resumed:  # the epochs left need the images the run started with
        for member in run.members:
            folder.check_data(member.path, train, test)
    folder.save_data_fingerprints([member.path for member in run.members], train, test)
    norms = [data.normalization_for(cfg.normalization, train.images_NxHxWx1[train_idx])
             for train_idx, _ in splits]
    for member, norm in zip(run.members, norms):
        folder.save_normalization(member.path, norm)
    norm_M = data.Normalization(*(np.asarray(values, np.float32) for values in zip(*norms)))
    train_xy = jax.device_put((train.images_NxHxWx1, train.labels_N))
    eval_sets = {"test": (*jax.device_put((test.images_NxHxWx1, test.labels_N)), None)}
    if n_val:
        val_idx_MxQ = jax.device_put(np.stack([val_idx for _, val_idx in splits]).astype(np.int32))
        eval_sets = {"val": (*train_xy, val_idx_MxQ), **eval_sets}
    log_fn(f"images: {n_train} train, {n_val} validation (held out), {len(test)} test; "
           f"{len(member_cfgs)} seeds ({member_cfgs[0].seed}..{member_cfgs[-1].seed}), each "
           f"with its own validation split")
    compiled = CompiledSeedEpochs(
        state_M, train_xy,
        jax.device_put(np.stack([train_idx for train_idx, _ in splits]).astype(np.int32)),
        eval_sets, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        norm_M=norm_M, key_M=jnp.stack([streams.epoch_shuffle_key(member.seed, 1)
                                        for member in member_cfgs]),
        active_M=jnp.ones(len(member_cfgs), bool), options=step_options(cfg))
    log_fn(f"compiled train epoch and eval of {len(member_cfgs)} seeds in "
           f"{compiled.compile_seconds:.2f} s ({steps_per_epoch} steps of {cfg.batch_size} "
           f"per epoch)")
    return state_M, _SeedModels(compiled), make_lr_schedule(cfg, steps_per_epoch)


def _learning_rate(state: TrainState, lr_fn) -> float:
    """The rate the next step uses: the schedule's, times the plateau schedule's scale."""
    scale = 1.0 if state.plateau is None else float(state.plateau.scale)
    return float(lr_fn(int(state.step))) * scale
