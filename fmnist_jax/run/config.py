"""One frozen config object holding every hyperparameter (the named presets: `presets`).

Each `TrainConfig` field carries its help text and its check once, in its dataclass metadata:
`validate()`, the command-line flags (`cli_flags.add_config_flags`), `--help` and `config.json`
are all made from them, so adding a hyperparameter is adding one field here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import typing
from typing import Any, Callable

from fmnist_jax.data import NORMALIZATIONS
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import MODELS
from fmnist_jax.optim import (DECAYED_PARAMS, DECAYING_OPTIMIZERS, DECAYS, MOMENTUM_OPTIMIZERS,
                              OPTIMIZERS)

MAX_SEED = 2**32  # jax.random.key takes a 32-bit seed without surprises
# --seeds trains its members as one program on one process, their states (weights, optimizer
# moments, the average) and validation splits stacked on one device, and gives each its own
# run folder, checkpointed every epoch: a thousand mlp members already hold about 7 GB of
# weights and Adam moments and write a thousand checkpoints an epoch, so more is no run one
# machine can carry (`prepare.check_members_fit` checks the memory of those it allows).
MAX_SEEDS = 1000
# The largest Fashion-MNIST split: a larger evaluation batch is only padding, held on the device.
MAX_EVAL_BATCH = 60_000
# Floats train in float32: beyond its range a value is infinite there, below its tiny, 0.
FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38
# The fields `--sweep` can vary within one compiled program: each member carries its own value
# as an array (the optimizer's in its state, `optim.make_optimizer`; the others in the
# TrainState's `hparams`), with the short name its folder takes. Any other field changes the
# program's shapes or structure.
SWEEPABLE = {"learning_rate": "lr", "weight_decay": "wd", "label_smoothing": "ls",
             "ema_decay": "ema", "rotation_degrees": "rot", "flip_prob": "flip",
             "translate_fraction": "shift", "crop_padding": "crop", "erasing_prob": "erase",
             "mixup_alpha": "mixup", "cutmix_alpha": "cutmix"}


_DEFAULT_DISTILL, _DEFAULT_TEMPERATURE = 0.5, 4.0  # the distillation's weight and temperature
_DEFAULT_MOMENTUM, _PLATEAU = 0.9, (0.5, 3)  # sgd's momentum; plateau factor, patience
TEACHER_VIEWS = ("clean", "augmented")  # `teacher_view`'s values, the default first
TEACHER_TTAS = ("none", "flip")  # `teacher_tta`'s values, the default first
# The fields that say how a teacher teaches: a tool that trains without one offers none of them.
TEACHER_FIELDS = ("teacher", "distill_weight", "distill_temperature", "teacher_view",
                  "teacher_tta")


def _field(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
           check: tuple[Callable[[Any], bool], str] | None = None) -> Any:
    """A config field: its default, its --help text, and either its allowed names (`choices`)
    or a (predicate, "must be ...") range check."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "check": check})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a run. Build one with `get_config(preset, **overrides)`."""

    model: str = _field("lenet5", "the network", choices=tuple(MODELS))
    epochs: int = _field(10, "passes over the training images", check=(
        lambda v: v >= 1, "at least 1"))
    batch_size: int = _field(64, "images per optimizer step; each epoch drops the last partial "
                             "batch (other images each epoch, with the shuffle)",
                             check=(lambda v: v >= 1, "at least 1"))
    eval_batch_size: int = _field(1000, "images per evaluation batch (the last is padded and "
                                  "masked: every image counts)",
                                  check=(lambda v: v >= 1, "at least 1"))
    optimizer: str = _field("adam", "adam; adamw (Adam with decoupled weight decay on the "
                            "weight_decay_params); sgd (with momentum); nesterov (SGD with "
                            "Nesterov momentum)", choices=tuple(OPTIMIZERS))
    learning_rate: float = _field(1e-3, "peak learning rate", check=(
        lambda v: v > 0, "positive"))
    weight_decay: float = _field(0.0, "decoupled weight decay (adamw only)", check=(
        lambda v: v >= 0, ">= 0"))
    weight_decay_params: str = _field("kernels", "which parameters weight decay shrinks: "
                                      "kernels (dense and conv weights; biases and BatchNorm's "
                                      "scale and bias are left alone); all (every parameter, "
                                      "as torch.optim.AdamW(model.parameters()) does)",
                                      choices=DECAYED_PARAMS)
    momentum: float = _field(_DEFAULT_MOMENTUM, "momentum of sgd and nesterov", check=(
        lambda v: 0 <= v < 1, "in [0, 1)"))
    warmup_epochs: float = _field(0.0, "linear warmup from 0 to the learning rate over this "
                                  "many epochs", check=(lambda v: v >= 0, ">= 0"))
    decay: str = _field("constant", "after warmup: constant; cosine (to 0 at the last step); "
                        "plateau (multiply by plateau_factor after plateau_patience + 1 epochs "
                        "without a lower validation loss)", choices=tuple(DECAYS))
    plateau_factor: float = _field(_PLATEAU[0], "the plateau schedule's factor", check=(
        lambda v: 0 < v < 1, "in (0, 1)"))
    plateau_patience: int = _field(_PLATEAU[1], "epochs in a row without a lower "
                                   "validation loss that the plateau schedule tolerates: it "
                                   "lowers the rate at the end of the next such epoch (torch's "
                                   "ReduceLROnPlateau patience)", check=(lambda v: v >= 0, ">= 0"))
    clip_norm: float | None = _field(None, "clip gradients to this global L2 norm (none: no "
                                     "clipping)", check=(lambda v: v is None or v > 0,
                                                         "positive, or none"))
    ema_decay: float = _field(0.0, "keep an exponential moving average of the weights, "
                              "after every step: ema = decay ema + (1 - decay) weights; when "
                              "on, the validation and test metrics, the best epoch, the model "
                              "kept and the report all use the average; 0: off",
                              check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    label_smoothing: float = _field(0.0, "train on targets (1 - a) one-hot + a / 10 "
                                    "(reported train loss is the smoothed one)",
                                    check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    teacher: str = _field("", "distill from these finished runs (comma-separated run folders; "
                          "a folder of several seeds counts each): their probabilities at "
                          "distill_temperature, averaged, on the images teacher_view says; "
                          "none: no teacher")
    distill_weight: float = _field(_DEFAULT_DISTILL, "with a teacher, the loss is w "
                                   "KL(teacher_T || student_T) T^2 + (1 - w) cross-entropy",
                                   check=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    distill_temperature: float = _field(_DEFAULT_TEMPERATURE, "the temperature T of both "
                                        "sides of the distillation's KL",
                                        check=(lambda v: v > 0, "positive"))
    teacher_view: str = _field("clean", "the images the teacher's probabilities are of: clean "
                               "(every training image without augmentation, computed once "
                               "before training); augmented (each batch as the student sees "
                               "it, after its augmentation: one forward pass of each teacher "
                               "per model per step, in evaluation mode)",
                               choices=TEACHER_VIEWS)
    teacher_tta: str = _field("none", "flip: the clean view's teacher probabilities averaged "
                              "over each image and its mirror image (as evaluate.py --tta flip "
                              "does), so that they do not change when the student's image is "
                              "flipped; none: the image alone", choices=TEACHER_TTAS)
    rotation_degrees: float = _field(0.0, "augmentation: rotate each training image by up to "
                                     "+- this many degrees", check=(lambda v: 0 <= v <= 180,
                                                                    "in [0, 180]"))
    flip_prob: float = _field(0.0, "augmentation: probability of a horizontal flip", check=(
        lambda v: 0 <= v <= 1, "in [0, 1]"))
    translate_fraction: float = _field(0.0, "augmentation: shift by up to +- this fraction of "
                                       "the size, per axis", check=(lambda v: 0 <= v <= 0.5,
                                                                    "in [0, 0.5]"))
    crop_padding: int = _field(0, "augmentation: random 28x28 crop after padding with this many "
                               "zero pixels", check=(lambda v: 0 <= v <= 14, "in [0, 14]"))
    erasing_prob: float = _field(0.0, "augmentation: probability of erasing a random rectangle "
                                 "(2-33% of the image) to black", check=(
                                     lambda v: 0 <= v <= 1, "in [0, 1]"))
    mixup_alpha: float = _field(0.0, "mixing: train on each batch's images blended in pairs, "
                                "x s + partner (1 - s), and their labels with the same share s ~ "
                                "Beta(alpha, alpha), one s a batch (mixup); with cutmix too, "
                                "each batch takes one of the two at random; 0: off",
                                check=(lambda v: v >= 0, ">= 0"))
    cutmix_alpha: float = _field(0.0, "mixing: paste a box of each image's partner in the "
                                 "batch over it, the labels shared by area, the box's area 1 - "
                                 "lam for lam ~ Beta(alpha, alpha), one box a batch (cutmix); 0: "
                                 "off", check=(lambda v: v >= 0, ">= 0"))
    normalization: str = _field("half", "half: (x/255 - 0.5)/0.5, pixels to [-1, 1]; dataset: "
                                "the training images' own pixel mean and std",
                                choices=NORMALIZATIONS)
    val_fraction: float = _field(0.1, "share of each class held out of the training images "
                                 "(seeded) for validation and temperature scaling; 0: none, "
                                 "train on all 60,000",
                                 check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    seed: int = _field(0, "the random seed: initialization, validation split (unless "
                       "val_seed), shuffling",
                       check=(lambda v: 0 <= v < MAX_SEED, f"in [0, {MAX_SEED})"))
    val_seed: int | None = _field(None, "the seed of the held-out validation split (none: the "
                                  "run's own seed, each member of --seeds its own); teachers "
                                  "trained with their student's split seed never train on its "
                                  "validation images",
                                  check=(lambda v: v is None or 0 <= v < MAX_SEED,
                                         f"in [0, {MAX_SEED}), or none"))
    seeds: int = _field(1, "train this many models at once, with seeds seed, seed+1, ...: one "
                        "compiled program (on a GPU in lockstep with jax.vmap, on a CPU one "
                        "after another with jax.lax.map), each model its own run folder "
                        "WORKDIR/seed-S, trained as a run with --seed S is (the same keys and "
                        "batches; on a GPU another float summation order); then each seed's "
                        "test accuracy and their mean with a 95% confidence interval; at most "
                        f"{MAX_SEEDS}",
                        check=(lambda v: v >= 1, "at least 1"))
    checkpoint_every: int = _field(1, "save the whole training state to RUN_DIR/checkpoints/ "
                                   "every this many epochs (and at the best and the last "
                                   "epoch), so --resume can continue; 0: only at the best and the "
                                   "last epoch (the model kept)",
                                   check=(lambda v: v >= 0, ">= 0"))
    sweep: str = _field("", "a grid of hyperparameters trained together as one program, "
                        "NAME=V1,V2,... for each field swept (the flag repeats; in the config "
                        "the fields are joined by ';'): each grid point times --seeds is a "
                        "member with its own run folder WORKDIR/POINT/seed-S, then sweep.json "
                        "with each point's validation accuracy and the point chosen by it; "
                        "fields: " + ", ".join(SWEEPABLE))
    patience: int = _field(0, "early stopping: stop after this many epochs without a higher "
                           "validation accuracy (the model kept is the best epoch's); 0: off",
                           check=(lambda v: v >= 0, ">= 0"))

    def validate(self, *, stored: bool = False) -> TrainConfig:
        """Raise FmnistError naming the first bad field; return self when all are good.
        `stored`: the config of a run folder, read back, whose settings that change nothing
        are let be (an earlier version trained with them; `check_settings_act` refuses them
        in a new run)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, hints[f.name])
            choices, check = f.metadata["choices"], f.metadata["check"]
            if choices is not None and value not in choices:
                raise FmnistError(f"unknown {flag_words(f.name)} {value!r}: choose one of "
                                  f"{', '.join(choices)}")
            if check is not None and not check[0](value):
                raise FmnistError(f"{flag_words(f.name)} must be {check[1]}, got {value}")
        if self.eval_batch_size > MAX_EVAL_BATCH:
            raise FmnistError(f"eval batch size {self.eval_batch_size} is more than the "
                              f"{MAX_EVAL_BATCH:,} images of the largest split: pass at most "
                              f"{MAX_EVAL_BATCH}")
        grid = parse_sweep(self.sweep)
        points = math.prod(len(values) for values in grid.values())
        if self.seeds > MAX_SEEDS:
            raise FmnistError(f"seeds {self.seeds} is more than the {MAX_SEEDS} one run can "
                              f"train (their models and optimizer states are held together, "
                              f"and each seed writes a run folder every epoch): lower --seeds, "
                              f"or split the seeds over several runs with --seed")
        if self.seeds * points > MAX_SEEDS:
            raise FmnistError(f"{self.seeds} seeds x {points} grid points make "
                              f"{self.seeds * points} models, more than the {MAX_SEEDS} one run "
                              f"can train (their models and optimizer states are held "
                              f"together, and each writes a run folder every epoch): lower "
                              f"--seeds or the grid, or split the seeds over several runs "
                              f"with --seed")
        if self.seed + self.seeds > MAX_SEED:
            raise FmnistError(f"seeds {self.seed}..{self.seed + self.seeds - 1} go past the "
                              f"largest seed {MAX_SEED - 1}: lower --seed or --seeds")
        if self.warmup_epochs > self.epochs:
            raise FmnistError(f"warmup epochs {self.warmup_epochs} is longer than the "
                              f"{self.epochs} epochs of training: lower --warmup-epochs")
        if self.decay == "plateau" and self.val_fraction == 0:
            raise FmnistError("decay plateau needs a validation split to watch: pass "
                              "--val-fraction > 0")
        if self.patience and self.val_fraction == 0:
            raise FmnistError("patience needs a validation split to watch: pass "
                              "--val-fraction > 0, or --patience 0")
        if self.teacher_tta != TEACHER_TTAS[0] and self.teacher_view != TEACHER_VIEWS[0]:
            raise FmnistError(f"teacher tta {self.teacher_tta} is for the clean view: the "
                              f"augmented view's teachers see each image as the student does; "
                              f"drop --teacher-tta or --teacher-view {self.teacher_view}")
        if grid and self.val_fraction == 0:
            raise FmnistError("a sweep chooses its point by validation accuracy: pass "
                              "--val-fraction > 0")
        if not stored:
            self.check_settings_act()
        if grid:
            for member in self.members():
                member.validate(stored=stored)  # a point the config cannot train
        return self

    def check_settings_act(self) -> None:
        """FmnistError naming a setting that changes nothing in this config (momentum with
        adam, a distillation weight without a teacher, ...) and what to pass instead."""
        if self.weight_decay and self.optimizer not in DECAYING_OPTIMIZERS:
            # The decay may be the preset's: a value to pass, with its weight_decay_params.
            also = (" --weight-decay-params kernels" if self.weight_decay_params != "kernels"
                    else "")
            raise FmnistError(f"weight decay {self.weight_decay} is ignored by optimizer "
                              f"{self.optimizer!r}: pass --optimizer adamw, or --weight-decay "
                              f"0{also}")
        if self.momentum != _DEFAULT_MOMENTUM and self.optimizer not in MOMENTUM_OPTIMIZERS:
            raise FmnistError(f"momentum {self.momentum} is ignored by optimizer "
                              f"{self.optimizer!r}: pass --optimizer "
                              f"{' or '.join(MOMENTUM_OPTIMIZERS)}, or drop --momentum")
        if self.decay != "plateau" and (self.plateau_factor, self.plateau_patience) != _PLATEAU:
            raise FmnistError(f"plateau factor and plateau patience change nothing with decay "
                              f"{self.decay}: pass --decay plateau, or drop them")
        if self.weight_decay_params != "kernels" and not self.weight_decay:
            raise FmnistError(f"weight decay params {self.weight_decay_params!r} changes "
                              f"nothing without weight decay: pass --weight-decay (with "
                              f"--optimizer adamw), or drop --weight-decay-params (pass "
                              f"--weight-decay-params kernels where a preset sets it)")
        if self.val_seed is not None and self.val_fraction == 0:
            raise FmnistError(f"val seed {self.val_seed} changes nothing without a validation "
                              f"split: pass --val-fraction > 0, or drop --val-seed")
        if not self.teacher and (self.distill_weight != _DEFAULT_DISTILL
                                 or self.distill_temperature != _DEFAULT_TEMPERATURE):
            raise FmnistError("distill weight and distill temperature change nothing without a "
                              "teacher: pass --teacher RUN_DIR, or drop them")
        if self.teacher and self.distill_weight == 0:
            raise FmnistError("distill weight 0 leaves the teacher out of the loss (loaded for "
                              "nothing): drop --teacher, or pass --distill-weight > 0")
        if not self.teacher and self.teacher_view != TEACHER_VIEWS[0]:
            raise FmnistError(f"teacher view {self.teacher_view} changes nothing without a "
                              f"teacher: pass --teacher RUN_DIR, or drop --teacher-view")
        if self.teacher_tta != TEACHER_TTAS[0] and not self.teacher:
            raise FmnistError(f"teacher tta {self.teacher_tta} changes nothing without a "
                              f"teacher: pass --teacher RUN_DIR, or drop --teacher-tta")

    @property
    def split_seed(self) -> int:
        """The seed the run's validation split is drawn from: `val_seed` when given, else the
        run's own `seed` (each member of a run of several seeds its own)."""
        return self.seed if self.val_seed is None else self.val_seed

    @property
    def many(self) -> bool:
        """Whether the run trains several models, each with its own run folder: several
        seeds, or a sweep."""
        return self.seeds > 1 or bool(self.sweep)

    def grid(self) -> dict[str, tuple[float | int, ...]]:
        """The sweep's fields and their values ({} without a sweep)."""
        return parse_sweep(self.sweep)

    def points(self) -> list[dict[str, float | int]]:
        """The sweep's grid points, the first field's values varying slowest ([{}]: none)."""
        grid = self.grid()
        return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]

    def members(self) -> list[TrainConfig]:
        """The config of each model of a run of several: for each grid point of the sweep
        (one, without a sweep), seed, seed+1, ..., each with seeds 1 and no sweep, so each
        equals the config of a single run with that point and --seed."""
        return [dataclasses.replace(self, **point, seed=self.seed + k, seeds=1, sweep="")
                for point in self.points() for k in range(self.seeds)]

    def member_names(self) -> list[str]:
        """Each member's run folder, relative to the run's (`members`' order): seed-S, or
        POINT/seed-S in a sweep (POINT as `point_name`)."""
        return [(f"{point_name(point)}/" if point else "") + f"seed-{self.seed + k}"
                for point in self.points() for k in range(self.seeds)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> TrainConfig:
        """A config read back from JSON: unknown fields and wrong types are FmnistErrors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise FmnistError(f"config has unknown fields {unknown}: it was written by another "
                              f"version")
        return cls(**fields).validate(stored=True)


def parse_sweep(text: str) -> dict[str, tuple[float | int, ...]]:
    """The grid of a config's `sweep` ("learning_rate=0.001,0.003;weight_decay=0.0"): each
    field's values, in order. FmnistError naming the bad part: a field that cannot be swept,
    one given twice, a value that is no number of the field's type, a repeated value."""
    grid: dict[str, tuple[float | int, ...]] = {}
    hints = typing.get_type_hints(TrainConfig)
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, values_text = part.partition("=")
        name = name.strip().replace("-", "_")
        if name not in SWEEPABLE:
            raise FmnistError(f"--sweep {part!r}: {flag_words(name) or 'no field'} cannot be "
                              f"swept (it changes the compiled program, or is no field): sweep "
                              f"one of {', '.join(SWEEPABLE)}")
        if name in grid:
            raise FmnistError(f"--sweep gives {name} twice: give all its values in one "
                              f"--sweep {name}=V1,V2,...")
        kind = int if hints[name] is int else float
        try:
            values = tuple(kind(v) for v in values_text.split(","))
        except ValueError:
            raise FmnistError(f"--sweep {part!r}: {name} takes {kind.__name__} values, "
                              f"NAME=V1,V2,...") from None
        names = [_value_name(v) for v in values]
        if len(set(names)) < len(names):
            raise FmnistError(f"--sweep {part!r} repeats a value (as its folder names it: "
                              f"{', '.join(names)}): give each value once")
        grid[name] = values
    return grid


def canonical_sweep(parts: list[str]) -> str:
    """`--sweep` flags as the config stores them: fields joined by ';', values as Python
    writes them (so a resumed run's flags compare equal however they were typed)."""
    grid = parse_sweep(";".join(parts))
    return ";".join(f"{name}=" + ",".join(repr(v) for v in values)
                    for name, values in grid.items())


def _value_name(value: float | int) -> str:
    return f"{value:g}"


def point_name(point: dict[str, float | int]) -> str:
    """A grid point as its folder is named: lr=0.003,wd=0.0005."""
    return ",".join(f"{SWEEPABLE[name]}={_value_name(v)}" for name, v in point.items())


def flag_words(name: str) -> str:
    """A field name as a user reads it in messages: batch_size -> "batch size"."""
    return name.replace("_", " ")


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raise FmnistError unless `value` is of the field's type (floats: as float32 holds)."""
    allowed = typing.get_args(hint) or (hint,)  # float | None -> (float, NoneType)
    if value is None and type(None) in allowed:
        return
    if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise FmnistError(f"{flag_words(name)} must be a finite number, got {value}")
        if abs(value) > FLOAT32_MAX or 0 < abs(value) < FLOAT32_TINY:
            raise FmnistError(f"{flag_words(name)} {value} is outside float32's range, in which "
                              f"the run computes: pass a magnitude from {FLOAT32_TINY:.4g} to "
                              f"{FLOAT32_MAX:.4g}")
        return
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return
    if str in allowed and isinstance(value, str):
        return
    kind = " or ".join("none" if t is type(None) else t.__name__ for t in allowed)
    raise FmnistError(f"{flag_words(name)} must be {kind}, got {value!r}")
