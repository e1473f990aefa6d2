"""optim.py: the learning-rate schedules and the optimizers a config asks for."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax.models import get_model
from fmnist_jax.optim import make_lr_schedule, make_optimizer
from fmnist_jax.run.presets import get_config


def test_warmup_then_constant():
    lr_fn = make_lr_schedule(get_config(warmup_epochs=1.0), steps_per_epoch=10)
    np.testing.assert_allclose([lr_fn(0), lr_fn(5), lr_fn(10), lr_fn(95)],
                               [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_cosine_reaches_zero_at_the_last_step():
    lr_fn = make_lr_schedule(get_config(epochs=2, warmup_epochs=0.5, decay="cosine"), 10)
    assert float(lr_fn(5)) == pytest.approx(1e-3)
    assert float(lr_fn(20)) == pytest.approx(0.0, abs=1e-12)
    assert 0 < float(lr_fn(12)) < 1e-3


def test_clipping_bounds_the_gradient_that_adam_sees():
    """With clip_norm, the update equals Adam's update on the clipped gradient."""
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # norm 50
    clipped = {"w": grads["w"] / 50.0}
    tx = make_optimizer(get_config(clip_norm=1.0, learning_rate=0.1), steps_per_epoch=1)
    ref = optax.adam(0.1)
    for g_in, g_ref in [(grads, clipped), (clipped, clipped)]:
        upd, _ = tx.update(g_in, tx.init(params), params)
        upd_ref, _ = ref.update(g_ref, ref.init(params), params)
        np.testing.assert_allclose(upd["w"], upd_ref["w"], rtol=1e-6)
    # Clipping twice changes nothing: a gradient inside the ball passes untouched.
    clip = optax.clip_by_global_norm(1.0)
    once, _ = clip.update(grads, clip.init(params))
    twice, _ = clip.update(once, clip.init(params))
    np.testing.assert_allclose(once["w"], twice["w"], rtol=1e-6)
    assert float(jnp.linalg.norm(once["w"])) <= 1.0 + 1e-6


def test_adamw_decays_kernels_not_biases_and_adam_nothing():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = make_optimizer(get_config(optimizer="adamw", weight_decay=0.1), 1)
    upd, _ = tx.update(zero, tx.init(params), params)
    assert bool(jnp.all(upd["dense"]["kernel"] < 0))  # -lr * wd * w: decayed
    for leaf in (upd["dense"]["bias"], upd["bn"]["scale"], upd["bn"]["bias"]):
        np.testing.assert_array_equal(leaf, 0.0)  # left alone
    tx = make_optimizer(get_config(optimizer="adam"), 1)
    upd, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_array_equal(upd["dense"]["kernel"], 0.0)


def test_adamw_with_weight_decay_params_all_decays_every_parameter():
    params = {"dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full(2, 3.0)},
              "bn": {"scale": jnp.full(2, 4.0), "bias": jnp.full(2, 5.0)}}
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = make_optimizer(get_config(optimizer="adamw", weight_decay=0.1, learning_rate=0.01,
                                   weight_decay_params="all"), 1)
    upd, _ = tx.update(zero, tx.init(params), params)
    # Zero gradients leave only the decay, -lr * wd * w, on biases and BatchNorm too (torch's
    # AdamW over model.parameters() does the same).
    jax.tree_util.tree_map(lambda u, w: np.testing.assert_allclose(u, -0.01 * 0.1 * w,
                                                                   rtol=1e-6), upd, params)


def test_nesterov_is_optax_sgd_with_nesterov_momentum():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    tx = make_optimizer(get_config(optimizer="nesterov", learning_rate=0.1, momentum=0.8), 1)
    ref = optax.sgd(0.1, momentum=0.8, nesterov=True)
    state, ref_state = tx.init(params), ref.init(params)
    for _ in range(3):
        upd, state = tx.update(grads, state, params)
        ref_upd, ref_state = ref.update(grads, ref_state, params)
        np.testing.assert_allclose(upd["w"], ref_upd["w"], rtol=1e-6)
    plain, _ = optax.sgd(0.1, momentum=0.8).update(grads, optax.sgd(0.1, momentum=0.8).init(
        params), params)
    first, _ = tx.update(grads, tx.init(params), params)
    assert not np.allclose(first["w"], plain["w"])  # Nesterov looks ahead: not plain momentum


def _plateau_scales(val_losses, **overrides):
    from fmnist_jax.optim import make_plateau
    from fmnist_jax.steps import create_train_state, plateau_update

    cfg = get_config(decay="plateau", **overrides)  # the notebook's factor 0.5, patience 3
    state = create_train_state(get_model("lenet5"), make_optimizer(cfg, 10),
                               jax.random.key(0), plateau_tx=make_plateau(cfg))
    scales = []
    for val_loss in val_losses:
        state = plateau_update(state, jnp.float32(val_loss))
        scales.append(float(state.plateau.scale))
    return scales


# Two improvements, then flat: torch's patience 3 tolerates 3 flat epochs and halves the rate
# on the 4th, then counts afresh (4 more flat epochs: halved again); 0.9 * (1 - 1e-4) is the
# bar an epoch must beat, so 0.89995 does not count as lower and 0.8999 does.
_LOSSES = (1.0, 0.9, 0.9, 0.9, 0.9, 0.95, 0.9, 0.9, 0.89995, 0.9, 0.8999, 0.95)


def test_plateau_halves_the_rate_on_the_fourth_flat_epoch_as_torch():
    assert _plateau_scales(_LOSSES) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25,
                                        0.25, 0.25]


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_plateau_matches_torchs_reduce_lr_on_plateau(patience):
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5,
                                                       patience=patience)
    expected = []
    for val_loss in _LOSSES:
        sched.step(val_loss)
        expected.append(opt.param_groups[0]["lr"])
    assert _plateau_scales(_LOSSES, plateau_patience=patience) == expected


@pytest.mark.slow
def test_the_plateau_scale_multiplies_every_update():
    from fmnist_jax.data import HALF
    from fmnist_jax.optim import make_plateau
    from fmnist_jax.steps import create_train_state
    from tests.helpers import jitted_train_step, step_batch

    images, labels = step_batch()
    cfg = get_config(decay="plateau")
    full = create_train_state(get_model("lenet5"), make_optimizer(cfg, 10),
                              jax.random.key(0), plateau_tx=make_plateau(cfg))
    half = full.replace(plateau=full.plateau._replace(scale=jnp.float32(0.5)))
    moved = [jax.tree_util.tree_map(lambda a, b: b - a, s.params, jitted_train_step(
        s, images, labels, jax.random.key(1), HALF)[0].params)
        for s in (full, half)]
    # (moved weights differ by float rounding of params ~1: atol 1e-7 against steps ~5e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, 0.5 * a, rtol=1e-4,
                                                                   atol=1e-7), *moved)
