"""The optimizer of a config: optax Adam or AdamW, warmup and decay, optional clipping."""

from __future__ import annotations

from typing import TYPE_CHECKING

import optax

if TYPE_CHECKING:  # config imports the names below; the type is only for annotations
    from fmnist_jax.config import TrainConfig

OPTIMIZERS = ("adam", "adamw")
DECAYS = ("constant", "cosine")


def make_lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_epochs`, then constant or cosine decay to 0.

    The cosine's `decay_steps` counts the warmup too (optax's convention), so the rate
    reaches 0 exactly at the last step of the last epoch.
    """
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)
    if warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup_steps),
         optax.constant_schedule(cfg.learning_rate)], boundaries=[warmup_steps])


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The config's optimizer, with clipping by global norm first when `clip_norm` is set."""
    lr_fn = make_lr_schedule(cfg, steps_per_epoch)
    if cfg.optimizer == "adamw":
        tx = optax.adamw(lr_fn, weight_decay=cfg.weight_decay)
    else:
        tx = optax.adam(lr_fn)
    if cfg.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
