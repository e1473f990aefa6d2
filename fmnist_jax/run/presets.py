"""The named presets: each a `TrainConfig` with what it trains, the command that runs it and
the result that command measured (the measurement itself in BENCHMARKS.md)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fmnist_jax.errors import FmnistError
from fmnist_jax.run.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    """A recipe: its config, what it trains, the command that runs it and what it reached."""

    config: TrainConfig
    about: str
    command: str
    result: str  # one line, measured with `command`; the measurement itself in BENCHMARKS.md
    teacher_preset: str = ""  # the preset whose finished run this one must be given as --teacher


_LENET5_BEST = TrainConfig(epochs=150, batch_size=128, optimizer="adamw", learning_rate=3e-3,
                           weight_decay=0.05, warmup_epochs=22.0, decay="cosine",
                           crop_padding=2, flip_prob=0.5, normalization="dataset",
                           ema_decay=0.999)
# The teacher and its student hold out the same validation split (val_seed), so the student's
# validation accuracy is of images the teacher never trained on.
_TAUGHT_SPLIT = 0

PRESETS: dict[str, Preset] = {
    "lenet5": Preset(
        config=TrainConfig(),
        about="LeNet-5 (61,706 parameters), the LeNet-5 report's recipe: batch 64, Adam 1e-3, "
              "10 epochs, pixels to [-1, 1]",
        command="python scripts/train.py --preset lenet5 --seeds 3",
        result="89.79% mean test accuracy of 3 seeds (0-2, kept epochs 9, 8, 8), 95% CI "
               "[89.56, 90.01], 2-core CPU; see BENCHMARKS.md"),
    "cnn": Preset(
        config=TrainConfig(model="cnn", batch_size=32),
        about="the tutorial CNN (conv 16 and 32 at 3x3, dense 1568-128-10; 206,922 "
              "parameters), the tutorial's recipe: batch 32, Adam 1e-3, 10 epochs",
        command="python scripts/train.py --preset cnn --seed 0",
        result="91.07% test accuracy (seed 0, kept epoch 7), 2-core CPU; see BENCHMARKS.md"),
    "mlp": Preset(
        config=TrainConfig(model="mlp", epochs=5, optimizer="adamw", learning_rate=1e-3,
                           weight_decay=1e-4, weight_decay_params="all", clip_norm=1.0,
                           decay="plateau", val_fraction=0.15, rotation_degrees=10.0,
                           flip_prob=0.1, translate_fraction=0.1, patience=5),
        about="the notebook's MLP (784-512-256-128-10, BatchNorm, dropout 0.3; 569,226 "
              "parameters), its recipe: AdamW 1e-3 (decay 1e-4 on every parameter), clipping, "
              "plateau halving, rotation, flip and shifts, 15% held out, 5 epochs",
        command="python scripts/train.py --preset mlp --seeds 10",
        result="82.18% mean test accuracy of 10 seeds (0-9, kept epoch 5), 95% CI [82.02, "
               "82.34], 2-core CPU; see BENCHMARKS.md"),
    "lenet5-gap": Preset(
        config=TrainConfig(model="lenet5-gap", epochs=20, optimizer="adamw", learning_rate=3e-3,
                           weight_decay=1e-4, warmup_epochs=2.0, decay="cosine",
                           label_smoothing=0.1, clip_norm=1.0),
        about="LeNet-5 with global average pooling (2,742 parameters), the practice article's "
              "recipe: AdamW 3e-3, warmup then cosine, label smoothing 0.1, 20 epochs",
        command="python scripts/train.py --preset lenet5-gap --seed 0",
        result="85.44% test accuracy (seed 0, kept epoch 19), 2-core CPU; see BENCHMARKS.md"),
    "lenet5-best": Preset(
        config=_LENET5_BEST,
        about="LeNet-5 (61,706 parameters), the strongest recipe found for it: standardized "
              "pixels, crop and flip, AdamW 3e-3 (decay 0.05), batch 128, warmup then cosine, "
              "weight EMA 0.999, 150 epochs",
        command="python scripts/train.py --preset lenet5-best --seeds 5",
        result="92.56% mean test accuracy of 5 seeds (0-4, best validation epoch), 95% CI "
               "[92.35, 92.77], 2-core CPU; see BENCHMARKS.md"),
    "cnn-teacher": Preset(
        config=dataclasses.replace(_LENET5_BEST, model="cnn", epochs=60, warmup_epochs=9.0,
                                   seed=100, seeds=5, val_seed=_TAUGHT_SPLIT),
        about="the teacher of lenet5-distilled: five tutorial CNNs (206,922 parameters each, "
              "seeds 100-104) on lenet5-best's recipe for 60 epochs, all holding out seed 0's "
              "validation split",
        command="python scripts/train.py --preset cnn-teacher --workdir runs/cnn-teacher",
        result="93.92% test accuracy as one model (the mean probability of its 5 runs, each "
               "92.99-93.41%), 1,705.9 s of training, 2-core CPU; see BENCHMARKS.md"),
    "lenet5-distilled": Preset(
        config=dataclasses.replace(_LENET5_BEST, distill_temperature=1.0, distill_weight=0.5,
                                   val_seed=_TAUGHT_SPLIT),
        about="LeNet-5 (61,706 parameters), lenet5-best's recipe taught by a finished "
              "cnn-teacher run (--teacher RUN): loss 0.5 KL(teacher || student) at T 1 + 0.5 "
              "cross-entropy, the teacher's probabilities of the clean training images, seed "
              "0's validation split",
        command="python scripts/train.py --preset lenet5-distilled --teacher runs/cnn-teacher "
                "--seeds 5",
        result="92.82% mean test accuracy of 5 seeds (0-4, best validation epoch), 95% CI "
               "[92.64, 92.99]; seeds 5-9: 92.70% [92.57, 92.83]; 2-core CPU; see BENCHMARKS.md",
        teacher_preset="cnn-teacher"),
}
DEFAULT_PRESET = "lenet5"


def get_config(preset: str = DEFAULT_PRESET, **overrides: Any) -> TrainConfig:
    """The named preset's config with `overrides` replaced, validated."""
    if preset not in PRESETS:
        raise FmnistError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise FmnistError(f"unknown config fields {unknown}: choose from {', '.join(sorted(known))}")
    cfg = dataclasses.replace(PRESETS[preset].config, **overrides)
    teacher_preset = PRESETS[preset].teacher_preset
    if teacher_preset and not cfg.teacher:
        raise FmnistError(f"preset {preset} learns from a teacher: pass --teacher RUN, the folder "
                          f"of a finished `python scripts/train.py --preset {teacher_preset} "
                          f"--workdir RUN`")
    return cfg.validate()
