"""The small result files of a run folder: summary.json of a run of several seeds, and what
the evaluation writes (calibration.json, report.txt, report.json, the plots, and
seeds_report.json over the seeds of a run of several)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fmnist_jax.errors import FmnistError
from fmnist_jax.models import NUM_CLASSES
from fmnist_jax.run.folder import (CALIBRATION_FILE, PLOT_FILES, REPORT_JSON_FILE,
                                   REPORT_TEXT_FILE, SEEDS_REPORT_FILE, SUMMARY_FILE,
                                   SWEEP_FILE, read_json, seed_run_dirs, write_file,
                                   write_json)


def save_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """The results of a run of several seeds (see `loop.train_and_evaluate`): written last,
    once every seed's run folder is complete."""
    write_json(Path(run_dir) / SUMMARY_FILE, summary)


def save_sweep(run_dir: Path, summary: dict[str, Any]) -> None:
    """The results of a sweep (see `sweep.summarize`): written last, once every member's run
    folder is complete."""
    write_json(Path(run_dir) / SWEEP_FILE, summary)


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FmnistError(f"{run_dir} has no {SUMMARY_FILE}: it is no finished run of several "
                          f"seeds")
    return read_json(path)


# The calibration maps (fit and applied by evaluation.calibration) and their parameters:
# name -> shape, with C the number of classes. A map is {"kind": ..., parameter: values}.
CALIBRATION_KINDS = ("temperature", "vector", "dirichlet")
_MAP_PARAMS = {"temperature": {"temperature": lambda c: ()},
               "vector": {"w": lambda c: (c,), "b": lambda c: (c,)},
               "dirichlet": {"W": lambda c: (c, c), "b": lambda c: (c,)}}


def save_calibration(run_dir: Path, cal_map: dict[str, Any], n_validation: int) -> None:
    """calibration.json: the map fit on the validation split, and how many images it saw."""
    write_json(Path(run_dir) / CALIBRATION_FILE, {**cal_map, "fit_on": "validation",
                                                  "n_validation": n_validation})


def load_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's calibration map ({"kind": ..., its parameters}), or None when the run was not
    calibrated. A file of older versions, with only a temperature, is a temperature map."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    fields = read_json(path)
    fix = "calibrate again (scripts/evaluate.py) or delete it"
    kind = fields.get("kind", "temperature") if isinstance(fields, dict) else None
    if kind not in _MAP_PARAMS:
        raise FmnistError(f"{path} is malformed (its kind {kind!r} is none of "
                          f"{', '.join(CALIBRATION_KINDS)}): {fix}")
    cal_map: dict[str, Any] = {"kind": kind}
    for name, shape_of in _MAP_PARAMS[kind].items():
        shape = shape_of(NUM_CLASSES)
        try:
            values = np.asarray(fields[name], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise FmnistError(f"{path} is malformed (a {kind} map needs {name}, numbers of "
                              f"shape {shape}): {fix}") from e
        if values.shape != shape or not np.all(np.isfinite(values)):
            raise FmnistError(f"{path} is malformed ({name} of a {kind} map must be finite "
                              f"numbers of shape {shape}, got shape {values.shape}): {fix}")
        cal_map[name] = values.tolist()
    if kind == "temperature" and not cal_map["temperature"] > 0:
        raise FmnistError(f"{path} has temperature {cal_map['temperature']}, not a positive "
                          f"number: {fix}")
    return cal_map


def save_report(run_dir: Path, text: str, report: dict[str, Any]) -> None:
    write_file(run_dir / REPORT_TEXT_FILE, text)
    write_json(run_dir / REPORT_JSON_FILE, report)


def check_report_paths(run_dir: str | Path) -> None:
    """FmnistError unless the evaluation can write each of its files in `run_dir`: a folder
    in place of one, or a folder that is not writable, found before anything is rewritten."""
    run_dir = Path(run_dir)
    for name in (REPORT_TEXT_FILE, REPORT_JSON_FILE, CALIBRATION_FILE, *PLOT_FILES.values()):
        if (run_dir / name).is_dir():
            raise FmnistError(f"cannot write {run_dir / name} (it is a folder): move it away, "
                              f"then evaluate again")
    if not os.access(run_dir, os.W_OK):
        raise FmnistError(f"cannot write in {run_dir} (the folder is not writable): check its "
                          f"permissions, then evaluate again")


def has_reports(run_dir: str | Path, calibration: str | None = None) -> bool:
    """Whether the run was evaluated: its report.json there (in every seed's folder, for the
    folder of a run of several), which the evaluation writes last; with `calibration`, with
    that map."""
    def reported(path: Path) -> bool:
        if not (path / REPORT_JSON_FILE).is_file():
            return False
        if calibration is None:
            return True
        try:
            chosen = read_json(path / REPORT_JSON_FILE)["calibration"]["map"]["kind"]
        except (FmnistError, KeyError, TypeError):  # damaged, or of an earlier version
            return False
        return chosen == calibration

    return all(reported(Path(d)) for d in seed_run_dirs(run_dir) or [run_dir])


def load_report(run_dir: str | Path, fix: str = "evaluate the run again") -> Any:
    """The run's report.json as parsed (the caller checks its fields), or None when the run
    was not evaluated; FmnistError ending with `fix` when it is no JSON."""
    path = Path(run_dir) / REPORT_JSON_FILE
    return read_json(path, fix) if path.is_file() else None


def save_seeds_report(run_dir: Path, summary: dict[str, Any]) -> None:
    """The evaluation's figures over the seeds of a run of several seeds
    (`evaluation.over_seeds`)."""
    write_json(run_dir / SEEDS_REPORT_FILE, summary)


def plot_path(run_dir: Path, plot: str) -> Path:
    """Where the evaluation's `plot` (a key of PLOT_FILES) goes."""
    return run_dir / PLOT_FILES[plot]
