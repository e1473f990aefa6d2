"""The four commands: train, evaluate, predict, bench. The scripts in scripts/ call these.

Each turns a user error (FmnistError, or a bad flag) into one `error: ...` line on stderr and
exit status 1, never a traceback. The training flags are made from `TrainConfig`'s fields,
so each hyperparameter is declared once, in `config.py`. Cheap checks (flags, config) come
before the expensive work (loading data, compiling). XLA's persistent compilation cache is
switched on here, before anything compiles (`--compile-cache`).
"""

from __future__ import annotations

import time

# When the command started (near enough: the interpreter's own start-up, ~50 ms, is before
# this line): a run logs how long it took to reach its first epoch from here.
STARTED = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, NoReturn  # noqa: E402

from fmnist_jax.run import interrupts  # noqa: E402
from fmnist_jax.run.config import DEFAULT_PRESET, PRESETS, TrainConfig, get_config  # noqa: E402
from fmnist_jax.errors import FmnistError  # noqa: E402

COMPILE_CACHE_ENV = "FMNIST_COMPILE_CACHE"
DEFAULT_COMPILE_CACHE = "~/.cache/fmnist_jax/xla"
COMPILE_CACHE_MAX_BYTES = 1 << 30  # a run's entries take under 1 MB


class Parser(argparse.ArgumentParser):
    """argparse that raises FmnistError (exit 1 with one line) instead of exiting 2."""

    def error(self, message: str) -> NoReturn:
        raise FmnistError(f"{message} (see --help)")


def user_errors_exit_1(main_fn: Callable[[list[str] | None], int | None]):
    """Wrap a main: FmnistError -> 'error: ...' on stderr and exit 1."""

    @functools.wraps(main_fn)
    def wrapped(argv: list[str] | None = None) -> None:
        try:
            with interrupts.remembered():
                code = main_fn(argv)
                interrupts.raise_if_pending()  # swallowed before the command's last check
        except FmnistError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            # Ctrl-C can land while XLA compiles in its own threads; a normal interpreter
            # teardown then races those threads and can segfault. Nothing is left to clean
            # up here (a run folder not yet trained in is given back on the way out), so
            # flush and leave at once.
            print("interrupted", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        sys.exit(code or 0)

    return wrapped


# ---------------------------------------------------------------------------------------
# Flags shared by several commands


def _float_or_none(text: str) -> float | None:
    return None if text.strip().lower() == "none" else float(text)


_float_or_none.__name__ = "float-or-none"  # argparse names the type in its error message


def _flag_type(hint: Any) -> Callable[[str], Any]:
    allowed = typing.get_args(hint) or (hint,)
    if type(None) in allowed:
        return _float_or_none
    return allowed[0]  # int, float or str


def add_config_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (`batch_size` -> `--batch-size`), with its help text and
    the default preset's value. A flag the user does not give is absent from the parsed
    namespace, so the chosen preset's value stands."""
    group = parser.add_argument_group(
        "config", f"override a field of the preset (defaults shown are {DEFAULT_PRESET}'s)")
    hints = typing.get_type_hints(TrainConfig)
    default_cfg = PRESETS[DEFAULT_PRESET].config
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        flag_type = _flag_type(hints[field.name])
        choices = field.metadata["choices"]
        metavar = ("{" + ",".join(choices) + "}" if choices else
                   {int: "N", float: "X", _float_or_none: "X|none"}.get(flag_type, "TEXT"))
        default = getattr(default_cfg, field.name)
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=flag_type,
                           default=argparse.SUPPRESS, metavar=metavar,
                           help=f"{field.metadata['help']} (default "
                                f"{'none' if default is None else default})".replace("%", "%%"))


def config_from_args(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """The preset of `args.preset` with every config flag the user gave, and `fixed`."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    return get_config(args.preset or DEFAULT_PRESET, **{**given, **fixed})


def _add_preset_flag(parser: argparse.ArgumentParser) -> None:
    presets = "; ".join(f"{name}: {preset.about}" for name, preset in PRESETS.items())
    parser.add_argument("--preset", default=None,
                        help=f"named recipe (default {DEFAULT_PRESET}). {presets}"
                        .replace("%", "%%"))


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "data", "the official release through tfds (default), or Kaggle's two CSV files")
    group.add_argument("--data-dir", help="tfds data dir holding (or to hold) the prepared "
                       "dataset; default $FMNIST_DATA_DIR or ~/tensorflow_datasets")
    group.add_argument("--manual-dir", help="folder with the four official Fashion-MNIST .gz "
                       "files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                       "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), for machines "
                       "without internet; default $FMNIST_MANUAL_DIR")
    group.add_argument("--train-csv", metavar="FILE", help="Kaggle's fashion-mnist_train.csv "
                       "(header label,pixel1,...,pixel784): read instead of the tfds folder; "
                       "needs --test-csv")
    group.add_argument("--test-csv", metavar="FILE", help="Kaggle's fashion-mnist_test.csv")


def _add_compile_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile-cache", metavar="DIR|none",
                        help=f"folder of XLA's persistent compilation cache: a later run with "
                             f"the same shapes loads its compiled epoch from there instead of "
                             f"compiling again (delete the folder any time); none: no cache. "
                             f"Default ${COMPILE_CACHE_ENV} or {DEFAULT_COMPILE_CACHE}")


def _add_device_flags(parser: argparse.ArgumentParser, *, distributed: bool,
                      seeds: bool) -> None:
    seeds_text = (". With --seeds K the devices are first shared out to groups of seeds (on "
                  "a CPU, every device a group; on a GPU, G groups, G the greatest common "
                  "divisor of K and the device count), and each batch is split over the "
                  "devices of its group") if seeds else ""
    group = parser.add_argument_group(
        "devices", "every batch is split over all devices (data parallel); the batch sizes "
                   "must be multiples of the device count" + seeds_text)
    group.add_argument("--cpu-devices", type=int, metavar="N",
                       help="split the CPU into N XLA devices (no effect where a GPU is the "
                            "device); default $FMNIST_CPU_DEVICES, else 1" + (
                                ", or with --seeds K one per core, up to one per seed "
                                "(one group of seeds per core)" if seeds else ""))
    if not distributed:
        return
    group.add_argument("--num-processes", type=int, metavar="N",
                       help="train with N processes together (one per host, say), each "
                            "started with the same flags and its own --process-id; default "
                            "$FMNIST_NUM_PROCESSES, else 1")
    group.add_argument("--process-id", type=int, metavar="I",
                       help="this process's number, 0..N-1 (process 0 logs and writes the "
                            "run folder); default $FMNIST_PROCESS_ID")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="where process 0 listens for the others (a free port on its "
                            "host); default $FMNIST_COORDINATOR_ADDRESS")


def start_devices(args: argparse.Namespace, *, members: int = 1):
    """Set up the devices the flags ask for, before jax starts its backend: the CPU device
    count (for a run of `members` seeds on one process, one device per core by default:
    `parallel.cpu_devices_for`), then (with several processes) join the others through
    jax.distributed. Returns the distributed settings."""
    from fmnist_jax.run import parallel

    settings = parallel.distributed_settings(getattr(args, "coordinator_address", None),
                                             getattr(args, "num_processes", None),
                                             getattr(args, "process_id", None))
    parallel.use_cpu_devices(args.cpu_devices, default=(
        parallel.cpu_devices_for(members) if settings.num_processes == 1 else None))
    parallel.initialize_distributed(settings)
    return settings


def use_compile_cache(choice: str | None) -> Path | None:
    """Point XLA's persistent compilation cache at `choice` (else $FMNIST_COMPILE_CACHE, else
    ~/.cache/fmnist_jax/xla; "none": off) and return the folder. Must run before anything
    compiles: jax reads the setting when it first compiles."""
    chosen = choice or os.environ.get(COMPILE_CACHE_ENV) or DEFAULT_COMPILE_CACHE
    if chosen.strip().lower() == "none":
        return None
    path = Path(chosen).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        # jax would only warn on every write; say it once, before the data loads.
        raise FmnistError(f"cannot write the compile cache {path} ({e.strerror or e}): pass "
                          f"--compile-cache another folder, or none") from e
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program: jax's default skips those compiled in under a second, and on a
    # quiet machine each of ours is (but several together, on a busy one, take many).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        import filelock  # noqa: F401
    except ImportError:
        return path
    # A size limit makes jax hold a file lock around each read and write (without one, two
    # runs started together can read an entry half written; jax then warns and compiles)
    # and evict the least recently used entries, so the folder cannot grow without end.
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return path


def _load_data(args: argparse.Namespace):
    from fmnist_jax import data

    return data.load(data_dir=args.data_dir, manual_dir=args.manual_dir,
                     train_csv=args.train_csv, test_csv=args.test_csv)


# ---------------------------------------------------------------------------------------
# train


def train_parser() -> Parser:
    parser = Parser(prog="train.py",
                    description="Train a Fashion-MNIST classifier with JAX/Flax, then write "
                                "its evaluation report.")
    _add_preset_flag(parser)
    add_config_flags(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--workdir", help="run folder: a new or empty folder (default "
                     "runs/PRESET-seedN-TIMESTAMP-PID; with --seeds K > 1, "
                     "runs/PRESET-seedsN-M-TIMESTAMP-PID, holding a run folder seed-S per seed)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the interrupted run in RUN_DIR from its latest checkpoint, "
                          "with its stored config (config flags may only repeat its values); "
                          "the folder of a run of several seeds continues every seed; "
                          "a finished run is left as it is (exit 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--no-report", action="store_true",
                     help="skip the evaluation report at the end (scripts/evaluate.py)")
    _add_compile_cache_flag(run)
    _add_device_flags(parser, distributed=True, seeds=True)
    _add_data_flags(parser)
    return parser


@user_errors_exit_1
def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    from fmnist_jax.run import parallel

    settings = parallel.distributed_settings(args.coordinator_address, args.num_processes,
                                             args.process_id)
    several = settings.num_processes > 1
    if several and not (args.workdir or args.resume):
        raise FmnistError("several processes need --workdir: the same run folder for all, on "
                          "a filesystem they share")
    if args.resume:  # its stored config, read before the devices start (a run of seeds
        # gets a CPU device per core); None when it has finished
        cfg = _resumed_config(args, speak=settings.process_id == 0)
        if cfg is None:
            return 0
    else:
        cfg = config_from_args(args)  # bad flags fail before joining
    use_compile_cache(args.compile_cache)
    start_devices(args, members=cfg.seeds)
    import jax

    from fmnist_jax.run import folder
    from fmnist_jax.run.loop import train_and_evaluate

    if not parallel.is_writer():
        # Process 0 speaks for the run (the data's notes included); the others print only
        # their errors, on stderr.
        sys.stdout = open(os.devnull, "w")

    parallel.check_batch_sizes(cfg.batch_size, cfg.eval_batch_size, jax.device_count(),
                               cfg.seeds)
    # Claim the run folder (or take back the one --resume names) before the data loads: a
    # bad or taken folder fails at once. With several processes only process 0 claims it
    # (`folder.claim`, `folder.reopen`); the others learn its verdict.
    refused = None
    try:
        run = folder.reopen(args.resume) if args.resume else folder.claim(
            args.workdir or folder.default_workdir(args.preset or DEFAULT_PRESET, cfg.seed,
                                                 cfg.seeds), cfg)
    except FmnistError as e:
        refused = e
    if not parallel.process_0_agrees(refused is None):
        raise refused or FmnistError(f"process 0 refused the run folder "
                                     f"{args.resume or args.workdir}: see its error")
    try:
        train, test = _load_data(args)
    except BaseException:
        folder.abandon(run)
        raise
    train_and_evaluate(cfg, run, train=train, test=test, progress=not args.no_progress,
                       started=STARTED)
    if several:  # the report is one process's work; it reads what the run saved
        if parallel.is_writer() and not args.no_report:
            print(f"for the evaluation report, run: python scripts/evaluate.py {run.path}")
        return 0
    if not args.no_report:
        from fmnist_jax.evaluation.report import evaluate_run  # matplotlib: ~1 s to import, so only here

        for member in run.members or (run,):
            evaluate_run(member.path, train=train, test=test)
    return 0


def _resumed_config(args: argparse.Namespace, *, speak: bool = True) -> TrainConfig | None:
    """The stored config of the run --resume names, after checking the flags given with it
    agree with it; None (and, if `speak`, one line) when that run has already finished."""
    from fmnist_jax.run import folder

    if args.workdir:
        raise FmnistError("--workdir and --resume both name a run folder: pass only --resume")
    if args.preset:
        raise FmnistError("--preset cannot change a resumed run (it uses its stored config): "
                          "drop --preset")
    stored = folder.stored_config(args.resume)
    for field in dataclasses.fields(TrainConfig):
        if hasattr(args, field.name) and getattr(args, field.name) != getattr(stored,
                                                                              field.name):
            flag = "--" + field.name.replace("_", "-")
            raise FmnistError(f"{flag} {getattr(args, field.name)} contradicts the run's "
                              f"config ({getattr(stored, field.name)}): a resumed run keeps its "
                              f"config; drop {flag}, or start a new run")
    if folder.finished(args.resume):
        if speak:
            print(f"{args.resume} has already finished training: nothing to resume")
        return None
    return stored


# ---------------------------------------------------------------------------------------
# evaluate


def evaluate_parser() -> Parser:
    parser = Parser(prog="evaluate.py",
                    description="Evaluate a run folder: classification report, confidence "
                                "intervals, calibration before and after temperature scaling, "
                                "PNGs.")
    parser.add_argument("run_dir", help="a folder written by scripts/train.py (the folder of a "
                                        "--seeds run: every seed's run is evaluated)")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples for the 95%% intervals (default 1000)")
    _add_compile_cache_flag(parser)
    _add_data_flags(parser)
    return parser


@user_errors_exit_1
def evaluate_main(argv: list[str] | None = None) -> int:
    args = evaluate_parser().parse_args(argv)
    if args.resamples < 1:
        raise FmnistError(f"--resamples must be at least 1, got {args.resamples}")
    use_compile_cache(args.compile_cache)
    from fmnist_jax.run import folder
    from fmnist_jax.evaluation.report import evaluate_run, load_run

    # The folder of a run of several seeds: every seed's run, one report each.
    run_dirs = folder.seed_run_dirs(args.run_dir) or [Path(args.run_dir)]
    loaded = [load_run(run_dir) for run_dir in run_dirs]  # damaged ones fail before the data
    train, test = _load_data(args)
    for run_dir, run in zip(run_dirs, loaded):
        evaluate_run(run_dir, train=train, test=test, n_resamples=args.resamples, run=run)
    return 0


# ---------------------------------------------------------------------------------------
# predict

NUM_CLASSES = 10  # as models.NUM_CLASSES


def predict_parser() -> Parser:
    parser = Parser(
        prog="predict.py",
        description="Predict the Fashion-MNIST class of images with a trained run folder.",
        epilog="Images: PNG, JPEG, BMP, GIF, TIFF, WEBP or PPM/PGM pictures (any size up to "
               "64 megapixels, colour or grey), "
               "or .npy arrays of shape (28, 28), (28, 28, 1), (N, 28, 28) or (N, 28, 28, 1), "
               "uint8 or floats in [0, 1]. Fashion-MNIST garments are light on black: pass "
               "--dark-on-light for photos on a white background.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by scripts/train.py")
    parser.add_argument("files", metavar="FILE", nargs="+", help="image or .npy files")
    parser.add_argument("--top-k", type=int, default=3, metavar="K",
                        help=f"how many classes to show per image, 1..{NUM_CLASSES} (default 3)")
    parser.add_argument("--dark-on-light", action="store_true",
                        help="invert the images (255 - x): for garments darker than their "
                             "background, as in ordinary photos and product shots")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of text")
    return parser


@user_errors_exit_1
def predict_main(argv: list[str] | None = None) -> int:
    """A bad run folder or flag stops everything with one line. A bad input file is one
    `error: FILE: ...` line and does not stop the others: every readable file is still
    predicted, and the exit status is 1 at the end, so a script sees that one failed."""
    args = predict_parser().parse_args(argv)
    if not 1 <= args.top_k <= NUM_CLASSES:
        raise FmnistError(f"--top-k must be between 1 and {NUM_CLASSES}, got {args.top_k}")
    import numpy as np

    from fmnist_jax.evaluation import predict

    predictor = predict.load_predictor(args.run_dir)
    loaded: list[tuple[str, np.ndarray]] = []  # (file as given, its images (N, 28, 28, 1))
    errors: list[dict[str, str]] = []
    for file in args.files:
        try:
            loaded.append((file, predict.load_images(file, dark_on_light=args.dark_on_light)))
        except FmnistError as e:  # the message starts with the file's name
            print(f"error: {e}", file=sys.stderr)
            errors.append({"file": file, "error": str(e)})

    results = []
    if loaded:
        probs_NxC = predict.predict_probs(predictor,
                                          np.concatenate([images for _, images in loaded]))
        ranked = iter(predict.top_k(probs_NxC, args.top_k))
        for file, images in loaded:
            for index in range(len(images)):
                results.append({"file": file, "index": index, "images_in_file": len(images),
                                "predictions": next(ranked)})
    if args.json:
        print(predict.format_json(args.run_dir, predictor, results, errors, args.dark_on_light))
    else:
        print(predict.format_text(args.run_dir, predictor, results))
    return 1 if errors else 0


# ---------------------------------------------------------------------------------------
# bench

QUICK_TRAIN_IMAGES = 2048


def bench_parser() -> Parser:
    parser = Parser(prog="bench.py",
                    description="JAX against the PyTorch baseline on one preset's recipe: same "
                                "init, alternating epochs, one run on this machine. Trains on "
                                "all 60,000 training images (no validation split).")
    _add_preset_flag(parser)
    add_config_flags(parser, skip=("seed", "seeds", "val_fraction", "checkpoint_every",
                                   "patience"))
    bench = parser.add_argument_group("bench")
    bench.add_argument("--num-seeds", type=int, default=3,
                       help="train each pipeline with seeds 0..N-1 (default 3)")
    bench.add_argument("--pipelines", default="jax,torch-tensors,torch-dataloader",
                       help="comma-separated: jax; torch-tensors (the split as tensors on the "
                            "device, index batches); torch-dataloader (per-sample Dataset and "
                            "DataLoader)")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto: CUDA when JAX and torch both see a GPU, else CPU")
    bench.add_argument("--torch-compile", action="store_true",
                       help="torch.compile the torch-tensors pipeline's model")
    bench.add_argument("--train-images", type=int, help="use only the first N training images")
    bench.add_argument("--quick", action="store_true",
                       help=f"1 epoch, 1 seed, {QUICK_TRAIN_IMAGES:,} training images: a smoke "
                            f"test")
    bench.add_argument("--out", default="bench.json",
                       help="JSON results file (default bench.json); an existing file is "
                            "refused unless --overwrite is given")
    bench.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out file")
    _add_compile_cache_flag(bench)
    _add_device_flags(parser, distributed=False, seeds=False)
    _add_data_flags(parser)
    return parser


@user_errors_exit_1
def bench_main(argv: list[str] | None = None) -> int:
    args = bench_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.num_seeds = 1, 1
        args.train_images = args.train_images or QUICK_TRAIN_IMAGES
    from fmnist_jax.baseline import bench

    pipelines = tuple(p.strip() for p in args.pipelines.split(",") if p.strip())
    settings = bench.BenchSettings(
        config=bench.bench_config(args.preset or DEFAULT_PRESET, **{
            f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if hasattr(args, f.name)}),
        num_seeds=args.num_seeds, pipelines=pipelines, torch_compile=args.torch_compile)
    bench.check_settings(settings)
    if args.train_images is not None and args.train_images < settings.config.batch_size:
        raise FmnistError(f"--train-images must be at least the batch size "
                          f"({settings.config.batch_size}), got {args.train_images}")
    bench.check_out(args.out, overwrite=args.overwrite)  # before hours of benchmark, not after
    use_compile_cache(args.compile_cache)
    start_devices(args)
    import jax

    from fmnist_jax.run.parallel import check_batch_sizes

    check_batch_sizes(settings.config.batch_size, settings.config.eval_batch_size,
                      jax.device_count())
    settings = dataclasses.replace(settings, torch_device=bench.choose_device(args.device))
    train, test = _load_data(args)
    if args.train_images:
        from fmnist_jax.data import Split

        train = Split(train.images_NxHxWx1[: args.train_images],
                      train.labels_N[: args.train_images])
    print(f"bench: {settings}", flush=True)
    result = bench.run_bench(train, test, settings)
    result["command"] = "python scripts/bench.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    print(bench.markdown_table(result))  # first: the numbers survive a failing save
    bench.save(result, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0
