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
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState  # step, apply_fn, params, tx, opt_state

from fmnist_jax.data import Normalization
from fmnist_jax.models import NUM_CLASSES


class Sums(NamedTuple):
    """Sums over examples; the host divides once (so a partial batch counts exactly)."""

    loss: jax.Array  # sum of per-example cross-entropy
    correct: jax.Array  # number of correct top-1 predictions
    count: jax.Array  # number of examples


def normalize(images_BxHxWx1: jax.Array, norm: Normalization) -> jax.Array:
    return (images_BxHxWx1.astype(jnp.float32) / 255.0 - norm.mean) / norm.std


@functools.partial(jax.jit, static_argnums=0)
def init_params(model: nn.Module, key: jax.Array):
    """`model`'s initial parameters from `key` (traced on a dummy (1, 28, 28, 1) batch).

    Jitted, once per model (modules are hashable): run eagerly, init compiles every small
    op on its own, which takes seconds on CPU.
    """
    return model.init(key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       key: jax.Array) -> TrainState:
    """A fresh TrainState: `model`'s parameters initialized from `key`, and `tx`'s state."""
    return TrainState.create(apply_fn=model.apply, params=init_params(model, key), tx=tx)


_NO_OPTIMIZER = optax.identity()  # one object: jit caches on the (static) tx's identity


def inference_state(model: nn.Module, params) -> TrainState:
    """A state to evaluate or predict with given parameters (its optimizer does nothing)."""
    return TrainState.create(apply_fn=model.apply, params=params, tx=_NO_OPTIMIZER)


def _loss_and_sums(params, apply_fn, images_BxHxWx1, labels_B, key, norm, train):
    logits_BxC = apply_fn({"params": params}, normalize(images_BxHxWx1, norm), train=train,
                          rngs={"dropout": key})
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
    correct = jnp.sum(jnp.argmax(logits_BxC, axis=-1) == labels_B)
    sums = Sums(loss=jnp.sum(losses_B), correct=correct, count=jnp.asarray(labels_B.shape[0]))
    return jnp.mean(losses_B), sums


def train_step(state: TrainState, images_BxHxWx1: jax.Array, labels_B: jax.Array,
               key: jax.Array, norm: Normalization) -> tuple[TrainState, Sums]:
    """One optimizer step on the mean cross-entropy of the batch. Pure; jit it yourself or
    use `train_step_jit`. `key` feeds dropout in models that have it."""
    grad_fn = jax.value_and_grad(_loss_and_sums, has_aux=True)
    (_, sums), grads = grad_fn(state.params, state.apply_fn, images_BxHxWx1, labels_B, key,
                               norm, True)
    return state.apply_gradients(grads=grads), sums


def eval_step(state: TrainState, images_BxHxWx1: jax.Array, labels_B: jax.Array,
              mask_B: jax.Array, norm: Normalization) -> Sums:
    """Loss and correct counts summed over the examples where `mask_B` is True."""
    logits_BxC = predict_logits_step(state, images_BxHxWx1, norm)
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
    hits_B = jnp.argmax(logits_BxC, axis=-1) == labels_B
    return Sums(loss=jnp.sum(jnp.where(mask_B, losses_B, 0.0)),
                correct=jnp.sum(hits_B & mask_B), count=jnp.sum(mask_B))


def predict_logits_step(state: TrainState, images_BxHxWx1: jax.Array,
                        norm: Normalization) -> jax.Array:
    """Logits (B, 10) in evaluation mode."""
    return state.apply_fn({"params": state.params}, normalize(images_BxHxWx1, norm), train=False)


train_step_jit = jax.jit(train_step, donate_argnums=0)
eval_step_jit = jax.jit(eval_step)


@functools.partial(jax.jit, static_argnames="batch_size", donate_argnums=0)
def train_epoch(state: TrainState, images_NxHxWx1: jax.Array, labels_N: jax.Array,
                key: jax.Array, *, batch_size: int,
                norm: Normalization) -> tuple[TrainState, Sums]:
    """One epoch: shuffle with `key`, then every full batch as one `lax.scan` of `train_step`.

    The N % batch_size examples left over by the shuffle are skipped this epoch (fixed
    shapes, no retracing); a new shuffle picks others next epoch. Returns summed metrics.
    """
    n = labels_N.shape[0]
    steps = n // batch_size
    perm_key, step_key = jax.random.split(key)
    batches_SxB = jax.random.permutation(perm_key, n)[: steps * batch_size].reshape(steps, batch_size)

    def body(state, xs):
        idx_B, key = xs
        return train_step(state, images_NxHxWx1[idx_B], labels_N[idx_B], key, norm)

    state, sums_S = jax.lax.scan(body, state, (batches_SxB, jax.random.split(step_key, steps)))
    return state, jax.tree_util.tree_map(jnp.sum, sums_S)


def _padded_batches(array: jax.Array, batch_size: int) -> jax.Array:
    """(N, ...) -> (S, B, ...) with S = ceil(N / B) and B = batch_size, zero-padded at the end."""
    n = array.shape[0]
    pad = -n % batch_size
    padded = jnp.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1))
    return padded.reshape((n + pad) // batch_size, batch_size, *array.shape[1:])


@functools.partial(jax.jit, static_argnames="batch_size")
def evaluate(state: TrainState, images_NxHxWx1: jax.Array, labels_N: jax.Array, *,
             batch_size: int, norm: Normalization) -> Sums:
    """Summed loss and correct count over all N examples: the last batch is padded and masked."""
    mask_N = jnp.ones(labels_N.shape, bool)
    xs = tuple(_padded_batches(a, batch_size) for a in (images_NxHxWx1, labels_N, mask_N))
    _, sums_S = jax.lax.scan(lambda c, b: (c, eval_step(state, *b, norm)), None, xs)
    return jax.tree_util.tree_map(jnp.sum, sums_S)


@functools.partial(jax.jit, static_argnames="batch_size")
def predict_logits(state: TrainState, images_NxHxWx1: jax.Array, *, batch_size: int,
                   norm: Normalization) -> jax.Array:
    """Logits (N, 10) for all N images, computed batch by batch."""
    n = images_NxHxWx1.shape[0]
    batches = _padded_batches(images_NxHxWx1, batch_size)
    _, logits_SxBxC = jax.lax.scan(lambda c, b: (c, predict_logits_step(state, b, norm)),
                                   None, batches)
    return logits_SxBxC.reshape(-1, NUM_CLASSES)[:n]
