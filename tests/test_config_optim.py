import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax import FmnistError
from fmnist_jax.config import PRESETS, TrainConfig, get_config
from fmnist_jax.optim import make_lr_schedule, make_optimizer


def test_default_preset_is_the_seed_002_recipe():
    cfg = get_config()
    assert (cfg.model, cfg.batch_size, cfg.optimizer, cfg.learning_rate, cfg.epochs) == (
        "lenet5", 64, "adam", 1e-3, 10)
    assert cfg.normalization == "half"
    assert get_config("seed-001").model == "cnn" and get_config("seed-001").batch_size == 32


def test_overrides_and_json_round_trip():
    cfg = get_config(epochs=3, learning_rate=None)
    assert cfg.epochs == 3 and cfg.learning_rate == 1e-3
    import json
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 5


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 0}, "batch size must be at least 1"),
    ({"learning_rate": -1e-3}, "learning rate must be positive"),
    ({"model": "vgg"}, "unknown model 'vgg'"),
    ({"optimizer": "sgd"}, "unknown optimizer"),
    ({"clip_norm": 0.0}, "clip norm must be positive"),
    ({"epochs": 0}, "epochs must be at least 1"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(FmnistError, match=message):
        get_config(**overrides)


def test_unknown_preset_and_fields():
    with pytest.raises(FmnistError, match="unknown preset 'nope'.*seed-002"):
        get_config("nope")
    with pytest.raises(FmnistError, match="unknown fields"):
        TrainConfig.from_dict({"epochs": 1, "colour": "red"})
    assert set(PRESETS) >= {"seed-002", "seed-001"}


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


def test_adamw_decays_weights_adam_does_not():
    params = {"w": jnp.ones(2)}
    zero = {"w": jnp.zeros(2)}
    for name, decays in [("adamw", True), ("adam", False)]:
        tx = make_optimizer(get_config(optimizer=name, weight_decay=0.1), 1)
        upd, _ = tx.update(zero, tx.init(params), params)
        assert bool(jnp.all(upd["w"] < 0)) is decays
