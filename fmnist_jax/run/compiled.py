"""A run's epoch and evaluations, compiled once ahead of time and timed: shared by the
training loop and the bench, so both measure the same thing the same way.

Compilation (`lower(...).compile()`) is timed apart from the epochs; every epoch's clock stops
after `block_until_ready` on its metrics, so the time is the device's work, not its dispatch.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from fmnist_jax.augment import Augment
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.data import Normalization
from fmnist_jax.run.parallel import DataParallel, check_batch_sizes, data_parallel
from fmnist_jax.seeds import evaluate_seeds, gather_members, train_epoch_seeds
from fmnist_jax.steps import (StepOptions, Sums, TrainState, evaluate, evaluation_state,
                              train_epoch)


def step_options(cfg: TrainConfig) -> StepOptions:
    """The static options of `cfg`'s training step: label smoothing, augmentation, mixing,
    and the distillation's weight and temperature."""
    return StepOptions(
        label_smoothing=cfg.label_smoothing, distill_weight=cfg.distill_weight,
        distill_temperature=cfg.distill_temperature, mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        augment=Augment(rotation_degrees=cfg.rotation_degrees, flip_prob=cfg.flip_prob,
                        translate_fraction=cfg.translate_fraction,
                        crop_padding=cfg.crop_padding, erasing_prob=cfg.erasing_prob))


class CompiledEpochs:
    """`train_epoch` on one training set and `evaluate` on named eval sets, all on the device.

    `train_xy` and each of `eval_sets` are (images_NxHxWx1, labels_N) arrays, on the host or
    on a device (and `teacher_NxC` a teacher's log-probabilities of the training images, or
    `teachers` the teachers run in each step, or neither): they are replicated over
    `parallel`'s mesh (default: every device, see `parallel`), and each batch is split over
    its devices. The batch sizes must be multiples of the device count
    (`parallel.check_batch_sizes`). States passed in are replicated there too, so a state
    restored from a checkpoint can be given as it is.
    """

    def __init__(self, state: TrainState, train_xy, eval_sets: dict[str, tuple], *,
                 batch_size: int, eval_batch_size: int, norm: Normalization, key: jax.Array,
                 options: StepOptions = StepOptions(),
                 parallel: DataParallel | None = None, teacher_NxC=None, teachers=None):
        self.parallel = parallel or data_parallel()
        check_batch_sizes(batch_size, eval_batch_size, self.parallel.num_devices)
        place = self.parallel.replicate
        self.train_xy, self.norm = place(train_xy), norm
        self.teacher = {"teacher_NxC": place(teacher_NxC), "teachers": place(teachers)}
        self.eval_sets = {name: place(xy) for name, xy in eval_sets.items()}
        state, key = place((state, key))
        sharding = self.parallel.batch_sharding
        t0 = time.perf_counter()
        self._epoch_fn = train_epoch.lower(state, *self.train_xy, key, batch_size=batch_size,
                                           norm=norm, options=options,
                                           batch_sharding=sharding,
                                           **self.teacher).compile()
        self._eval_fns = {name: evaluate.lower(state, *xy, batch_size=eval_batch_size,
                                               norm=norm, batch_sharding=sharding).compile()
                          for name, xy in self.eval_sets.items()}
        self.compile_seconds = time.perf_counter() - t0

    def train(self, state: TrainState, key: jax.Array) -> tuple[TrainState, Sums, float]:
        """One epoch shuffled by `key`: (new state, summed train metrics, seconds).

        `state` is donated: use only the returned one afterwards.
        """
        state, key = self.parallel.replicate((state, key))  # a no-op once it is
        t0 = time.perf_counter()
        state, sums = self._epoch_fn(state, *self.train_xy, key, norm=self.norm,
                                     **self.teacher)
        jax.block_until_ready(sums)
        return state, sums, time.perf_counter() - t0

    def evaluate(self, state: TrainState, name: str) -> Sums:
        """Summed loss and correct count over every image of the eval set `name` (on device),
        with the weights' moving average when `state` keeps one."""
        return self._eval_fns[name](self.parallel.replicate(evaluation_state(state)),
                                    *self.eval_sets[name], norm=self.norm)


class CompiledSeedEpochs:
    """`CompiledEpochs` for M models at once (`--seeds`): `train_epoch_seeds` and
    `evaluate_seeds`, one program each under `jax.vmap`, the images on the device once.

    `train_xy` is the shared (images_NxHxWx1, labels_N); `train_idx_MxQ` each member's
    training examples in it. Each of `eval_sets` is (images, labels, idx_MxQ or None: every
    member evaluates every image). `norm_M` has one mean and std per member. As in
    `CompiledEpochs`, everything is replicated over `parallel`'s mesh (default: every
    device, in `parallel.seed_groups` groups for M members); inside the programs the members
    are shared out to the mesh's groups of devices (run in lockstep or one after another as
    `parallel.members_at_once` says), and each member's batches are split over the devices
    of its group. With several groups, each program leaves its results with the groups and a
    small program of its own gathers them once all are done (`seeds.gather_members` says
    why).
    """

    def __init__(self, state_M: TrainState, train_xy, train_idx_MxQ: jax.Array,
                 eval_sets: dict[str, tuple], *, batch_size: int, eval_batch_size: int,
                 norm_M: Normalization, key_M: jax.Array, active_M: jax.Array,
                 options: StepOptions = StepOptions(),
                 parallel: DataParallel | None = None, teacher_NxC=None, teachers=None):
        members = len(active_M)
        self.parallel = parallel or data_parallel(members=members)
        check_batch_sizes(batch_size, eval_batch_size, self.parallel.num_devices, members)
        place = self.parallel.replicate
        self.train_xy, self.train_idx_MxQ = place(train_xy), place(train_idx_MxQ)
        self.teacher = {"teacher_NxC": place(teacher_NxC), "teachers": place(teachers)}
        # Name by name: a tree_map over the dict would sort its names, and the history's
        # columns follow this order.
        self.eval_sets = {name: place(data) for name, data in eval_sets.items()}
        self.norm_M = place(norm_M)
        state_M, key_M, active_M = place((state_M, key_M, active_M))
        gather = self.parallel.seed_groups == 1  # one group: the results are whole already
        shardings = {"batch_sharding": self.parallel.batch_sharding,
                     "member_sharding": self.parallel.member_sharding,
                     "members_at_once": self.parallel.members_at_once, "gather": gather}
        t0 = time.perf_counter()
        self._epoch_fn = train_epoch_seeds.lower(
            state_M, *self.train_xy, self.train_idx_MxQ, key_M, active_M,
            batch_size=batch_size, norm_M=self.norm_M, options=options,
            **self.teacher, **shardings).compile()
        self._eval_fns = {name: evaluate_seeds.lower(state_M, *data, active_M,
                                                     batch_size=eval_batch_size,
                                                     norm_M=self.norm_M, **shardings).compile()
                          for name, data in self.eval_sets.items()}
        self._gather_fn = None
        if not gather:
            gather_fn = jax.jit(gather_members, static_argnums=(1, 2))
            self._gather_fn = {
                fn: gather_fn.lower(fn.out_info, members, self.parallel.mesh).compile()
                for fn in (self._epoch_fn, *self._eval_fns.values())}
        self.compile_seconds = time.perf_counter() - t0

    def train(self, state_M: TrainState, key_M: jax.Array,
              active_M: jax.Array) -> tuple[TrainState, Sums, float]:
        """One epoch of every member (member m shuffled by `key_M[m]`; those False in
        `active_M` keep their state): (new states, sums of shape (M,), seconds). `state_M`
        is donated."""
        state_M, key_M, active_M = self.parallel.replicate((state_M, key_M, active_M))
        t0 = time.perf_counter()
        state_M, sums = self._gathered(self._epoch_fn, self._epoch_fn(
            state_M, *self.train_xy, self.train_idx_MxQ, key_M, active_M, norm_M=self.norm_M,
            **self.teacher))
        jax.block_until_ready(sums)
        return state_M, sums, time.perf_counter() - t0

    def evaluate(self, state_M: TrainState, name: str,
                 active_M: jax.Array | None = None) -> Sums:
        """Each member's summed loss and correct count on the eval set `name` (shape (M,)),
        with the weights' moving averages when the states keep them; zeros for a member
        False in `active_M` (default: every member evaluated)."""
        if active_M is None:
            active_M = jnp.ones(self.norm_M.mean.shape, bool)
        fn = self._eval_fns[name]
        state_M, active_M = self.parallel.replicate((evaluation_state(state_M), active_M))
        return self._gathered(fn, fn(state_M, *self.eval_sets[name], active_M,
                                     norm_M=self.norm_M))

    def _gathered(self, fn, out):
        """`fn`'s outputs `out`, gathered whole on every device once they are ready (with
        several groups; see `seeds.gather_members`)."""
        if self._gather_fn is None:
            return out
        return self._gather_fn[fn](jax.block_until_ready(out))


def rates(sums: Sums) -> tuple[float, float]:
    """(mean loss, accuracy) from device sums: the host reads them once and divides."""
    loss, correct, count = (float(x) for x in jax.device_get(sums))
    return loss / count, correct / count
