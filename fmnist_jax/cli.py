"""Command-line entry points. The scripts in scripts/ call these; each turns a user error
(FmnistError, or a bad flag) into one line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Callable, NoReturn

from fmnist_jax.config import DEFAULT_PRESET, MODEL_NAMES, PRESETS
from fmnist_jax.errors import FmnistError


class _Parser(argparse.ArgumentParser):
    """argparse that raises FmnistError (exit 1 with one line) instead of exiting 2."""

    def error(self, message: str) -> NoReturn:
        raise FmnistError(f"{message} (see --help)")


def user_errors_exit_1(main_fn: Callable[[list[str] | None], int | None]):
    """Wrap a main: FmnistError -> 'error: ...' on stderr and exit 1."""

    @functools.wraps(main_fn)
    def wrapped(argv: list[str] | None = None) -> None:
        try:
            code = main_fn(argv)
        except FmnistError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapped


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="tfds data dir holding (or to hold) the prepared "
                        "dataset; default $FMNIST_DATA_DIR or ~/tensorflow_datasets")
    parser.add_argument("--manual-dir", help="folder with the four official Fashion-MNIST .gz "
                        "files, for machines without internet; default $FMNIST_MANUAL_DIR")


def train_parser() -> argparse.ArgumentParser:
    parser = _Parser(description="Train a Fashion-MNIST classifier with JAX/Flax.")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help=f"named recipe: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    parser.add_argument("--model", help=f"override the preset's model: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, dest="learning_rate", help="peak learning rate")
    parser.add_argument("--optimizer", help="adam or adamw")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--decay", help="constant or cosine")
    parser.add_argument("--clip-norm", type=float)
    parser.add_argument("--normalization", help="half ((x-0.5)/0.5) or dataset (mean/std)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workdir", help="run folder (default runs/PRESET-seedN-TIMESTAMP)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_data_flags(parser)
    return parser


_OVERRIDES = ("model", "epochs", "batch_size", "learning_rate", "optimizer", "weight_decay",
              "warmup_epochs", "decay", "clip_norm", "normalization", "seed")


@user_errors_exit_1
def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    from fmnist_jax.config import get_config  # light; the heavy imports follow validation

    cfg = get_config(args.preset, **{name: getattr(args, name) for name in _OVERRIDES})
    from fmnist_jax.train import train_and_evaluate

    workdir = args.workdir or f"runs/{args.preset}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    train_and_evaluate(cfg, workdir, data_dir=args.data_dir, manual_dir=args.manual_dir,
                       progress=not args.no_progress)
    return 0
