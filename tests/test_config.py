"""run/config.py and run/presets.py: the presets, overrides, checks and the JSON round trip of
TrainConfig."""

import dataclasses
import json

import pytest

from fmnist_jax import FmnistError
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.run.presets import PRESETS, get_config


def test_default_preset_is_the_lenet5_report_recipe():
    cfg = get_config()
    assert (cfg.model, cfg.batch_size, cfg.optimizer, cfg.learning_rate, cfg.epochs) == (
        "lenet5", 64, "adam", 1e-3, 10)
    assert cfg.normalization == "half"
    assert get_config("cnn").model == "cnn" and get_config("cnn").batch_size == 32


def test_overrides_and_json_round_trip():
    cfg = get_config(epochs=3, clip_norm=None)
    assert cfg.epochs == 3 and cfg.learning_rate == 1e-3 and cfg.clip_norm is None
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 5


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 0}, "batch size must be at least 1"),
    ({"learning_rate": -1e-3}, "learning rate must be positive"),
    ({"model": "vgg"}, "unknown model 'vgg'"),
    ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"optimizer": "adam", "weight_decay": 1e-4}, "weight decay 0.0001 is ignored by optimizer .adam."),
    ({"weight_decay_params": "all"}, "weight decay params 'all' changes nothing without weight decay"),
    ({"optimizer": "adamw", "weight_decay_params": "biases"}, "unknown weight decay params 'biases'"),
    ({"warmup_epochs": 11.0}, "warmup epochs 11.0 is longer than the 10 epochs"),
    ({"decay": "plateau", "val_fraction": 0.0}, "decay plateau needs a validation split"),
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
    ({"eval_batch_size": 100_000_000}, "eval batch size 100000000 is more than the 60,000 "
                                       "images of the largest split: pass at most 60000"),
    ({"mixup_alpha": 1e39}, "mixup alpha 1e\\+39 is outside float32's range"),
    ({"learning_rate": 1e-50}, "learning rate 1e-50 is outside float32's range, in which the "
                               "run computes: pass a magnitude from 1.175e-38 to 3.403e\\+38"),
    ({"optimizer": "adamw", "weight_decay": -1e39}, "weight decay -1e\\+39 is outside float32"),
    ({"optimizer": "adam", "momentum": 0.5},
     "momentum 0.5 is ignored by optimizer 'adam': pass --optimizer sgd or nesterov"),
    ({"optimizer": "adamw", "momentum": 0.0}, "momentum 0.0 is ignored by optimizer 'adamw'"),
    ({"plateau_factor": 0.1}, "plateau factor and plateau patience change nothing with decay "
                              "constant: pass --decay plateau"),
    ({"decay": "cosine", "plateau_patience": 1}, "change nothing with decay cosine"),
    ({"teacher": "runs/t", "distill_weight": 0.0}, "distill weight 0 leaves the teacher out of "
                                                   "the loss .*: drop --teacher"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(FmnistError, match=message):
        get_config(**overrides)


INERT = [{"optimizer": "adam", "momentum": 0.5}, {"plateau_factor": 0.1},
         {"distill_weight": 0.3}, {"val_seed": 3, "val_fraction": 0.0},
         {"optimizer": "adam", "weight_decay": 1e-4}, {"teacher": "runs/t", "distill_weight": 0.0}]


@pytest.mark.parametrize("overrides", INERT)
def test_a_stored_config_keeps_a_setting_that_changes_nothing(overrides):
    """A new run refuses a setting that acts on nothing; the config.json of a run an earlier
    version trained with one is still read back, to evaluate or resume that run."""
    cfg = dataclasses.replace(get_config(), **overrides)
    with pytest.raises(FmnistError, match="changes? nothing|is ignored by|leaves the teacher"):
        cfg.validate()
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(FmnistError, match="epochs must be at least 1"):  # other checks hold
        TrainConfig.from_dict(dict(json.loads(cfg.to_json()), epochs=0))


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
        if preset.teacher_preset:  # valid once given its teacher, and its command gives one
            assert "--teacher " in preset.command, name
            cfg = get_config(name, teacher="runs/teacher")
            assert cfg == dataclasses.replace(preset.config, teacher="runs/teacher")
        else:
            assert preset.config.validate() is preset.config
        assert preset.command.startswith("python scripts/train.py") and preset.result, name


def test_a_taught_preset_wants_its_teacher_which_held_out_the_same_split():
    with pytest.raises(FmnistError, match="preset lenet5-distilled learns from a teacher: pass "
                       "--teacher RUN.*--preset cnn-teacher"):
        get_config("lenet5-distilled")
    for name, preset in PRESETS.items():
        if preset.teacher_preset:
            student = get_config(name, teacher="runs/teacher")
            teacher = get_config(preset.teacher_preset)
            assert not teacher.teacher and teacher.val_fraction == student.val_fraction
            assert teacher.split_seed == student.split_seed == 0, name
            assert student.model == "lenet5" and student.distill_temperature == 1.0


def test_values_at_the_new_bounds_and_combinations_that_are_used_pass():
    assert get_config(eval_batch_size=60_000).eval_batch_size == 60_000
    assert get_config(optimizer="sgd", momentum=0.5).momentum == 0.5
    assert get_config(optimizer="nesterov", momentum=0.0).momentum == 0.0
    assert get_config(decay="plateau", plateau_factor=0.1, plateau_patience=1).plateau_factor \
        == 0.1
    assert get_config(teacher="runs/t", distill_weight=1.0).distill_weight == 1.0
    assert get_config(learning_rate=1e-30, mixup_alpha=3e38).mixup_alpha == 3e38


def test_a_presets_weight_decay_with_adam_points_to_a_config_that_works():
    """mlp sets weight decay on every parameter: the advice must not be to drop a flag the
    user never gave, and following it must give a valid config."""
    with pytest.raises(FmnistError, match=r"weight decay 0.0001 is ignored by optimizer 'adam': "
                       r"pass --optimizer adamw, or --weight-decay 0 --weight-decay-params "
                       r"kernels$"):
        get_config("mlp", optimizer="adam")
    assert get_config("mlp", optimizer="adam", weight_decay=0.0,
                      weight_decay_params="kernels").optimizer == "adam"
    with pytest.raises(FmnistError, match=r"pass --optimizer adamw, or --weight-decay 0$"):
        get_config(optimizer="adam", weight_decay=1e-4)
