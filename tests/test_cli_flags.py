"""cli_flags.py: the command-line flags made from TrainConfig's fields."""

import dataclasses

from fmnist_jax.cli import train_parser
from fmnist_jax.cli_flags import config_from_args
from fmnist_jax.run.config import PRESETS, TrainConfig


def test_every_config_field_has_a_flag_with_its_default_and_help():
    help_text = " ".join(train_parser().format_help().split())
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in help_text, flag
        default = getattr(PRESETS["lenet5"].config, field.name)
        words = " ".join(field.metadata["help"].split())
        assert f"{words} (default {'none' if default is None else default})" in help_text, flag


def test_flags_override_only_what_is_given():
    args = train_parser().parse_args(["--preset", "cnn", "--epochs", "3", "--clip-norm", "none"])
    assert config_from_args(args) == dataclasses.replace(PRESETS["cnn"].config, epochs=3)
    args = train_parser().parse_args(["--clip-norm", "2.5", "--model", "cnn"])
    cfg = config_from_args(args)
    assert (cfg.clip_norm, cfg.model, cfg.batch_size) == (2.5, "cnn", 64)
