"""What train.py --resume and evaluate.py take from a run folder beyond its weights: the stored
config, which the flags given may only repeat, and train.py's own options the run began with
(its data flags, --report/--no-report and --calibration, recorded in claim.json), which fill
in the flags not given: a plain `--resume RUN` reads the same data and writes the same report
as the uninterrupted run would have. And, when a run is stopped, the command that continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from fmnist_jax.cli_flags import CALIBRATIONS
from fmnist_jax.errors import FmnistError
from fmnist_jax.run.config import TrainConfig

DEFAULT_DATA_FLAGS = {"data_dir": None, "manual_dir": None, "data_source": "auto",
                      "train_csv": None, "test_csv": None}


def command_options(args: argparse.Namespace) -> dict[str, Any]:
    """What a new run records of train.py's own options (see `folder_config.recorded_options`):
    the report and its map, and the data flags, their paths made absolute."""
    data = {flag: (str(Path(value).expanduser().absolute())
                   if value is not None and flag != "data_source" else value)
            for flag, value in ((flag, getattr(args, flag)) for flag in DEFAULT_DATA_FLAGS)}
    return {"calibration": args.calibration, "report": args.report, **data}


def take_recorded_options(args: argparse.Namespace,
                          run_dir: str | Path | None) -> str | None:
    """Set the options the command was not given (--calibration, --report/--no-report where
    it has them, the data flags when none is given) to those the run in `run_dir` began with,
    then the rest to their defaults. Returns the note to print as the data loads when the data
    is the record's, else None. Cheap: call it before the other checks."""
    from fmnist_jax.run import folder_config

    note = None
    options = folder_config.recorded_options(run_dir) if run_dir is not None else None
    if options is not None:
        if args.calibration is None:
            args.calibration = options["calibration"]
            if args.calibration not in CALIBRATIONS:
                raise FmnistError(f"{run_dir} records the calibration map "
                                  f"{args.calibration!r} (claim.json), not one of "
                                  f"{', '.join(CALIBRATIONS)}: pass --calibration, or restore "
                                  f"the file from the run")
        if getattr(args, "report", False) is None:
            args.report = options["report"]
        given = {flag: getattr(args, flag) for flag in DEFAULT_DATA_FLAGS}
        recorded = {flag: options.get(flag, default)
                    for flag, default in DEFAULT_DATA_FLAGS.items()}
        if given == DEFAULT_DATA_FLAGS and recorded != DEFAULT_DATA_FLAGS:
            vars(args).update(recorded)
            flags = " ".join(f"--{flag.replace('_', '-')} {value}"
                             for flag, value in recorded.items()
                             if value != DEFAULT_DATA_FLAGS[flag])
            gone = [recorded[flag] for flag in ("train_csv", "test_csv", "manual_dir")
                    if recorded[flag] is not None and not Path(recorded[flag]).exists()]
            if gone:
                raise FmnistError(f"{run_dir} began with the data flags {flags} (claim.json), "
                                  f"and {gone[0]} is gone: pass the data flags for where the "
                                  f"same files are now")
            note = (f"note: reading the data {run_dir} began with ({flags}); pass data flags "
                    f"for other files")
    if args.calibration is None:
        args.calibration = CALIBRATIONS[0]
    if getattr(args, "report", False) is None:
        args.report = True
    return note


def report_command(run_dir: str | Path, calibration: str) -> str:
    """The evaluate.py command that writes the report train.py would have, its map included."""
    chosen = "" if calibration == CALIBRATIONS[0] else f" --calibration {calibration}"
    return f"python scripts/evaluate.py {run_dir}{chosen}"


def _shown(value) -> str:
    """A config value as a message shows it: an empty one (no teacher, no sweep) as none."""
    return "none" if value in (None, "") else str(value)


def resumed_config(args: argparse.Namespace, *, speak: bool = True) -> TrainConfig | None:
    """The stored config of the run --resume names, after checking the flags given with it
    agree with it; None (and, if `speak`, one line) when that run has already finished."""
    from fmnist_jax.run import folder, results

    if args.workdir:
        raise FmnistError("--workdir and --resume both name a run folder: pass only --resume")
    if args.preset:
        raise FmnistError("--preset cannot change a resumed run (it uses its stored config): "
                          "drop --preset")
    stored = folder.stored_config(args.resume)
    if not folder.finished(args.resume):  # an edit, before the flags are compared with it
        folder.check_config_unchanged(args.resume)
    for field in dataclasses.fields(TrainConfig):
        if hasattr(args, field.name) and getattr(args, field.name) != getattr(stored,
                                                                              field.name):
            flag = "--" + field.name.replace("_", "-")
            raise FmnistError(f"{flag} {_shown(getattr(args, field.name))} contradicts the "
                              f"run's config ({_shown(getattr(stored, field.name))}): a resumed "
                              f"run keeps its config; drop {flag}, or start a new run")
    if folder.finished(args.resume):
        if speak:  # stopped in its report, or trained with --no-report: how to get one
            print(f"{args.resume} has already finished training: nothing to resume" + (
                "" if results.has_reports(args.resume) else
                f" (it has no evaluation report: {report_command(args.resume, args.calibration)})"))
        return None
    return stored


@contextlib.contextmanager
def continue_hint(run, calibration: str, stage: str):
    """Ctrl-C or SIGTERM inside: the interrupt goes on with the command that continues the
    run, which `user_errors_exit_1` prints, while the run folder holds one to continue."""
    from fmnist_jax.run import folder, parallel

    try:
        yield
    except KeyboardInterrupt as e:
        kept = run.resumed or any((c.path / folder.HISTORY_FILE).is_file()
                                  for c in run.members or (run,))
        if str(e) or not kept or not parallel.is_writer():
            raise
        how = (f"python scripts/train.py --resume {run.path}" if stage == "train"
               else report_command(run.path, calibration))
        raise type(e)(f"continue with `{how}`") from e
