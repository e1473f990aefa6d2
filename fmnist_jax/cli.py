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
    parser.add_argument("--val-fraction", type=float, help="share of each class held out "
                        "for validation and temperature scaling (default 0.1; 0 = none)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workdir", help="run folder (default runs/PRESET-seedN-TIMESTAMP)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-report", action="store_true",
                        help="skip the evaluation report at the end (scripts/evaluate.py)")
    _add_data_flags(parser)
    return parser


_OVERRIDES = ("model", "epochs", "batch_size", "learning_rate", "optimizer", "weight_decay",
              "warmup_epochs", "decay", "clip_norm", "normalization", "val_fraction", "seed")


@user_errors_exit_1
def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    from fmnist_jax.config import get_config  # light; the heavy imports follow validation

    cfg = get_config(args.preset, **{name: getattr(args, name) for name in _OVERRIDES})
    from fmnist_jax import data
    from fmnist_jax.report import evaluate_run
    from fmnist_jax.train import train_and_evaluate

    workdir = args.workdir or f"runs/{args.preset}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    train, test = data.load_fashion_mnist(data_dir=args.data_dir, manual_dir=args.manual_dir)
    train_and_evaluate(cfg, workdir, train=train, test=test, progress=not args.no_progress)
    if not args.no_report:
        evaluate_run(workdir, train=train, test=test)
    return 0


def evaluate_parser() -> argparse.ArgumentParser:
    parser = _Parser(description="Evaluate a run folder: classification report, confidence "
                     "intervals, calibration before and after temperature scaling, PNGs.")
    parser.add_argument("run_dir", help="a folder written by scripts/train.py")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples for the 95%% intervals (default 1000)")
    _add_data_flags(parser)
    return parser


@user_errors_exit_1
def evaluate_main(argv: list[str] | None = None) -> int:
    args = evaluate_parser().parse_args(argv)
    if args.resamples < 1:
        raise FmnistError(f"--resamples must be at least 1, got {args.resamples}")
    from fmnist_jax.report import evaluate_run

    evaluate_run(args.run_dir, data_dir=args.data_dir, manual_dir=args.manual_dir,
                 n_resamples=args.resamples)
    return 0


def bench_parser() -> argparse.ArgumentParser:
    parser = _Parser(description="JAX against the PyTorch baseline on the seed-002 recipe, "
                     "same init, alternating epochs, in one run on this machine.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pipelines", default="jax,torch-tuned,torch-seed-style",
                        help="comma-separated: jax, torch-tuned, torch-seed-style")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when JAX and torch both see a GPU, else CPU")
    parser.add_argument("--torch-compile", action="store_true",
                        help="torch.compile the tuned pipeline's model")
    parser.add_argument("--train-images", type=int, help="use only the first N training images")
    parser.add_argument("--quick", action="store_true",
                        help="1 epoch, 1 seed, 2,048 training images: a smoke test for CI")
    parser.add_argument("--out", default="bench.json", help="JSON results (default bench.json)")
    _add_data_flags(parser)
    return parser


@user_errors_exit_1
def bench_main(argv: list[str] | None = None) -> int:
    import os

    args = bench_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.train_images = 1, 1, args.train_images or 2048
    pipelines = tuple(p.strip() for p in args.pipelines.split(",") if p.strip())
    from fmnist_jax.bench import PIPELINES

    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown or not pipelines:
        raise FmnistError(f"unknown pipelines {unknown}: choose from {', '.join(PIPELINES)}")
    if args.epochs < 1 or args.seeds < 1:
        raise FmnistError("--epochs and --seeds must be at least 1")
    if args.train_images is not None and args.train_images < 64:
        raise FmnistError(f"--train-images must be at least 64, got {args.train_images}")
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    # JAX and torch share the GPU in this process: JAX must not grab 75% of it at start.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from fmnist_jax import bench, data

    device = args.device
    if device == "auto":
        device = "cuda" if jax.default_backend() == "gpu" and _torch_has_cuda() else "cpu"
    if device == "cuda" and jax.default_backend() != "gpu":
        raise FmnistError("--device cuda, but JAX sees no GPU: install jax with CUDA or use cpu")
    settings = bench.BenchSettings(epochs=args.epochs, seeds=args.seeds, pipelines=pipelines,
                                   torch_device=device, torch_compile=args.torch_compile)
    train, test = data.load_fashion_mnist(data_dir=args.data_dir, manual_dir=args.manual_dir)
    if args.train_images:
        train = data.Split(train.images_NxHxWx1[: args.train_images],
                           train.labels_N[: args.train_images])
    print(f"bench: {settings}", flush=True)
    result = bench.run_bench(train, test, settings)
    result["command"] = "python scripts/bench.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    bench.save(result, args.out)
    print(bench.markdown_table(result))
    print(f"wrote {args.out}")
    return 0


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
