"""The optimizer of a config: optax Adam, AdamW, SGD with momentum or Nesterov momentum; a
learning-rate schedule (warmup, then constant, cosine, or reduce-on-plateau); clipping."""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "sgd", "nesterov")
DECAYS = ("constant", "cosine", "plateau")
DECAYING_OPTIMIZERS = ("adamw",)  # the ones that use weight_decay
MOMENTUM_OPTIMIZERS = ("sgd", "nesterov")  # the ones that use momentum
DECAYED_PARAMS = ("kernels", "all")  # which parameters weight decay shrinks (decay_mask)
PLATEAU_RTOL = 1e-4  # an epoch improves when val loss < (1 - rtol) * best: torch's threshold


class OptimizerSpec(Protocol):
    """What the functions here read: any object with these fields (a run's `TrainConfig` is one)."""

    optimizer: str
    learning_rate: float
    weight_decay: float
    weight_decay_params: str
    momentum: float
    warmup_epochs: float
    decay: str
    plateau_factor: float
    plateau_patience: int
    clip_norm: float | None
    epochs: int


def make_lr_schedule(cfg: OptimizerSpec, steps_per_epoch: int,
                     peak: float | jax.Array | None = None) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_epochs`, then constant or cosine decay to 0.

    The cosine's `decay_steps` counts the warmup too (optax's convention), so the rate
    reaches 0 exactly at the last step of the last epoch. "plateau" is constant here: its
    reductions are `make_plateau`'s, applied once per epoch on the validation loss.
    `peak` (an array in a sweep) replaces `cfg.learning_rate`.
    """
    peak = cfg.learning_rate if peak is None else peak
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.decay == "cosine":
        # optax.warmup_cosine_decay_schedule(0, peak, warmup, decay, end_value=0) written
        # out: it asks `peak == 0` in Python, which an array peak (a sweep's) cannot answer.
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup_steps),
             optax.cosine_decay_schedule(peak, max(total_steps, warmup_steps + 1)
                                         - warmup_steps, alpha=0.0)], [warmup_steps])
    if warmup_steps == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps),
         optax.constant_schedule(peak)], boundaries=[warmup_steps])


def decay_mask(params):
    """True for the weights that weight decay shrinks: dense and conv kernels (more than one
    dimension). Biases and BatchNorm's scale and bias (one dimension) are left alone."""
    return jax.tree_util.tree_map(lambda leaf: leaf.ndim > 1, params)


SWEPT_BY_OPTIMIZER = ("learning_rate", "weight_decay")  # the fields kept in its state in a sweep


def make_optimizer(cfg: OptimizerSpec, steps_per_epoch: int,
                   swept: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """The config's optimizer, with clipping by global norm first when `clip_norm` is set.

    `swept` (names of SWEPT_BY_OPTIMIZER): those values become arrays in the optimizer's
    state (`optax.inject_hyperparams`, `opt_state.hyperparams`), so the members of a sweep,
    stacked, each carry their own: set them with `with_hyperparams`. Only those are
    injected: Adam's b1, b2 and eps injected as float32 arrays would change its arithmetic
    from the plain optimizer's (optax#1532, optax#583), and a sweep's member would no longer
    equal the single run of its point.
    """
    swept = tuple(name for name in SWEPT_BY_OPTIMIZER if name in swept)
    if not swept:
        return _optimizer(cfg, steps_per_epoch, cfg.learning_rate, cfg.weight_decay)

    # Named parameters: inject_hyperparams finds the hyperparameters in the signature.
    def injected(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay):
        return _optimizer(cfg, steps_per_epoch, learning_rate, weight_decay)

    return optax.inject_hyperparams(injected)(**{name: getattr(cfg, name) for name in swept})


def with_hyperparams(opt_state, values: dict[str, float]):
    """`opt_state` of `make_optimizer(..., swept)` holding `values` (of the swept fields;
    others are ignored) in place of its own."""
    hyperparams = dict(opt_state.hyperparams)
    for name in hyperparams:
        if name in values:
            hyperparams[name] = jnp.asarray(values[name], hyperparams[name].dtype)
    return opt_state._replace(hyperparams=hyperparams)


def _optimizer(cfg: OptimizerSpec, steps_per_epoch: int, peak, weight_decay):
    lr_fn = make_lr_schedule(cfg, steps_per_epoch, peak)
    if cfg.optimizer == "adamw":
        # "all": no mask, every parameter decays, as torch.optim.AdamW(model.parameters()).
        mask = decay_mask if cfg.weight_decay_params == "kernels" else None
        tx = optax.adamw(lr_fn, weight_decay=weight_decay, mask=mask)
    elif cfg.optimizer in ("sgd", "nesterov"):
        tx = optax.sgd(lr_fn, momentum=cfg.momentum or None,
                       nesterov=cfg.optimizer == "nesterov")
    else:
        tx = optax.adam(lr_fn)
    if cfg.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx


def make_plateau(cfg: OptimizerSpec) -> optax.GradientTransformationExtraArgs | None:
    """optax's reduce-on-plateau for `decay="plateau"` (else None), counting as torch's
    ReduceLROnPlateau(mode="min", threshold=1e-4 relative, cooldown 0) does: an epoch
    improves when its validation loss is below (1 - 1e-4) times the best so far; the rate is
    multiplied by `plateau_factor` at the end of the epoch that makes `plateau_patience` + 1
    in a row without improvement (torch tolerates `patience` such epochs, and reduces on the
    next), and the count starts again.

    optax's `patience` is the count at which it reduces (it reduces on the `patience`-th bad
    epoch), hence the + 1: with optax's patience 3 the notebook's rate would fall one epoch
    early.
    """
    if cfg.decay != "plateau":
        return None
    return optax.contrib.reduce_on_plateau(factor=cfg.plateau_factor,
                                           patience=cfg.plateau_patience + 1, rtol=PLATEAU_RTOL)
