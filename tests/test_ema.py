"""The moving average of the weights (`ema_decay`): its arithmetic, that it leaves the training
itself alone, and that a run evaluates and keeps the average when it is on."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax import FmnistError
from fmnist_jax.run import checkpoints
from fmnist_jax.run.presets import get_config
from fmnist_jax.data import HALF
from fmnist_jax.models import get_model
from fmnist_jax.steps import (create_train_state, evaluate, evaluation_state, train_epoch,
                              train_step_jit)
from tests.helpers import SHARED_ADAM, make_split, step_batch, tiny_config
from tests.helpers import train_quietly as _run

_ADAM = optax.adam(1e-2)  # one tx object: jit caches on it


def _state(ema_decay, tx=_ADAM):
    return create_train_state(get_model("lenet5"), tx, jax.random.key(0), ema_decay=ema_decay)


def test_ema_equals_the_hand_computed_average_of_the_steps():
    split = make_split(64)
    images, labels = jnp.asarray(split.images_NxHxWx1), jnp.asarray(split.labels_N)
    decay = 0.75
    state = _state(decay)
    params_by_step = [jax.device_get(state.params)]
    for i in range(3):
        state, _ = train_step_jit(state, images, labels, jax.random.key(i), HALF)
        params_by_step.append(jax.device_get(state.params))
    p0, p1, p2, p3 = params_by_step
    # ema_3 = d^3 p0 + (1 - d) (d^2 p1 + d p2 + p3): it starts at the initial weights.
    expected = jax.tree_util.tree_map(
        lambda a, b, c, d: decay**3 * a + (1 - decay) * (decay**2 * b + decay * c + d),
        p0, p1, p2, p3)
    chex.assert_trees_all_close(state.ema_params, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(state.ema_params["fc3"]["bias"], state.params["fc3"]["bias"])


@pytest.mark.slow
def test_ema_off_keeps_none_and_the_training_is_the_same_with_it_on():
    # The epoch without the average is test_steps' (same optimizer object, model and shapes):
    # it compiles once for both files.
    images, labels = step_batch(200)
    off, off_sums = train_epoch(_state(0.0, SHARED_ADAM), images, labels, jax.random.key(1),
                                batch_size=32, norm=HALF)
    on, on_sums = train_epoch(_state(0.9, SHARED_ADAM), images, labels, jax.random.key(1),
                              batch_size=32, norm=HALF)
    assert off.ema_params is None and evaluation_state(off) is off
    # The average only watches: the weights and metrics of the steps are bit for bit the same.
    chex.assert_trees_all_equal((off.params, off.opt_state, off_sums),
                                (on.params, on.opt_state, on_sums))
    chex.assert_trees_all_equal(evaluation_state(on).params, on.ema_params)


@pytest.mark.slow  # a whole tiny run (its own compiled epochs); the arithmetic above is fast
def test_a_run_with_ema_evaluates_and_keeps_the_average(tmp_path, tiny_splits):
    cfg = dataclasses.replace(tiny_config(), ema_decay=0.9)
    state, history = _run(cfg, tmp_path, tiny_splits)
    variables = checkpoints.load_variables(tmp_path, cfg)  # no val split: the last epoch's
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"],
                           state.ema_params)
    test = tiny_splits[1]
    sums = jax.device_get(evaluate(evaluation_state(state), jnp.asarray(test.images_NxHxWx1),
                                   jnp.asarray(test.labels_N), batch_size=100, norm=HALF))
    assert history[-1]["test_accuracy"] == float(sums.correct) / float(sums.count)
    # The checkpoint holds the average too, so a resumed run goes on averaging.
    restored = checkpoints.Checkpoints(tmp_path).restore(2, state)
    chex.assert_trees_all_equal(restored.ema_params, state.ema_params)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_an_ema_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(FmnistError, match=r"ema decay must be in \[0, 1\)"):
        get_config(ema_decay=decay)
