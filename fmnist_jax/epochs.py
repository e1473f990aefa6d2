"""A run's epoch and evaluations, compiled once ahead of time and timed: shared by the
training loop and the bench, so both measure the same thing the same way.

Compilation (`lower(...).compile()`) is timed apart from the epochs; every epoch's clock stops
after `block_until_ready` on its metrics, so the time is the device's work, not its dispatch.
"""

from __future__ import annotations

import time

import jax

from fmnist_jax.augment import Augment
from fmnist_jax.config import TrainConfig
from fmnist_jax.data import Normalization
from fmnist_jax.steps import (StepOptions, Sums, TrainState, evaluate, evaluation_state,
                              train_epoch)


def step_options(cfg: TrainConfig) -> StepOptions:
    """The static options of `cfg`'s training step: label smoothing and augmentation."""
    return StepOptions(
        label_smoothing=cfg.label_smoothing,
        augment=Augment(rotation_degrees=cfg.rotation_degrees, flip_prob=cfg.flip_prob,
                        translate_fraction=cfg.translate_fraction,
                        crop_padding=cfg.crop_padding, erasing_prob=cfg.erasing_prob))


class CompiledEpochs:
    """`train_epoch` on one training set and `evaluate` on named eval sets, all on the device.

    `train_xy` and each of `eval_sets` are (images_NxHxWx1, labels_N) device arrays.
    """

    def __init__(self, state: TrainState, train_xy, eval_sets: dict[str, tuple], *,
                 batch_size: int, eval_batch_size: int, norm: Normalization, key: jax.Array,
                 options: StepOptions = StepOptions()):
        self.train_xy, self.eval_sets, self.norm = train_xy, eval_sets, norm
        t0 = time.perf_counter()
        self._epoch_fn = train_epoch.lower(state, *train_xy, key, batch_size=batch_size,
                                           norm=norm, options=options).compile()
        self._eval_fns = {name: evaluate.lower(state, *xy, batch_size=eval_batch_size,
                                               norm=norm).compile()
                          for name, xy in eval_sets.items()}
        self.compile_seconds = time.perf_counter() - t0

    def train(self, state: TrainState, key: jax.Array) -> tuple[TrainState, Sums, float]:
        """One epoch shuffled by `key`: (new state, summed train metrics, seconds).

        `state` is donated: use only the returned one afterwards.
        """
        t0 = time.perf_counter()
        state, sums = self._epoch_fn(state, *self.train_xy, key, norm=self.norm)
        jax.block_until_ready(sums)
        return state, sums, time.perf_counter() - t0

    def evaluate(self, state: TrainState, name: str) -> Sums:
        """Summed loss and correct count over every image of the eval set `name` (on device),
        with the weights' moving average when `state` keeps one."""
        return self._eval_fns[name](evaluation_state(state), *self.eval_sets[name], norm=self.norm)


def rates(sums: Sums) -> tuple[float, float]:
    """(mean loss, accuracy) from device sums: the host reads them once and divides."""
    loss, correct, count = (float(x) for x in jax.device_get(sums))
    return loss / count, correct / count
