"""The six commands: train, evaluate, compare, predict, export, bench. The scripts in scripts/
call these.

Each turns a user error (FmnistError, or a bad flag) into one `error: ...` line on stderr and
exit status 1, never a traceback (`cli_flags`, with the flags the commands share). Cheap
checks (flags, config) come before the expensive work (loading data, compiling). XLA's
persistent compilation cache is switched on before anything compiles (`--compile-cache`).
"""

from __future__ import annotations

import time

# When the command started (near enough: the interpreter's own start-up, ~50 ms, is before
# this line): a run logs how long it took to reach its first epoch from here.
STARTED = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from fmnist_jax.cli_flags import (CALIBRATIONS, Parser, add_calibration_flag,  # noqa: E402
                                  add_compile_cache_flag, add_config_flags,
                                  add_data_flags, add_device_flags, add_preset_flag,
                                  config_from_args, load_data, start_devices,
                                  use_compile_cache, user_errors_exit_1)
from fmnist_jax.cli_resume import (command_options, continue_hint,  # noqa: E402
                                   report_command, resumed_config, take_recorded_options)
from fmnist_jax.errors import FmnistError  # noqa: E402
from fmnist_jax.run.config import TEACHER_FIELDS, TrainConfig  # noqa: E402
from fmnist_jax.run.presets import DEFAULT_PRESET  # noqa: E402

# ---------------------------------------------------------------------------------------
# train


def train_parser() -> Parser:
    parser = Parser(prog="train.py",
                    description="Train a Fashion-MNIST classifier with JAX/Flax, then write "
                                "its evaluation report.")
    add_preset_flag(parser)
    add_config_flags(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--workdir", help="run folder: a new or empty folder (default "
                     "runs/PRESET-seedN-TIMESTAMP-PID; with --seeds K > 1, "
                     "runs/PRESET-seedsN-M-TIMESTAMP-PID, holding a run folder seed-S per seed; "
                     "with --sweep, runs/PRESET-sweep-seedN-TIMESTAMP-PID (or -sweep-seedsN-M-), "
                     "holding a run folder POINT/seed-S per grid point and seed)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the interrupted run in RUN_DIR from its latest checkpoint, "
                          "with its stored config (config flags may only repeat its values); "
                          "the folder of a run of several seeds continues every seed; "
                          "a finished run is left as it is (exit 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--report", action=argparse.BooleanOptionalAction, default=None,
                     help="write the evaluation report at the end (scripts/evaluate.py), or "
                          "skip it (--no-report); default: write it, and on a --resume, the "
                          "choice the run began with")
    add_calibration_flag(run)
    add_compile_cache_flag(run)
    add_device_flags(parser, distributed=True, seeds=True)
    add_data_flags(parser)
    return parser


@user_errors_exit_1
def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    _check_train_flags(args)
    from fmnist_jax.run import folder, interrupts, parallel

    settings = parallel.distributed_settings(args.coordinator_address, args.num_processes,
                                             args.process_id, args.connect_timeout)
    several = settings.num_processes > 1
    if several and not (args.workdir or args.resume):
        raise FmnistError("several processes need --workdir: the same run folder for all, on "
                          "a filesystem they share")
    given = {"calibration": args.calibration is not None, "report": args.report is not None}
    data_note = take_recorded_options(args, args.resume)
    _check_report_flags(args, given)
    if args.resume:  # its stored config, read before the devices start (a run of seeds
        # gets a CPU device per core); None when it has finished
        cfg = resumed_config(args, speak=settings.process_id == 0)
        if cfg is None:
            return 0
    else:
        cfg = config_from_args(args)  # bad flags fail before joining
    if args.calibration != CALIBRATIONS[0] and cfg.val_fraction == 0:
        raise FmnistError(f"--calibration {args.calibration} is fit on the validation split, "
                          f"and this run holds none: pass --val-fraction > 0, or drop "
                          f"--calibration")
    if cfg.teacher:  # its folders, before any data loads
        from fmnist_jax.run.teacher import teacher_dirs

        teacher_dirs(cfg)
    use_compile_cache(args.compile_cache)
    members = len(cfg.members()) if cfg.many else 1
    start_devices(args, members=members)
    import jax

    from fmnist_jax.run import peers, results
    from fmnist_jax.run.loop import train_and_evaluate

    if not parallel.is_writer():
        # Process 0 speaks for the run (the data's notes included); the others print only
        # their errors, on stderr.
        sys.stdout = open(os.devnull, "w")
    # The first line names the device, so a run that expected a GPU shows at once where it is.
    print(f"device: {parallel.describe_devices(members)}, jax {jax.__version__}", flush=True)

    parallel.check_batch_sizes(cfg.batch_size, cfg.eval_batch_size, jax.device_count(),
                               members)
    # Claim the run folder (or take back the one --resume names) before the data loads: a
    # bad or taken folder fails at once. With several processes only process 0 claims it
    # (`folder.claim`, `folder.reopen`); the others learn its verdict.
    refused = None
    try:
        run = folder.reopen(args.resume) if args.resume else folder.claim(
            args.workdir or folder.default_workdir(args.preset or DEFAULT_PRESET, cfg.seed,
                                                 cfg.seeds, bool(cfg.sweep)), cfg,
            command_options(args))
    except FmnistError as e:
        refused = e
    if not parallel.process_0_agrees(refused is None):
        raise refused or FmnistError(f"process 0 refused the run folder "
                                     f"{args.resume or args.workdir}: see its error")
    peers.PeerWatch.run_folder = str(run.path)  # a process that stops: how to go on
    try:
        if data_note and parallel.is_writer():
            print(data_note, file=sys.stderr, flush=True)
        train, test = load_data(args)
        interrupts.raise_if_pending()  # swallowed while a data file was read
    except BaseException:
        folder.abandon(run)
        raise
    claims = run.members or (run,)
    # A seed resumed and reported on its own (with this map) is not evaluated again.
    reported = {c.path for c in claims if folder.finished(c.path)
                and results.has_reports(c.path, calibration=args.calibration)}
    with continue_hint(run, args.calibration, "train"):
        train_and_evaluate(cfg, run, train=train, test=test, progress=not args.no_progress,
                           started=STARTED)
    if several:  # the report is one process's work; it reads what the run saved
        if parallel.is_writer() and args.report:
            print(f"for the evaluation report, run: {report_command(run.path, args.calibration)}")
        return 0
    if args.report:
        # matplotlib takes about a second to import: only here
        from fmnist_jax.evaluation.report import evaluate_run

        with continue_hint(run, args.calibration, "report"):
            for member in (c for c in claims if c.path not in reported):
                evaluate_run(member.path, train=train, test=test, calibration=args.calibration)
        if run.members and not cfg.sweep:
            from fmnist_jax.evaluation import over_seeds

            over_seeds.write_summary(run.path)
    return 0


def _check_train_flags(args: argparse.Namespace) -> None:
    """FmnistError for an empty run folder, which would be read as none given (so a new run
    would start in a default folder)."""
    if args.resume is not None and not args.resume.strip():
        raise FmnistError("--resume needs the run folder to continue, got an empty value")
    if args.workdir is not None and not args.workdir.strip():
        raise FmnistError("--workdir needs the run folder to train in, got an empty value: "
                          "pass a folder, or drop --workdir for the default one")


def _check_report_flags(args: argparse.Namespace, given: dict[str, bool]) -> None:
    """FmnistError for a --calibration given without the report that fits it (`given`: which
    of the two the user passed; a resume's other one is the run's)."""
    if args.report or args.calibration == CALIBRATIONS[0] or not given["calibration"]:
        return
    why, fix = (("--no-report writes no report", "drop one of them") if given["report"] else
                ("the run was begun with --no-report, which its resume keeps",
                 "pass --report as well, or drop --calibration"))
    raise FmnistError(f"--calibration {args.calibration} is the report's map, and {why}: "
                      f"{fix} (evaluate.py --calibration {args.calibration} fits it later)")


# ---------------------------------------------------------------------------------------
# evaluate


def evaluate_parser() -> Parser:
    parser = Parser(prog="evaluate.py",
                    description="Evaluate a run folder: classification report, confidence "
                                "intervals, calibration maps fit on validation, PNGs.")
    parser.add_argument("run_dir", help="a folder written by scripts/train.py (the folder of a "
                                        "--seeds run: every seed's run is evaluated)")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples for the 95%% intervals (default 1000)")
    add_calibration_flag(parser)
    parser.add_argument("--tta", choices=("none", "flip"), default="none",
                        help="flip: also report the test accuracy with each image's "
                             "probabilities averaged with its mirror image's, apart from the "
                             "model's own (twice the inference cost); default none")
    add_compile_cache_flag(parser)
    add_data_flags(parser)
    return parser


@user_errors_exit_1
def evaluate_main(argv: list[str] | None = None) -> int:
    args = evaluate_parser().parse_args(argv)
    if args.resamples < 1:
        raise FmnistError(f"--resamples must be at least 1, got {args.resamples}")
    data_note = take_recorded_options(args, args.run_dir)  # the run's map and data
    use_compile_cache(args.compile_cache)
    from fmnist_jax.run import folder, results
    from fmnist_jax.evaluation.report import evaluate_run, load_run

    # The folder of a run of several seeds: every seed's run, one report each.
    run_dirs = folder.seed_run_dirs(args.run_dir) or [Path(args.run_dir)]
    loaded = [load_run(run_dir) for run_dir in run_dirs]  # damaged ones fail before the data
    for run_dir in run_dirs:
        results.check_report_paths(run_dir)
    if args.calibration != CALIBRATIONS[0]:
        unsplit = [d for d, run in zip(run_dirs, loaded) if run.config.val_fraction == 0]
        if unsplit:
            raise FmnistError(f"--calibration {args.calibration} is fit on the validation "
                              f"split, and {unsplit[0]} holds none (val_fraction 0): drop "
                              f"--calibration, or train a run with --val-fraction > 0")
    if data_note:
        print(data_note, file=sys.stderr, flush=True)
    train, test = load_data(args)
    for run_dir, run in zip(run_dirs, loaded):
        evaluate_run(run_dir, train=train, test=test, n_resamples=args.resamples, run=run,
                     calibration=args.calibration, tta=args.tta)
    if len(run_dirs) > 1 and not folder.stored_config(args.run_dir).sweep:
        from fmnist_jax.evaluation import over_seeds

        over_seeds.write_summary(args.run_dir)
    return 0


# ---------------------------------------------------------------------------------------
# compare


def compare_parser() -> Parser:
    parser = Parser(prog="compare.py",
                    description="Compare two runs of several seeds seed by seed: for each "
                                "figure of their evaluation reports, B - A on every seed they "
                                "share, and its mean with a paired 95% interval.",
                    epilog="Both folders are `--seeds K` runs, evaluated (train.py does it at "
                           "the end; evaluate.py again, with --tta flip for the flip TTA "
                           "figures). Pair runs trained with the same --seed and --seeds.")
    parser.add_argument("run_a", metavar="RUN_A", help="the baseline: a --seeds run folder")
    parser.add_argument("run_b", metavar="RUN_B", help="the candidate: a --seeds run folder")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of text")
    return parser


@user_errors_exit_1
def compare_main(argv: list[str] | None = None) -> int:
    args = compare_parser().parse_args(argv)
    import json

    from fmnist_jax.evaluation import over_seeds

    for run_dir in (args.run_a, args.run_b):
        if not Path(run_dir).is_dir():
            raise FmnistError(f"{run_dir} is no folder: give two run folders of --seeds runs")
    comparison = over_seeds.compare(args.run_a, args.run_b)
    if args.json:
        print(json.dumps(comparison, indent=2, sort_keys=True))
    else:
        print("\n".join(over_seeds.comparison_lines(comparison)))
    return 0


# ---------------------------------------------------------------------------------------
# predict

NUM_CLASSES = 10  # as models.NUM_CLASSES


def predict_parser() -> Parser:
    parser = Parser(
        prog="predict.py",
        description="Predict the Fashion-MNIST class of images with a trained run folder.",
        epilog="Images: PNG, JPEG, BMP, GIF, TIFF, WEBP or PPM/PGM pictures (from 8x8 "
               "up to 64 megapixels, colour or grey), "
               "or .npy arrays of shape (28, 28), (28, 28, 1), (N, 28, 28) or (N, 28, 28, 1), "
               "uint8 or floats in [0, 1]. Fashion-MNIST garments are light on black: pass "
               "--dark-on-light for photos on a white background.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="run folder written by scripts/train.py, or a .stablehlo file "
                             "written by scripts/export.py (with its .json beside it)")
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

    if Path(args.run_dir).is_file():  # an exported StableHLO file
        from fmnist_jax.evaluation.export import load_exported

        predictor = load_exported(args.run_dir)
    else:
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
# export


def export_parser() -> Parser:
    parser = Parser(prog="export.py",
                    description="Export a run's model: stablehlo (jax.export: the whole "
                                "inference, uint8 images in, calibrated probabilities out, "
                                "run by jax alone), onnx (the same function as an ONNX graph), "
                                "or torch (a state_dict for the PyTorch baseline's model). A "
                                "JSON beside the file says what it holds.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a finished run folder (of a --seeds run: one seed's, RUN/seed-S)")
    parser.add_argument("--format", required=True, choices=("stablehlo", "onnx", "torch"),
                        help="one of the three formats described above (required)")
    parser.add_argument("--out", metavar="FILE",
                        help="the file to write (default RUN_DIR/model.stablehlo, .onnx or "
                             ".pt); its JSON goes to FILE.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file and its JSON")
    parser.add_argument("--logits", action="store_true",
                        help="stablehlo and onnx: return the logits too, after the "
                             "probabilities")
    return parser


@user_errors_exit_1
def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    from fmnist_jax.evaluation import export

    exporters = {}
    if args.format == "torch":
        from fmnist_jax.baseline.export_torch import export_torch

        exporters["torch"] = export_torch
    elif args.format == "onnx":
        from fmnist_jax.evaluation.export_onnx import export_onnx

        exporters["onnx"] = export_onnx
    path = export.export_run(args.run_dir, args.format, args.out, overwrite=args.overwrite,
                             logits=args.logits, exporters=exporters)
    print(f"wrote {path} and {export.meta_path(path)}")
    return 0


# ---------------------------------------------------------------------------------------
# bench

QUICK_TRAIN_IMAGES = 2048
BENCH_SEEDS = 3


def bench_parser() -> Parser:
    parser = Parser(prog="bench.py",
                    description="JAX against the PyTorch baseline on one preset's recipe: same "
                                "init, alternating epochs, one run on this machine. Trains on "
                                "all 60,000 training images (no validation split).")
    add_preset_flag(parser)
    add_config_flags(parser, skip=("seed", "seeds", "val_fraction", "val_seed",
                                   "checkpoint_every", "patience", "sweep", *TEACHER_FIELDS))
    bench = parser.add_argument_group("bench")
    bench.add_argument("--num-seeds", type=int, default=None,
                       help=f"train each pipeline with seeds 0..N-1 (default {BENCH_SEEDS})")
    bench.add_argument("--pipelines", default="jax,torch-tensors,torch-dataloader",
                       help="comma-separated: jax; torch-tensors (the split as tensors on the "
                            "device, index batches); torch-dataloader (per-sample Dataset and "
                            "DataLoader)")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto: CUDA when JAX (and torch, for its pipelines) sees a GPU, "
                            "else CPU")
    bench.add_argument("--torch-compile", action="store_true",
                       help="torch.compile the torch-tensors pipeline's model")
    bench.add_argument("--train-images", type=int, help="use only the first N training images")
    bench.add_argument("--quick", action="store_true",
                       help=f"1 epoch, 1 seed, {QUICK_TRAIN_IMAGES:,} training images: a smoke "
                            f"test (--epochs, --num-seeds or --train-images, given, win over "
                            f"these)")
    bench.add_argument("--out", default="bench.json",
                       help="JSON results file (default bench.json); an existing file is "
                            "refused unless --overwrite is given")
    bench.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out file")
    add_compile_cache_flag(bench)
    add_device_flags(parser, distributed=False, seeds=False, device=False)
    add_data_flags(parser)
    return parser


@user_errors_exit_1
def bench_main(argv: list[str] | None = None) -> int:
    args = bench_parser().parse_args(argv)
    if args.quick:  # its sizes, where the user gave none (the flags win)
        if not hasattr(args, "epochs"):
            args.epochs = 1
        if args.num_seeds is None:
            args.num_seeds = 1
        if args.train_images is None:
            args.train_images = QUICK_TRAIN_IMAGES
    if args.num_seeds is None:
        args.num_seeds = BENCH_SEEDS
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
    settings = dataclasses.replace(settings, torch_device=bench.choose_device(
        args.device, torch_pipelines=any(p.startswith("torch") for p in pipelines)))
    train, test = load_data(args)
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
