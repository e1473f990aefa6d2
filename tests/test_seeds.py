"""--seeds: M models under jax.vmap, each equal to the single run of its seed."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fmnist_jax import runs, streams
from fmnist_jax.config import get_config
from fmnist_jax.data import HALF, Normalization, train_val_indices
from fmnist_jax.errors import FmnistError
from fmnist_jax.metrics import mean_and_interval
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_optimizer
from fmnist_jax.steps import (create_train_state, evaluate, evaluate_seeds, train_epoch,
                              train_epoch_seeds)
from tests.helpers import make_split, one_error_line, run_script, train_quietly


def _largest_difference(tree_a, tree_b) -> float:
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(jax.tree_util.tree_leaves(tree_a), jax.tree_util.tree_leaves(tree_b)))


def test_a_member_of_the_vmapped_epoch_is_its_own_single_epoch():
    """Two LeNet-5 members, each on its own split of one shared image set: the active one
    trains as `train_epoch` on its images would, the stopped one keeps its state exactly, and
    `evaluate_seeds` on each member's validation indices is `evaluate` on those images."""
    train = make_split(256, seed=0)
    seeds = [4, 5]
    splits = [train_val_indices(train.labels_N, 0.25, seed) for seed in seeds]
    model, tx = get_model("lenet5"), make_optimizer(get_config(), 6)
    states = [create_train_state(model, tx, streams.stream_key(seed, streams.INIT))
              for seed in seeds]
    state_M = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)
    init_1 = jax.device_get(states[1].params)
    norm_M = Normalization(np.full(2, 0.5, np.float32), np.full(2, 0.5, np.float32))
    key_M = jnp.stack([streams.epoch_shuffle_key(seed, 1) for seed in seeds])
    state_M, sums_M = train_epoch_seeds(
        state_M, train.images_NxHxWx1, train.labels_N,
        np.stack([t for t, _ in splits]).astype(np.int32), key_M, np.array([True, False]),
        batch_size=32, norm_M=norm_M)
    val_sums_M = evaluate_seeds(state_M, train.images_NxHxWx1, train.labels_N,
                                np.stack([v for _, v in splits]).astype(np.int32),
                                batch_size=50, norm_M=norm_M)

    train_idx, val_idx = splits[0]
    single, sums = train_epoch(states[0], train.images_NxHxWx1[train_idx],
                               train.labels_N[train_idx], streams.epoch_shuffle_key(4, 1),
                               batch_size=32, norm=HALF)
    member_0 = jax.tree_util.tree_map(lambda leaf: leaf[0], state_M)
    print(f"largest parameter difference: {_largest_difference(member_0.params, single.params)}")
    chex.assert_trees_all_close(member_0.params, single.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(member_0.opt_state, single.opt_state, rtol=1e-5, atol=1e-6)
    assert int(member_0.step) == int(single.step) == len(train_idx) // 32
    assert int(sums_M.correct[0]) == int(sums.correct)
    np.testing.assert_allclose(float(sums_M.loss[0]), float(sums.loss), rtol=1e-5)
    val = evaluate(single, train.images_NxHxWx1[val_idx], train.labels_N[val_idx],
                   batch_size=50, norm=HALF)
    assert int(val_sums_M.count[0]) == int(val.count) == len(val_idx)
    np.testing.assert_allclose(float(val_sums_M.loss[0]), float(val.loss), rtol=1e-5)
    # The stopped member: not one bit changed, step included.
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           jax.tree_util.tree_map(lambda leaf: leaf[1], state_M.params), init_1)
    assert int(state_M.step[1]) == 0
