"""The JAX side's randomness, reproduced on the host so torch can train on the same batches.

`steps.train_epoch` shuffles with `perm_key, step_key = jax.random.split(key)` and takes
`jax.random.permutation(perm_key, n)[: steps * batch].reshape(steps, batch)`; a run gives
epoch e (1-based) the key `streams.epoch_shuffle_key(seed, e)` and initializes from
`streams.stream_key(seed, streams.INIT)`. The helpers below repeat exactly that, so a
head-to-head run can start torch from the JAX init and feed it the JAX batches.
Only jax is needed here: no torch.
"""

from __future__ import annotations

import jax
import numpy as np

from fmnist_jax import streams
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.steps import init_params


def jax_epoch_batch_order(key: jax.Array, n: int, batch_size: int) -> np.ndarray:
    """The (steps, batch_size) example indices `steps.train_epoch(..., key, batch_size=...)`
    trains on, batch by batch, for a split of `n` examples (the n % batch_size left over are
    skipped, as there)."""
    if batch_size < 1 or n < batch_size:
        raise FmnistError(f"batch size {batch_size} does not fit {n} examples: "
                          f"need 1 <= batch size <= n")
    steps = n // batch_size
    perm_key, _ = jax.random.split(key)  # the second half feeds the step keys, not the order
    order_N = jax.random.permutation(perm_key, n)
    return np.asarray(order_N[: steps * batch_size]).reshape(steps, batch_size).astype(np.int64)


def run_epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """The (steps, batch_size) batch order of epoch `epoch` (1-based) of a run with `seed`."""
    return jax_epoch_batch_order(streams.epoch_shuffle_key(seed, epoch), n, batch_size)


def run_init_params(seed: int, model: str = "lenet5") -> dict:
    """The initial params of a run with this seed, as a plain nested dict; give them to
    `exchange.flax_to_torch_state_dict(params, model)` to start torch from the same init."""
    return init_params(get_model(model), streams.stream_key(seed, streams.INIT))
