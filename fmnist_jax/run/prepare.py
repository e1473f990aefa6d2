"""Everything before a run's first epoch, for one model or the M members of a run of several
seeds: the validation split, the checks that need the data, the normalization, the initial
states, and the compiled epochs as the host loop drives them (`OneModel`, `SeedModels`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import data, streams
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.optim import (SWEPT_BY_OPTIMIZER, make_lr_schedule, make_optimizer, make_plateau,
                              with_hyperparams)
from fmnist_jax.run import folder, teacher
from fmnist_jax.run.compiled import CompiledEpochs, CompiledSeedEpochs, rates, step_options
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.seeds import plateau_update_seeds
from fmnist_jax.steps import HPARAMS, TrainState, create_train_state, plateau_update


class OneModel:
    """One run's compiled epochs as the host loop sees them: per member (here one), the
    train and eval (loss, accuracy), the learning rate, and the member's state. `active` is
    a list of one bool: whether the member trains this epoch (always, for one model)."""

    def __init__(self, compiled: CompiledEpochs, lr_fn):
        self.compiled, self.eval_sets, self.lr_fn = compiled, compiled.eval_sets, lr_fn

    def train(self, state, seeds, epoch, active):
        state, sums, seconds = self.compiled.train(state,
                                                   streams.epoch_shuffle_key(seeds[0], epoch))
        return state, [rates(sums)], seconds

    def evaluate(self, state, name, active):
        return [rates(self.compiled.evaluate(state, name))]

    def plateau(self, state, val_losses, active):
        return plateau_update(state, val_losses[0])

    def learning_rates(self, state):
        """The rate the next step uses: the schedule's, times the plateau schedule's scale."""
        scale = 1.0 if state.plateau is None else float(state.plateau.scale)
        return [float(self.lr_fn(int(state.step))) * scale]

    def member_states(self, state):
        return [state]

    def with_member_states(self, state, member_states):
        """`state` with each member's replaced by `member_states` (restored checkpoints)."""
        return member_states[0]


class SeedModels(OneModel):
    """`CompiledSeedEpochs` as the host loop sees it: M members, one state with a leading
    axis M, `active` a list of M bools (False: the member does not train this epoch, its
    state is kept). `lr_fns`: each member's learning-rate schedule (a sweep's members may
    have their own peaks)."""

    def __init__(self, compiled: CompiledSeedEpochs, lr_fns: list):
        super().__init__(compiled, lr_fns[0])
        self.lr_fns = lr_fns

    def train(self, state_M, seeds, epoch, active):
        key_M = jnp.stack([streams.epoch_shuffle_key(seed, epoch) for seed in seeds])
        state_M, sums, seconds = self.compiled.train(state_M, key_M, jnp.asarray(active))
        return state_M, _member_rates(sums), seconds

    def evaluate(self, state_M, name, active):
        """Each member's (loss, accuracy) on `name`; None for one not active (not evaluated)."""
        return _member_rates(self.compiled.evaluate(state_M, name, jnp.asarray(active)))

    def plateau(self, state_M, val_losses, active):
        # float32 on the host as the one-model path's Python float becomes float32 in jit.
        return plateau_update_seeds(state_M, np.asarray(val_losses, np.float32),
                                    jnp.asarray(active))

    def learning_rates(self, state_M):
        steps = jax.device_get(state_M.step)
        scales = (np.ones(len(steps)) if state_M.plateau is None
                  else jax.device_get(state_M.plateau.scale))
        # Members share steps and, but in a sweep of the rate, schedules.
        rate_of = functools.cache(lambda lr_fn, step: float(lr_fn(step)))
        return [rate_of(lr_fn, int(step)) * float(scale)
                for lr_fn, step, scale in zip(self.lr_fns, steps, scales)]

    def member_states(self, state_M):
        """Each member's state on the host (one copy off the device for all of them)."""
        host = jax.device_get(state_M)
        return [jax.tree_util.tree_map(lambda leaf, m=m: leaf[m], host)
                for m in range(len(host.step))]

    def with_member_states(self, state_M, member_states):
        return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *member_states)


def _member_rates(sums) -> list[tuple[float, float] | None]:
    """[(mean loss, accuracy)] per member from sums of shape (M,), read in one transfer and
    divided as `rates` divides (Python floats); None for a member that was skipped (not
    active: nothing counted)."""
    loss_M, correct_M, count_M = jax.device_get(sums)
    return [(float(loss) / float(count), float(correct) / float(count)) if count else None
            for loss, correct, count in zip(loss_M, correct_M, count_M)]


def set_up(cfg: TrainConfig, run: folder.Claim, train: data.Split, test: data.Split,
           log_fn: Callable[[str], Any]) -> tuple[TrainState, OneModel]:
    """The initial state and the compiled program of the run `run` claims: `set_up_one`, or
    `set_up_seeds` for a run of several seeds."""
    if run.members:
        return set_up_seeds(cfg, run, train, test, log_fn)
    return set_up_one(cfg, run, train, test, log_fn)


def set_up_one(cfg: TrainConfig, run: folder.Claim, train: data.Split, test: data.Split,
               log_fn: Callable[[str], Any]) -> tuple[TrainState, OneModel]:
    """One model: the split, the checks that need the data, the normalization, the initial
    state, the compilation."""
    n_given = len(train)
    if run.resumed:  # the epochs left need the images the run started with
        folder.check_data(run.path, train, test)
    folder.save_data_fingerprints(run.path, train, test)
    given = train
    # One draw of the split: the teacher's rows and the validation note need its indices.
    train_idx, val_idx = data.train_val_indices(given.labels_N, cfg.val_fraction,
                                                cfg.split_seed)
    if val_idx is None:  # no copy of the images when nothing is held out
        val = None
    else:
        train, val = given.subset(train_idx), given.subset(val_idx)
    _check_one_batch_fits(cfg, n_given, len(train), len(val) if val else 0)
    _log_config(cfg, log_fn)
    # The teacher's log-probabilities of the images the student trains on, in their order.
    taught = _teacher(cfg, given, test, log_fn, train_idx,
                      {} if val_idx is None else {cfg.split_seed: val_idx})

    norm = data.normalization_for(cfg.normalization, train.images_NxHxWx1)
    folder.save_normalization(run.path, norm)
    steps_per_epoch = len(train) // cfg.batch_size
    # A sweep's member resumed alone goes on as the sweep trained it: its state as the
    # sweep's (the swept values as arrays), in the sweep's program.
    sweep = _sweep_of(run)
    whole = sweep or cfg
    state = member_state(whole, member_optimizers(whole, steps_per_epoch), cfg.seed,
                         member_point(whole, cfg))
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
                              options=step_options(program_config(whole)), **taught)
    log_fn(f"compiled train epoch and eval in {compiled.compile_seconds:.2f} s "
           f"({steps_per_epoch} steps of {cfg.batch_size} per epoch)")
    return state, OneModel(compiled, make_lr_schedule(cfg, steps_per_epoch))


def _teacher(cfg: TrainConfig, train: data.Split, test: data.Split,
             log_fn: Callable[[str], Any], rows: np.ndarray | None = None,
             val_of: dict[int, np.ndarray] | None = None) -> dict[str, Any]:
    """The teacher's part of the compiled epochs' arguments: {} without a teacher; with
    `--teacher-view augmented` the teachers themselves (`teachers`, run in every step);
    else `teacher_NxC`, their log-probabilities (`teacher.teacher_logprobs`) of the
    training images `train` (all of them, as given: `test` is for checking that the
    teachers were trained on them), or of its `rows` only, in that order. `val_of`: the
    student's validation indices into `train` by split seed ({}: none), for the note
    logged when a teacher trained on some of them (`teacher.validation_note`)."""
    if not cfg.teacher:
        return {}
    t0 = time.perf_counter()
    dirs = teacher.teacher_dirs(cfg)
    teachers = teacher.load_teachers(cfg, train, test, dirs)
    note = teacher.validation_note(dirs, train.labels_N, val_of or {})
    if note:
        log_fn(note)
    # Reported: nothing is chosen by it.
    accuracy = teacher.teachers_accuracy(teachers, test, cfg.teacher_tta)
    seen = (f"teacher: {len(dirs)} run(s), test accuracy {accuracy:.2%} as one model"
            + " (with flip TTA)" * (cfg.teacher_tta == "flip"))
    if cfg.teacher_view == "augmented":
        log_fn(f"{seen}, run in every step on the augmented batch; read in "
               f"{time.perf_counter() - t0:.2f} s")
        return {"teachers": teachers}
    all_NxC = teacher.teacher_logprobs(cfg, train, test, teachers=teachers)
    log_fn(f"{seen}, its most probable class the label of "
           f"{teacher.agreement(all_NxC, train.labels_N):.2%} of the training images; read "
           f"in {time.perf_counter() - t0:.2f} s")
    return {"teacher_NxC": all_NxC if rows is None else all_NxC[rows]}


def _sweep_of(run: folder.Claim) -> TrainConfig | None:
    """The config of the sweep whose member `run` is, resumed alone; else None."""
    if not run.resumed:
        return None
    whole = folder.seeds_run_of(run.path)
    sweep = None if whole is None else folder.stored_config(whole)
    return sweep if sweep is not None and sweep.sweep else None


def _check_one_batch_fits(cfg: TrainConfig, n_given: int, n_train: int, n_val: int) -> None:
    if cfg.batch_size > n_train:
        if n_val and cfg.batch_size <= n_given:  # the split left too few images
            raise FmnistError(
                f"val fraction {cfg.val_fraction} holds out {n_val} of the {n_given} "
                f"training images and leaves {n_train}, fewer than one batch of "
                f"{cfg.batch_size}: lower --val-fraction (or --batch-size)")
        raise FmnistError(f"batch size {cfg.batch_size} is larger than the {n_train} training "
                          f"images: lower --batch-size")


def _log_config(cfg: TrainConfig, log_fn: Callable[[str], Any]) -> None:
    """The config (the command's first line named the device: `describe_devices`)."""
    log_fn(f"config: {json.dumps(json.loads(cfg.to_json()))}")


def program_config(cfg: TrainConfig) -> TrainConfig:
    """The config whose compiled program trains every member of `cfg`: `cfg` itself, but in
    a sweep each swept field outside the optimizer at its largest value, so the parts it
    needs are in the program (label smoothing, the moving average, each augmentation) while
    each member's own value comes from its state (`TrainState.hparams`)."""
    largest = {name: max(values) for name, values in cfg.grid().items()
               if name not in SWEPT_BY_OPTIMIZER}
    return dataclasses.replace(cfg, **largest)


def member_point(cfg: TrainConfig, member: TrainConfig) -> dict[str, float | int]:
    """The values of `cfg`'s swept fields in `member` ({} without a sweep)."""
    return {name: getattr(member, name) for name in cfg.grid()}


def member_optimizers(cfg: TrainConfig, steps_per_epoch: int):
    """(tx, plateau_tx) of every member of `cfg`: made for `program_config(cfg)`, the grid's
    fields swept. One pair for all: the stacked states' static fields must match."""
    program = program_config(cfg)
    return (make_optimizer(program, steps_per_epoch, swept=tuple(cfg.grid())),
            make_plateau(program))


def member_state(cfg: TrainConfig, optimizers, seed: int,
                 point: dict[str, float | int]) -> TrainState:
    """The initial state of `cfg`'s member of `seed` and grid `point` (see `seed_members`),
    with `optimizers` (`member_optimizers`): the swept values in its optimizer's state and
    in its `hparams`."""
    program, (tx, plateau_tx) = program_config(cfg), optimizers
    hparams = {name: jnp.asarray(value, jnp.int32 if isinstance(value, int) else jnp.float32)
               for name, value in point.items() if name in HPARAMS}
    state = create_train_state(get_model(cfg.model), tx, streams.stream_key(seed, streams.INIT),
                               plateau_tx=plateau_tx, ema_decay=program.ema_decay,
                               hparams=hparams or None)
    if any(name in SWEPT_BY_OPTIMIZER for name in point):
        state = state.replace(opt_state=with_hyperparams(state.opt_state, point))
    return state


def seed_members(cfg: TrainConfig, labels_N: np.ndarray, seeds: list[int],
                 points: list[dict[str, float | int]] | None = None):
    """The M members of a run of several seeds, or of a sweep, before training (`train.py
    --seeds`, `--sweep` and the seed timing of benchmarks/ share it): each member's (train,
    validation) indices into the training images, drawn from its split seed (its config's
    `split_seed`: its own seed, or `cfg.val_seed` for all; stratified per class, so every
    member's split has the same sizes); their initial states stacked, a
    leading axis M on every leaf, each holding its grid point's values (`points`, one per
    member, of `cfg.grid()`'s fields; none without a sweep); the steps per epoch. The
    first member alone is checked (one batch fits its split, all M fit in memory:
    `check_members_fit`) before the others are built."""
    points = points or [{} for _ in seeds]
    drawn: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    first = member_splits(cfg, labels_N, seeds[:1], drawn)[0]
    n_train, n_val = len(first[0]), 0 if first[1] is None else len(first[1])
    _check_one_batch_fits(cfg, len(labels_N), n_train, n_val)
    steps_per_epoch = n_train // cfg.batch_size
    # One model and optimizer object for all: the stacked states' static fields must match.
    initial_state = functools.partial(member_state, cfg,
                                      member_optimizers(cfg, steps_per_epoch))

    check_members_fit(cfg, len(seeds), jax.eval_shape(lambda: initial_state(seeds[0],
                                                                            points[0])),
                      len(labels_N))
    splits = member_splits(cfg, labels_N, seeds, drawn)
    state_M = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *[
        initial_state(seed, point) for seed, point in zip(seeds, points)])
    return splits, state_M, steps_per_epoch


def member_splits(cfg: TrainConfig, labels_N: np.ndarray, seeds: list[int],
                  drawn: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = None,
                  ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The (train, validation) indices into the training images (`data.train_val_indices`)
    of `cfg`'s member of each of `seeds`, drawn from the member's `split_seed`: its own
    seed, or `cfg.val_seed` for all. Members of one split seed share one pair of arrays;
    `drawn` holds the splits drawn so far by split seed, and is filled in."""
    drawn = {} if drawn is None else drawn
    splits = []
    for seed in seeds:
        split_seed = dataclasses.replace(cfg, seed=seed).split_seed
        if split_seed not in drawn:
            drawn[split_seed] = data.train_val_indices(labels_N, cfg.val_fraction, split_seed)
        splits.append(drawn[split_seed])
    return splits


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_members_fit(cfg: TrainConfig, members: int, one_state: TrainState,
                      n_images: int) -> None:
    """FmnistError unless `members` states shaped as `one_state` (a jax.eval_shape) and
    their splits of `n_images` fit this machine's memory, estimated from below: each state
    is held about four times (the member's own while they are stacked, the stacked copy, the
    new one an epoch computes, and the copy on the host each checkpoint reads), and each
    split as 16 bytes an image (the host's int64 indices, the device's int32 copy, an
    epoch's shuffled order)."""
    state_bytes = sum(leaf.size * leaf.dtype.itemsize
                      for leaf in jax.tree_util.tree_leaves(one_state))
    per_member = 4 * state_bytes + 16 * n_images
    available = host_memory_bytes()
    if members * per_member > available:
        raise FmnistError(
            f"--seeds {members} of {cfg.model} need about "
            f"{members * per_member / 2**30:.1f} GiB (their weights, optimizer states and "
            f"splits), more than this machine's {available / 2**30:.1f} GiB of memory: pass "
            f"--seeds {max(1, available // per_member)} or fewer, and the other seeds in "
            f"another run with --seed")


def set_up_seeds(cfg: TrainConfig, run: folder.Claim, train: data.Split, test: data.Split,
                 log_fn: Callable[[str], Any]) -> tuple[TrainState, SeedModels]:
    """`set_up_one` for the M members of a run of several seeds: each its own validation
    split (indices into the one copy of the training images on the device), normalization
    and initial state (stacked: a leading axis M on every leaf), all compiled as one
    program."""
    member_cfgs = [member.config for member in run.members]
    splits, state_M, steps_per_epoch = seed_members(
        cfg, train.labels_N, [member.seed for member in member_cfgs],
        [member_point(cfg, member) for member in member_cfgs])
    n_train, n_val = len(splits[0][0]), 0 if splits[0][1] is None else len(splits[0][1])
    _log_config(cfg, log_fn)
    if run.resumed:  # the epochs left need the images the run started with
        for member in run.members:
            folder.check_data(member.path, train, test)
    folder.save_data_fingerprints([member.path for member in run.members], train, test)
    norm_of: dict[int, data.Normalization] = {}  # one per split
    for member, (train_idx, _) in zip(member_cfgs, splits):
        if member.split_seed not in norm_of:
            norm_of[member.split_seed] = data.normalization_for(
                cfg.normalization, train.images_NxHxWx1[train_idx])
    norms = [norm_of[member.split_seed] for member in member_cfgs]
    for member, norm in zip(run.members, norms):
        folder.save_normalization(member.path, norm)
    norm_M = data.Normalization(*(np.asarray(values, np.float32) for values in zip(*norms)))
    train_xy = jax.device_put((train.images_NxHxWx1, train.labels_N))
    eval_sets = {"test": (*jax.device_put((test.images_NxHxWx1, test.labels_N)), None)}
    if n_val:
        val_idx_MxQ = jax.device_put(np.stack([val_idx for _, val_idx in splits]).astype(np.int32))
        eval_sets = {"val": (*train_xy, val_idx_MxQ), **eval_sets}
    seeds = (f"{cfg.seeds} seed{'s' if cfg.seeds > 1 else ''} ({cfg.seed}.."
             f"{cfg.seed + cfg.seeds - 1})" + (
                 "" if not n_val else
                 ", each with its own validation split" if cfg.val_seed is None else
                 f", all holding out the validation split of seed {cfg.val_seed}"))
    log_fn(f"images: {n_train} train, {n_val} validation (held out), {len(test)} test; "
           + (f"{len(cfg.points())} grid points x {seeds}" if cfg.sweep else seeds))
    taught = _teacher(cfg, train, test, log_fn, val_of={  # the members index the whole set
        member.split_seed: val_idx for member, (_, val_idx) in zip(member_cfgs, splits)
        if val_idx is not None})
    compiled = CompiledSeedEpochs(
        state_M, train_xy,
        jax.device_put(np.stack([train_idx for train_idx, _ in splits]).astype(np.int32)),
        eval_sets, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        norm_M=norm_M, key_M=jnp.stack([streams.epoch_shuffle_key(member.seed, 1)
                                        for member in member_cfgs]),
        active_M=jnp.ones(len(member_cfgs), bool), options=step_options(program_config(cfg)),
        **taught)
    log_fn(f"compiled train epoch and eval of {len(member_cfgs)} models in "
           f"{compiled.compile_seconds:.2f} s ({steps_per_epoch} steps of {cfg.batch_size} "
           f"per epoch)")
    lr_fn_of = functools.cache(lambda peak: make_lr_schedule(cfg, steps_per_epoch, peak))
    return state_M, SeedModels(compiled, [lr_fn_of(member.learning_rate)
                                          for member in member_cfgs])
