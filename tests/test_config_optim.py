import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax import FmnistError
from fmnist_jax.config import PRESETS, TrainConfig, get_config
from fmnist_jax.optim import make_lr_schedule, make_optimizer


def test_default_preset_is_the_lenet5_report_recipe():
    cfg = get_config()
    assert (cfg.model, cfg.batch_size, cfg.optimizer, cfg.learning_rate, cfg.epochs) == (
        "lenet5", 64, "adam", 1e-3, 10)
    assert cfg.normalization == "half"
    assert get_config("cnn").model == "cnn" and get_config("cnn").batch_size == 32


def test_overrides_and_json_round_trip():
    cfg = get_config(epochs=3, clip_norm=None)
    assert cfg.epochs == 3 and cfg.learning_rate == 1e-3 and cfg.clip_norm is None
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
    ({"epochs": 2.5}, "epochs must be int, got 2.5"),
    ({"epochs": True}, "epochs must be int, got True"),
    ({"learning_rate": float("inf")}, "learning rate must be a finite number"),
    ({"learning_rate": "fast"}, "learning rate must be float, got 'fast'"),
    ({"clip_norm": "1"}, "clip norm must be float or none"),
    ({"seed": -1}, r"seed must be in \[0, 4294967296\)"),
    ({"seed": 2**63}, r"seed must be in \[0, 4294967296\)"),
    ({"val_fraction": 1.0}, r"val fraction must be in \[0, 1\)"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(FmnistError, match=message):
        get_config(**overrides)


def test_unknown_preset_and_fields():
    with pytest.raises(FmnistError, match="unknown preset 'nope'.*lenet5"):
        get_config("nope")
    with pytest.raises(FmnistError, match="unknown fields"):
        TrainConfig.from_dict({"epochs": 1, "colour": "red"})
    with pytest.raises(FmnistError, match=r"unknown config fields \['colour'\]"):
        get_config(colour="red")
    with pytest.raises(FmnistError, match="epochs must be int"):
        TrainConfig.from_dict({"epochs": "10"})  # a hand-edited config.json


def test_every_preset_is_valid_and_says_what_it_reached():
    for name, preset in PRESETS.items():
        assert preset.config.validate() is preset.config
        assert preset.command.startswith("python scripts/train.py") and preset.result, name


def test_every_config_field_has_a_flag_with_its_default_and_help():
    from fmnist_jax.cli import train_parser

    help_text = " ".join(train_parser().format_help().split())
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in help_text, flag
        default = getattr(PRESETS["lenet5"].config, field.name)
        words = " ".join(field.metadata["help"].split())
        assert f"{words} (default {'none' if default is None else default})" in help_text, flag


def test_flags_override_only_what_is_given():
    from fmnist_jax.cli import config_from_args, train_parser

    args = train_parser().parse_args(["--preset", "cnn", "--epochs", "3", "--clip-norm", "none"])
    assert config_from_args(args) == dataclasses.replace(PRESETS["cnn"].config, epochs=3)
    args = train_parser().parse_args(["--clip-norm", "2.5", "--model", "cnn"])
    cfg = config_from_args(args)
    assert (cfg.clip_norm, cfg.model, cfg.batch_size) == (2.5, "cnn", 64)


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
