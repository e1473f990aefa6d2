"""`baseline.order` repeats a run's init and batch order on the host (jax only, no torch)."""

import jax
import numpy as np
import optax
import pytest

from fmnist_jax import FmnistError
from fmnist_jax.baseline.order import jax_epoch_batch_order, run_epoch_order, run_init_params
from fmnist_jax.data import HALF
from fmnist_jax.models import get_model
from fmnist_jax.steps import TrainState, train_step_jit
from tests.helpers import make_split, tiny_config


@pytest.mark.slow
def test_order_helpers_reproduce_a_training_run(tiny_run):
    """Stepping by hand from `run_init_params` through `run_epoch_order`'s batches ends where
    `train_and_evaluate` did: the bench feeds torch exactly these."""
    _, state, _ = tiny_run
    cfg, train = tiny_config(), make_split(512, seed=0)
    manual = TrainState.create(apply_fn=get_model("lenet5").apply,
                               params=run_init_params(cfg.seed), tx=optax.adam(1e-3))
    for epoch in range(1, cfg.epochs + 1):
        for idx in run_epoch_order(cfg.seed, epoch, len(train), cfg.batch_size):
            manual, _ = train_step_jit(manual, train.images_NxHxWx1[idx], train.labels_N[idx],
                                       jax.random.key(0), HALF)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           state.params, manual.params)


def test_batch_order_is_a_partial_permutation():
    order_SxB = jax_epoch_batch_order(jax.random.key(1), 100, 32)
    assert order_SxB.shape == (3, 32)
    assert len(np.unique(order_SxB)) == 96 and order_SxB.min() >= 0 and order_SxB.max() < 100
    with pytest.raises(FmnistError, match="batch size 200 does not fit 100"):
        jax_epoch_batch_order(jax.random.key(1), 100, 200)
