"""What the four commands share: a parser whose errors are one line, the wrapper that turns
a user error into `error: ...` and exit 1, the flags made from `TrainConfig`'s fields (each
hyperparameter is declared once, in `run/config.py`), the data, device and compile-cache
flags, and what they set up.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, NoReturn

from fmnist_jax.errors import FmnistError
from fmnist_jax.run import interrupts
from fmnist_jax.run.config import TrainConfig, canonical_sweep, flag_words, parse_sweep
from fmnist_jax.run.presets import DEFAULT_PRESET, PRESETS, get_config

COMPILE_CACHE_ENV = "FMNIST_COMPILE_CACHE"
DEFAULT_COMPILE_CACHE = "~/.cache/fmnist_jax/xla"
COMPILE_CACHE_MAX_BYTES = 1 << 30  # a run's entries take under 1 MB
DEVICE_ENV = "FMNIST_DEVICE"
DEVICES = ("auto", "cpu", "cuda")
CUDA_INSTALL = 'pip install -e ".[cuda12]" (or ".[cuda13]" for a CUDA 13 driver)'


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
            if "fmnist_jax.run.peers" in sys.modules:  # several processes: ends them here
                sys.modules["fmnist_jax.run.peers"].leave_with_error(str(e))
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt as e:
            # Ctrl-C (or SIGTERM) can land while XLA compiles in its own threads; a normal
            # interpreter teardown then races those threads and can segfault. Nothing is left
            # to clean up here (a run folder not yet trained in is given back on the way
            # out), so flush and leave at once, with the status the signal would have given.
            terminated = isinstance(e, interrupts.Terminated)
            hint = f": {e}" if str(e) else ""  # what continues the run (`cli_resume.continue_hint`)
            print(("terminated" if terminated else "interrupted") + hint, file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(143 if terminated else 130)
        sys.exit(code or 0)

    return wrapped


# ---------------------------------------------------------------------------------------
# Flags shared by several commands


def _float_or_none(text: str) -> float | None:
    return None if text.strip().lower() == "none" else float(text)


_float_or_none.__name__ = "float-or-none"  # argparse names the type in its error message


def _int_or_none(text: str) -> int | None:
    return None if text.strip().lower() == "none" else int(text)


_int_or_none.__name__ = "int-or-none"


def _text_or_none(text: str) -> str:
    return "" if text.strip().lower() == "none" else text


_text_or_none.__name__ = "text-or-none"


def _flag_type(hint: Any, choices: tuple[str, ...] | None = None) -> Callable[[str], Any]:
    allowed = typing.get_args(hint) or (hint,)
    if type(None) in allowed:
        return _int_or_none if int in allowed else _float_or_none
    if allowed[0] is str and choices is None:  # --teacher: none is its empty default
        return _text_or_none
    return allowed[0]  # int, float or str


class _SweepAction(argparse.Action):
    """--sweep NAME=V1,V2,...: each flag adds a field to the grid, kept as the config stores
    it (`canonical_sweep`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parts = [getattr(namespace, self.dest, ""), values]
        setattr(namespace, self.dest, canonical_sweep([part for part in parts if part]))


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
        choices = field.metadata["choices"]
        flag_type = _flag_type(hints[field.name], choices)
        metavar = ("{" + ",".join(choices) + "}" if choices else
                   {int: "N", float: "X", _float_or_none: "X|none",
                    _int_or_none: "N|none", _text_or_none: "TEXT|none"}.get(flag_type, "TEXT"))
        default = getattr(default_cfg, field.name)
        if field.name == "sweep":  # repeated, one field each time
            group.add_argument("--sweep", dest="sweep", action=_SweepAction,
                               default=argparse.SUPPRESS, metavar="NAME=V1,V2,...",
                               help=f"{field.metadata['help']} (default none)".replace(
                                   "%", "%%"))
            continue
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=flag_type,
                           default=argparse.SUPPRESS, metavar=metavar,
                           help=f"{field.metadata['help']} (default "
                                f"{'none' if default in (None, '') else default})".replace(
                                    "%", "%%"))


def config_from_args(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """The preset of `args.preset` with every config flag the user gave, and `fixed`."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    for name in parse_sweep(given.get("sweep", "")):
        if name in given:  # the sweep would replace the flag's value without a word
            flag = "--" + name.replace("_", "-")
            raise FmnistError(f"{flag} {given[name]} and --sweep {name}=... both set "
                              f"{flag_words(name)}: drop {flag}, or its part of --sweep")
    return get_config(args.preset or DEFAULT_PRESET, **{**given, **fixed})


def add_preset_flag(parser: argparse.ArgumentParser) -> None:
    presets = "; ".join(f"{name}: {preset.about}" for name, preset in PRESETS.items())
    parser.add_argument("--preset", default=None,
                        help=f"named recipe (default {DEFAULT_PRESET}). {presets}"
                        .replace("%", "%%"))


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    from fmnist_jax.data import DATA_SOURCES

    group = parser.add_argument_group(
        "data", "the official release (through tfds, or its four .gz files read with "
        "numpy), or Kaggle's two CSV files")
    group.add_argument("--data-dir", help="tfds data dir holding (or to hold) the prepared "
                       "dataset; default $FMNIST_DATA_DIR or ~/tensorflow_datasets")
    group.add_argument("--manual-dir", help="folder with the four official Fashion-MNIST .gz "
                       "files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                       "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), for machines "
                       "without internet; default $FMNIST_MANUAL_DIR")
    group.add_argument("--data-source", choices=DATA_SOURCES, default="auto",
                       help="how to read the official release: tfds's prepared folder, or "
                       "the four .gz files of --manual-dir with numpy alone (idx: no "
                       "tensorflow-datasets needed; the same arrays, in the same order); "
                       "default auto: tfds where it can read or build its folder, else idx")
    group.add_argument("--train-csv", metavar="FILE", help="Kaggle's fashion-mnist_train.csv "
                       "(header label,pixel1,...,pixel784): read instead of the tfds folder; "
                       "needs --test-csv")
    group.add_argument("--test-csv", metavar="FILE", help="Kaggle's fashion-mnist_test.csv")


# As run.results.CALIBRATION_KINDS (not imported: the flags parse before jax loads).
CALIBRATIONS = ("temperature", "vector", "dirichlet")


def add_calibration_flag(parser) -> None:
    """--calibration: the map the evaluation fits on validation and predict/export apply. An
    evaluation choice, not part of TrainConfig: recorded with the run's own options, and
    `cli_resume.take_recorded_options` sets it (None until then)."""
    parser.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                        help="calibration map fit on the validation split, written to "
                             "calibration.json and applied by predict and export: "
                             "temperature, vector (scaling) or dirichlet (ODIR); the report "
                             "compares all three either way. Default: the map the run was "
                             "begun with (train.py's --calibration), else temperature")


def add_compile_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile-cache", metavar="DIR|none",
                        help=f"folder of XLA's persistent compilation cache: a later run with "
                             f"the same shapes loads its compiled epoch from there instead of "
                             f"compiling again (delete the folder any time); none: no cache. "
                             f"Default ${COMPILE_CACHE_ENV} or {DEFAULT_COMPILE_CACHE}")


def add_device_flags(parser: argparse.ArgumentParser, *, distributed: bool,
                      seeds: bool, device: bool = True) -> None:
    seeds_text = (". With --seeds K the devices are first shared out to groups of seeds (on "
                  "a CPU, every device a group; on a GPU, G groups, G the greatest common "
                  "divisor of K and the device count), and each batch is split over the "
                  "devices of its group") if seeds else ""
    group = parser.add_argument_group(
        "devices", "every batch is split over all devices (data parallel); the batch sizes "
                   "must be multiples of the device count" + seeds_text)
    if device:  # bench has a --device of its own, for both frameworks, read the same way
        group.add_argument("--device", choices=DEVICES, default=None,
                           help="the kind of device to train on: cuda (an NVIDIA GPU: stop with "
                                "one line, not fall back to the CPU, when jax has none), cpu (even "
                                "where a GPU is), or auto (jax's choice: a GPU when its plugin is "
                                f"installed); default ${DEVICE_ENV}, else auto")
    group.add_argument("--cpu-devices", type=int, metavar="N",
                       help="split the CPU into N XLA devices (no effect where a GPU is the "
                            "device); default $FMNIST_CPU_DEVICES, else 1" + (
                                ", or with --seeds K or --sweep one per core, up to one per "
                                "model (one group of models per core)" if seeds else ""))
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
                            "host; an IPv6 address in brackets, [::1]:PORT); default "
                            "$FMNIST_COORDINATOR_ADDRESS")
    group.add_argument("--connect-timeout", type=int, metavar="SECONDS",
                       help="how long each process waits for all the others to join before "
                            "it gives up with one line; default 300")


def start_devices(args: argparse.Namespace, *, members: int = 1):
    """Set up the devices the flags ask for, before jax starts its backend: the kind of
    device (`use_device`), the CPU device count (for a run of `members` seeds on one process,
    one device per core by default: `parallel.cpu_devices_for`), then (with several
    processes) join the others through jax.distributed. Returns the distributed settings."""
    from fmnist_jax.run import parallel

    settings = parallel.distributed_settings(getattr(args, "coordinator_address", None),
                                             getattr(args, "num_processes", None),
                                             getattr(args, "process_id", None),
                                             getattr(args, "connect_timeout", None))
    asked = use_device(getattr(args, "device", None))
    parallel.use_cpu_devices(args.cpu_devices, default=(
        parallel.cpu_devices_for(members) if settings.num_processes == 1 else None))
    parallel.initialize_distributed(settings)
    check_device(asked)
    return settings


def use_device(choice: str | None) -> str | None:
    """Point jax at the kind of device `choice` (else $FMNIST_DEVICE) names; return what asked
    for a GPU ("--device cuda", "FMNIST_DEVICE=cuda", "JAX_PLATFORMS=cuda"), or None."""
    chosen = (choice or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if chosen not in DEVICES:
        raise FmnistError(f"{DEVICE_ENV}={chosen} is not one of {', '.join(DEVICES)}")
    if chosen != "auto":
        import jax

        jax.config.update("jax_platforms", chosen)
        if chosen != "cuda":
            return None
        return "--device cuda" if choice else f"{DEVICE_ENV}=cuda"
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if "cuda" in platforms or "gpu" in platforms:
        return f"JAX_PLATFORMS={platforms}"
    return None


def check_device(asked: str | None) -> None:
    """Start jax's backend; where `asked` wanted a GPU and jax has none, one line saying how
    to install for one. jax itself answers an unknown platform with a bare AssertionError
    or a RuntimeError about another backend (ROCm), and never with the install command."""
    import jax

    try:
        platform = jax.devices()[0].platform
    except (RuntimeError, AssertionError):
        if asked is None:
            raise
        platform = None
    if asked is not None and platform != "gpu":
        raise FmnistError(f"{asked} asks for a CUDA GPU, but jax {jax.__version__} finds none "
                          f"(its CUDA plugin is not installed, or no GPU is visible): on a GPU "
                          f"machine, {CUDA_INSTALL}; or pass --device cpu")


def use_compile_cache(choice: str | None) -> Path | None:
    """Point XLA's persistent compilation cache at `choice` (else $FMNIST_COMPILE_CACHE, else
    ~/.cache/fmnist_jax/xla; "none": off) and return the folder. Must run before anything
    compiles: jax reads the setting when it first compiles."""
    if choice is not None and not choice.strip():
        # An empty value would fall back to the default folder the user meant to replace.
        raise FmnistError("--compile-cache needs a folder, or none for no cache, got an empty "
                          "value")
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
    give_cache_entries_an_access_time(path)
    return path


def give_cache_entries_an_access_time(path: Path) -> None:
    """Write the access-time file of every entry of the compile cache `path` that lacks one,
    under jax's own lock of that folder.

    With a size limit, jax's cache reads every entry's `KEY-atime` before each write, and one
    entry without it (a process killed between jax's two writes, or one that ran without the
    limit) makes every later write fail with a warning, so nothing new is cached
    (https://github.com/jax-ml/jax/issues/39880; jax 0.11.2 and 0.12.1, on Python 3.12, no
    longer fail so). Such an entry is then the least recently used one."""
    import filelock

    try:
        with filelock.FileLock(path / ".lockfile", timeout=10):
            for entry in path.glob("*-cache"):
                atime = entry.with_name(entry.name.removesuffix("-cache") + "-atime")
                if not atime.exists():
                    atime.write_bytes((0).to_bytes(8, "little"))
    except (filelock.Timeout, OSError):
        pass  # a cache that cannot be mended only compiles again, as jax says when it writes


def load_data(args: argparse.Namespace):
    from fmnist_jax import data

    return data.load(data_dir=args.data_dir, manual_dir=args.manual_dir,
                     train_csv=args.train_csv, test_csv=args.test_csv,
                     source=args.data_source)
