"""The pure core: train and eval steps, and a whole epoch as one `lax.scan`.

Every function here takes arrays and state and returns new ones: no printing, no host sync,
no global state; randomness only from the keys passed in. Images arrive as uint8 and are
normalized inside the jitted code, so the data can live on the device as compact uint8.

Use them in your own loop:

    state = create_train_state(get_model("lenet5"), optax.adam(1e-3), key)
    state, sums = train_step(state, images_BxHxWx1, labels_B, key, data.HALF)

Array names end in their shape (`images_BxHxWx1`); the letters are listed in `fmnist_jax`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import NamedSharding

from fmnist_jax.augment import NONE, Augment, Mix, augment_batch, mix_batch
from fmnist_jax.data import Normalization
from fmnist_jax.errors import FmnistError


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, apply_fn, params, tx, opt_state) and what else a step needs.

    - `batch_stats`: BatchNorm's running statistics ({} for models without BatchNorm);
    - `takes_train`: whether the model's `__call__` takes the `train` keyword (see the model
      contract in `create_train_state`);
    - `plateau`: the state of a reduce-on-plateau schedule (None without one), whose `scale`
      multiplies every update; `plateau_update` advances it once per epoch;
    - `ema_params`: an exponential moving average of `params` (None when off), moved by
      `ema_decay` towards the new params after every step: ema <- decay ema + (1 - decay)
      params. It starts at the initial params. `evaluation_state` swaps it in for evaluating.
    - `hparams`: in a sweep (`--sweep`), the member's own values of the swept fields that
      live outside the optimizer (`HPARAMS`: label smoothing, EMA decay, augmentation
      strengths), scalars that replace the step options' values; None otherwise. (The swept
      learning rate and weight decay live in the optimizer's state: `optim.make_optimizer`.)
    """

    batch_stats: Any = struct.field(default_factory=dict)
    takes_train: bool = struct.field(pytree_node=False, default=False)
    plateau_tx: optax.GradientTransformationExtraArgs | None = struct.field(
        pytree_node=False, default=None)
    plateau: Any = None
    ema_decay: float = struct.field(pytree_node=False, default=0.0)
    ema_params: Any = None
    hparams: Any = None

    def hparam(self, name: str, static):
        """The member's own value of `name` in a sweep that varies it, else `static`."""
        return static if self.hparams is None else self.hparams.get(name, static)

    def apply_gradients(self, *, grads, **kwargs) -> TrainState:
        if self.plateau is None:
            new = super().apply_gradients(grads=grads, **kwargs)
        else:
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
            updates = jax.tree_util.tree_map(lambda u: u * self.plateau.scale, updates)
            new = self.replace(step=self.step + 1,
                               params=optax.apply_updates(self.params, updates),
                               opt_state=opt_state, **kwargs)
        if self.ema_params is None:
            return new
        return new.replace(ema_params=optax.incremental_update(
            new.params, self.ema_params, step_size=1.0 - self.hparam("ema_decay", self.ema_decay)))


# The fields a sweep may give each member outside the optimizer: TrainState.hparams' keys.
HPARAMS = ("label_smoothing", "ema_decay", *Augment._fields, "mixup_alpha", "cutmix_alpha")


class StepOptions(NamedTuple):
    """The static parts of a training step: hashable, so jit compiles once per value."""

    label_smoothing: float = 0.0  # targets (1 - a) one-hot + a / classes
    augment: Augment = NONE  # on-device augmentation of each training batch
    # With a teacher (`teacher_BxC` or `teachers` given to the step): the loss is
    # distill_weight times KL(teacher || student) at distill_temperature, times its square,
    # plus (1 - weight) times the cross-entropy.
    distill_weight: float = 0.5
    distill_temperature: float = 4.0
    # Mixing each batch's images in pairs, and their targets likewise (`augment.mix_batch`),
    # after the augmentation; 0: off.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @property
    def mixing(self) -> bool:
        return bool(self.mixup_alpha or self.cutmix_alpha)


# `train_step` draws its mixing from fold_in(key, MIX_KEY), leaving the step's key as a step
# without mixing uses it: a sweep's member whose alphas are 0 draws what its single run draws
# (and computes the same up to float rounding: another program).
MIX_KEY = 1


class Sums(NamedTuple):
    """Sums over examples; the host divides once (so a partial batch counts exactly)."""

    loss: jax.Array  # sum of per-example cross-entropy
    correct: jax.Array  # number of correct top-1 predictions
    count: jax.Array  # number of examples


def normalize(images_BxHxWx1: jax.Array, norm: Normalization) -> jax.Array:
    mean, std = norm  # a Normalization, or a plain (mean, std) pair
    return (images_BxHxWx1.astype(jnp.float32) / 255.0 - mean) / std


def check_inputs(images_NxHxWx1, labels_N=None, *, batch_size: int | None = None) -> None:
    """FmnistError naming the fix when the steps' inputs are not what they take: uint8 pixels
    (N, 28, 28, 1), as many integer labels, a batch size of at least 1. It reads shapes and
    dtypes alone, so under jit it runs once, while tracing, and costs nothing after."""
    shape, dtype = jnp.shape(images_NxHxWx1), jnp.result_type(images_NxHxWx1)
    if dtype != jnp.uint8:
        raise FmnistError(f"images must be uint8 pixels 0..255 (the step scales and "
                          f"normalizes them), got {dtype}: pass the raw pixels, not images "
                          f"already scaled to [0, 1] or normalized")
    if len(shape) != 4 or shape[1:] != (28, 28, 1):
        raise FmnistError(f"images must be (N, 28, 28, 1), got shape {shape}: give each "
                          f"28 x 28 image its channel axis (images[..., None])")
    if labels_N is not None:
        if not jnp.issubdtype(jnp.result_type(labels_N), jnp.integer):
            raise FmnistError(f"labels must be integer class indices, got "
                              f"{jnp.result_type(labels_N)}: pass labels.argmax(-1) of one-hot "
                              f"labels")
        if jnp.shape(labels_N) != shape[:1]:
            raise FmnistError(f"{shape[0]} images and labels of shape {jnp.shape(labels_N)}: "
                              f"pass one label per image, shape ({shape[0]},)")
    if batch_size is not None and batch_size < 1:
        raise FmnistError(f"batch size must be at least 1, got {batch_size}")


def takes_train_flag(model: nn.Module) -> bool:
    """Whether `model.__call__` has a `train` parameter (the model contract, below)."""
    return "train" in inspect.signature(model.__call__).parameters


@functools.partial(jax.jit, static_argnums=0)
def init_variables(model: nn.Module, key: jax.Array) -> dict:
    """`model`'s initial variables from `key` ("params", and "batch_stats" if it has
    BatchNorm), traced on a dummy (1, 28, 28, 1) batch in evaluation mode.

    Jitted, once per model (modules are hashable): run eagerly, init compiles every small
    op on its own, which takes seconds on CPU.
    """
    kwargs = {"train": False} if takes_train_flag(model) else {}
    return dict(model.init(key, jnp.zeros((1, 28, 28, 1), jnp.float32), **kwargs))


def init_params(model: nn.Module, key: jax.Array):
    """`model`'s initial parameters from `key` (see `init_variables`)."""
    return init_variables(model, key)["params"]


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array, *,
                       plateau_tx: optax.GradientTransformationExtraArgs | None = None,
                       ema_decay: float = 0.0, hparams: dict | None = None) -> TrainState:
    """A fresh TrainState: `model`'s variables initialized from `key`, and `tx`'s state.

    The model contract: any Flax linen module whose `__call__(x)` maps normalized float images
    (B, 28, 28, 1) to logits (B, classes). Optionally it takes a keyword `train` (True while
    training: dropout on, BatchNorm updating its statistics; False to evaluate), keeps
    BatchNorm statistics in the "batch_stats" collection, and draws dropout from the "dropout"
    rng. `plateau_tx` (optax.contrib.reduce_on_plateau) scales every update by its `scale`.
    `ema_decay` > 0 keeps an exponential moving average of the params (`ema_params`).
    `hparams`: a sweep member's values of HPARAMS fields (see TrainState).

    Build the model and `tx` once and reuse them: the compiled steps are cached on them (a
    new `optax.adam(...)` is a new object, and its first step compiles again).
    """
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            or jnp.shape(key) == (2,) and jnp.result_type(key) == jnp.uint32):
        raise FmnistError(f"key must be a jax.random key, got {key!r}: pass "
                          f"jax.random.key(seed)")
    try:
        hash(model)
    except TypeError as e:  # jit takes the model as a static argument, which must hash
        raise FmnistError(f"the model {type(model).__name__} cannot be hashed, as jit needs: "
                          f"give its fields hashable values (a tuple, not a list)") from e
    variables = init_variables(model, key)
    plateau = None if plateau_tx is None else plateau_tx.init(variables["params"])
    # A copy, not the same buffers: the epoch donates the state, and one buffer cannot be
    # donated twice.
    ema_params = (jax.tree_util.tree_map(jnp.copy, variables["params"]) if ema_decay else None)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}),
                             takes_train=takes_train_flag(model), plateau_tx=plateau_tx,
                             plateau=plateau, ema_decay=ema_decay, ema_params=ema_params,
                             hparams=hparams)


def evaluation_state(state: TrainState) -> TrainState:
    """The state whose params are the ones to evaluate, choose the best epoch by and keep:
    the moving average when the state has one, else the params themselves. (BatchNorm's
    statistics stay the live ones: the average covers the params only.)"""
    return state if state.ema_params is None else state.replace(params=state.ema_params)


_NO_OPTIMIZER = optax.identity()  # one object: jit caches on the (static) tx's identity


def inference_state(model: nn.Module, variables: dict) -> TrainState:
    """A state to evaluate or predict with `variables` ({"params": ...} and "batch_stats" if
    the model has BatchNorm); its optimizer does nothing."""
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=_NO_OPTIMIZER,
                             batch_stats=variables.get("batch_stats", {}),
                             takes_train=takes_train_flag(model))


def _logits(state: TrainState, params, images_BxHxWx1: jax.Array, norm: Normalization, *,
            train: bool, key: jax.Array | None = None):
    """(logits_BxC, batch_stats): the model's forward pass under the model contract. In
    training, BatchNorm statistics come back updated; otherwise they are returned as they were."""
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    kwargs = {"train": train} if state.takes_train else {}
    x_BxHxWx1 = normalize(images_BxHxWx1, norm)
    if train and state.batch_stats:
        logits_BxC, updated = state.apply_fn(variables, x_BxHxWx1, rngs={"dropout": key},
                                             mutable=["batch_stats"], **kwargs)
        return logits_BxC, updated["batch_stats"]
    rngs = {"dropout": key} if train else None
    return state.apply_fn(variables, x_BxHxWx1, rngs=rngs, **kwargs), state.batch_stats


class Teacher(NamedTuple):
    """A teacher run inside the step on the batch the student sees (`train_step`'s
    `teachers`): its state (`inference_state`) and the normalization it was trained with.
    An ordinary pytree argument of the compiled step, shared by every member."""

    state: TrainState
    norm: Normalization


def mean_logprobs(logits_KxBxC: jax.Array, temperature: float) -> jax.Array:
    """(B, C): log of the mean over the K teachers of softmax(logits / temperature), the
    distillation's target. The mean is taken in logs (logsumexp) so that it stays finite
    where a probability underflows to 0."""
    logprobs_KxBxC = jax.nn.log_softmax(logits_KxBxC / temperature)
    return jax.nn.logsumexp(logprobs_KxBxC, axis=0) - jnp.log(logits_KxBxC.shape[0])


def teachers_logprobs(teachers: tuple[Teacher, ...], images_BxHxWx1: jax.Array,
                      temperature: float) -> jax.Array:
    """`mean_logprobs` of `teachers` on `images_BxHxWx1`, each in evaluation mode (no
    dropout, BatchNorm's running statistics) with its own normalization: constants of the
    student's loss (no gradient flows into the teachers)."""
    logits_KxBxC = jnp.stack([predict_logits_step(teacher.state, images_BxHxWx1, teacher.norm)
                              for teacher in teachers])
    return jax.lax.stop_gradient(mean_logprobs(logits_KxBxC, temperature))


def distillation_loss(logits_BxC: jax.Array, teacher_BxC: jax.Array,
                      temperature: float) -> jax.Array:
    """KL(teacher_T || student_T) * T^2 per example: `teacher_BxC` the teacher's
    log-probabilities at temperature T, the student's from `logits_BxC / T`. The T^2 keeps
    its gradient's scale as T changes (Hinton et al., 2015)."""
    student_BxC = jax.nn.log_softmax(logits_BxC / temperature)
    kl_B = jnp.sum(jnp.exp(teacher_BxC) * (teacher_BxC - student_BxC), axis=-1)
    return kl_B * temperature ** 2


def _cross_entropy(logits_BxC, labels_B, state, options: StepOptions) -> jax.Array:
    """Per example, against the labels, smoothed when the options say so."""
    if options.label_smoothing:
        targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BxC.shape[-1]),
                                          state.hparam("label_smoothing",
                                                       options.label_smoothing))
        return optax.softmax_cross_entropy(logits_BxC, targets_BxC)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)


def _loss_and_sums(params, state, images_BxHxWx1, labels_B, key, norm, options: StepOptions,
                   teacher_BxC=None, mix: Mix | None = None):
    logits_BxC, batch_stats = _logits(state, params, images_BxHxWx1, norm, train=True, key=key)
    losses_B = _cross_entropy(logits_BxC, labels_B, state, options)
    if mix is not None:
        partner_labels_B = labels_B[mix.partner_B]
        losses_B = (mix.share * losses_B + (1.0 - mix.share)
                    * _cross_entropy(logits_BxC, partner_labels_B, state, options))
        # A hit is the label with the larger share: the count stays an integer.
        labels_B = jnp.where(mix.share >= 0.5, labels_B, partner_labels_B)
    if teacher_BxC is not None:
        weight = options.distill_weight
        losses_B = (weight * distillation_loss(logits_BxC, teacher_BxC,
                                               options.distill_temperature)
                    + (1 - weight) * losses_B)
    correct = jnp.sum(jnp.argmax(logits_BxC, axis=-1) == labels_B)
    sums = Sums(loss=jnp.sum(losses_B), correct=correct, count=jnp.asarray(labels_B.shape[0]))
    return jnp.mean(losses_B), (sums, batch_stats)


def train_step(state: TrainState, images_BxHxWx1: jax.Array, labels_B: jax.Array,
               key: jax.Array, norm: Normalization,
               options: StepOptions = StepOptions(),
               teacher_BxC: jax.Array | None = None,
               teachers: tuple[Teacher, ...] | None = None) -> tuple[TrainState, Sums]:
    """One optimizer step on the mean cross-entropy of the batch. Pure; jit it yourself or
    use `train_step_jit`. `key` feeds dropout, and augmentation when `options` asks for it
    (images then go through `augment.augment_batch` first). In a sweep, the options say
    which parts run (label smoothing, augmentation) and the state's `hparams` how strong.
    `teacher_BxC`, a teacher's log-probabilities at `options.distill_temperature` for the
    batch's images: the loss mixes in the distillation's KL (`distillation_loss`).
    `teachers`, instead of `teacher_BxC`: the teachers themselves, whose log-probabilities
    (`teachers_logprobs`) are computed on the batch as the student sees it, after its
    augmentation: one forward pass of each teacher per step.
    With mixing on (`options.mixup_alpha`, `cutmix_alpha`), the augmented batch is then
    mixed in pairs (`augment.mix_batch`, from fold_in(key, MIX_KEY)): the loss is the share
    times the cross-entropy against each image's labels plus the rest against its partner's,
    a fixed teacher's probabilities are mixed with the same share, and live teachers see the
    mixed images."""
    check_inputs(images_BxHxWx1, labels_B)
    if options.augment.active:
        key, augment_key = jax.random.split(key)
        augment = options.augment._replace(**{
            name: state.hparam(name, value) for name, value in options.augment._asdict().items()})
        images_BxHxWx1 = augment_batch(images_BxHxWx1, augment_key, augment)
    mix = None
    if options.mixing:
        mix = mix_batch(images_BxHxWx1, jax.random.fold_in(key, MIX_KEY),
                        state.hparam("mixup_alpha", options.mixup_alpha),
                        state.hparam("cutmix_alpha", options.cutmix_alpha))
        images_BxHxWx1 = mix.images_BxHxWx1
        if teacher_BxC is not None:  # probabilities mixed, in logs: log(s p + (1 - s) q)
            teacher_BxC = jnp.logaddexp(jnp.log(mix.share) + teacher_BxC,
                                        jnp.log1p(-mix.share) + teacher_BxC[mix.partner_B])
    if teachers is not None:
        teacher_BxC = teachers_logprobs(teachers, images_BxHxWx1, options.distill_temperature)
    grad_fn = jax.value_and_grad(_loss_and_sums, has_aux=True)
    (_, (sums, batch_stats)), grads = grad_fn(state.params, state, images_BxHxWx1, labels_B,
                                              key, norm, options, teacher_BxC, mix)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), sums


def eval_step(state: TrainState, images_BxHxWx1: jax.Array, labels_B: jax.Array,
              mask_B: jax.Array, norm: Normalization) -> Sums:
    """Loss and correct counts summed over the examples where `mask_B` is True."""
    check_inputs(images_BxHxWx1, labels_B)
    logits_BxC = predict_logits_step(state, images_BxHxWx1, norm)
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
    hits_B = jnp.argmax(logits_BxC, axis=-1) == labels_B
    return Sums(loss=jnp.sum(jnp.where(mask_B, losses_B, 0.0)),
                correct=jnp.sum(hits_B & mask_B), count=jnp.sum(mask_B))


def predict_logits_step(state: TrainState, images_BxHxWx1: jax.Array,
                        norm: Normalization) -> jax.Array:
    """Logits (B, classes) in evaluation mode (dropout off, BatchNorm's running statistics).
    Unchecked, as the teachers see augmented float images through it: `predict_logits`
    checks its uint8 input."""
    return _logits(state, state.params, images_BxHxWx1, norm, train=False)[0]


@jax.jit
def plateau_update(state: TrainState, val_loss: jax.Array) -> TrainState:
    """Advance the reduce-on-plateau schedule by one epoch whose validation loss is
    `val_loss`: after `patience` epochs without improvement its scale shrinks by `factor`."""
    if state.plateau_tx is None:
        raise FmnistError("the state has no plateau schedule to advance: pass "
                          "plateau_tx=optax.contrib.reduce_on_plateau(...) to "
                          "create_train_state")
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    _, plateau = state.plateau_tx.update(zeros, state.plateau, value=val_loss)
    return state.replace(plateau=plateau)


train_step_jit = jax.jit(train_step, donate_argnums=0, static_argnames="options")
eval_step_jit = jax.jit(eval_step)


def split_over_devices(batch, batch_sharding: jax.sharding.Sharding | None):
    """`batch` (arrays with a leading batch axis) constrained to `batch_sharding`: under a
    mesh (see `parallel`), each device computes its slice of the step and XLA adds the
    all-reduces. None (one device): unchanged."""
    if batch_sharding is None:
        return batch
    context = jax.sharding.get_abstract_mesh()
    if not context.empty:  # inside a group of seeds (`seeds.over_members`): its seeds axis manual
        batch_sharding = NamedSharding(context, batch_sharding.spec)
    return jax.lax.with_sharding_constraint(batch, batch_sharding)


@functools.partial(jax.jit, static_argnames=("batch_size", "options", "batch_sharding"),
                   donate_argnums=0)
def train_epoch(state: TrainState, images_NxHxWx1: jax.Array, labels_N: jax.Array,
                key: jax.Array, *, batch_size: int, norm: Normalization,
                options: StepOptions = StepOptions(),
                batch_sharding: jax.sharding.Sharding | None = None,
                teacher_NxC: jax.Array | None = None,
                teachers: tuple[Teacher, ...] | None = None) -> tuple[TrainState, Sums]:
    """One epoch: shuffle with `key`, then every full batch as one `lax.scan` of `train_step`.

    The N % batch_size examples left over by the shuffle are skipped this epoch (fixed
    shapes, no retracing); a new shuffle picks others next epoch. Returns summed metrics.
    `batch_sharding` splits each batch over devices (`parallel.DataParallel`): the same
    numbers within float rounding. `teacher_NxC`: a teacher's log-probabilities for each
    of the N images; or `teachers`, run in every step (see `train_step`).
    """
    return scan_epoch(state, images_NxHxWx1, labels_N, None, key, batch_size, norm, options,
                      batch_sharding, teacher_NxC, teachers)


def scan_epoch(state, images_NxHxWx1, labels_N, idx_Q, key, batch_size, norm, options,
               batch_sharding=None, teacher_NxC=None, teachers=None):
    """`train_epoch` on all N examples (`idx_Q` None), or on the Q examples `idx_Q` of them:
    then the batches, keys and steps are those of `train_epoch` on `images_NxHxWx1[idx_Q]`
    (the shuffle permutes positions in `idx_Q`), without copying those images."""
    check_inputs(images_NxHxWx1, labels_N, batch_size=batch_size)
    n = labels_N.shape[0] if idx_Q is None else idx_Q.shape[0]
    if batch_size > n:
        raise FmnistError(f"batch size {batch_size} is more than the {n} images: an epoch "
                          f"trains full batches only, so it would train on none; pass a batch "
                          f"size of at most {n}")
    steps = n // batch_size
    perm_key, step_key = jax.random.split(key)
    order_SxB = jax.random.permutation(perm_key, n)[: steps * batch_size].reshape(steps,
                                                                               batch_size)
    batches_SxB = order_SxB if idx_Q is None else idx_Q[order_SxB]

    def body(state, xs):
        idx_B, key = xs
        teacher_BxC = None if teacher_NxC is None else teacher_NxC[idx_B]
        images_BxHxWx1, labels_B, teacher_BxC = split_over_devices(
            (images_NxHxWx1[idx_B], labels_N[idx_B], teacher_BxC), batch_sharding)
        return train_step(state, images_BxHxWx1, labels_B, key, norm, options, teacher_BxC,
                          teachers)

    state, sums_S = jax.lax.scan(body, state, (batches_SxB, jax.random.split(step_key, steps)))
    return state, jax.tree_util.tree_map(jnp.sum, sums_S)


def padded_batches(array: jax.Array, batch_size: int) -> jax.Array:
    """(N, ...) -> (S, B, ...) with S = ceil(N / B) and B = batch_size, zero-padded at the end."""
    n = array.shape[0]
    pad = -n % batch_size
    padded = jnp.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1))
    return padded.reshape((n + pad) // batch_size, batch_size, *array.shape[1:])


@functools.partial(jax.jit, static_argnames=("batch_size", "batch_sharding"))
def evaluate(state: TrainState, images_NxHxWx1: jax.Array, labels_N: jax.Array, *,
             batch_size: int, norm: Normalization,
             batch_sharding: jax.sharding.Sharding | None = None) -> Sums:
    """Summed loss and correct count over all N examples: the last batch is padded and masked.
    `batch_sharding` splits each batch over devices, as in `train_epoch`."""
    check_inputs(images_NxHxWx1, labels_N, batch_size=batch_size)
    mask_N = jnp.ones(labels_N.shape, bool)
    xs = tuple(padded_batches(a, batch_size) for a in (images_NxHxWx1, labels_N, mask_N))
    _, sums_S = jax.lax.scan(
        lambda c, b: (c, eval_step(state, *split_over_devices(b, batch_sharding), norm)),
        None, xs)
    return jax.tree_util.tree_map(jnp.sum, sums_S)


@functools.partial(jax.jit, static_argnames="batch_size")
def predict_logits(state: TrainState, images_NxHxWx1: jax.Array, *, batch_size: int,
                   norm: Normalization) -> jax.Array:
    """Logits (N, classes) for all N images, computed batch by batch."""
    check_inputs(images_NxHxWx1, batch_size=batch_size)
    n = images_NxHxWx1.shape[0]
    batches_SxBxHxWx1 = padded_batches(images_NxHxWx1, batch_size)
    _, logits_SxBxC = jax.lax.scan(lambda c, b: (c, predict_logits_step(state, b, norm)),
                                   None, batches_SxBxHxWx1)
    return logits_SxBxC.reshape(-1, logits_SxBxC.shape[-1])[:n]
