"""The small result files of a run folder: summary.json of a run of several seeds, and what
the evaluation writes (calibration.json, report.txt, report.json, the plots)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fmnist_jax.errors import FmnistError
from fmnist_jax.run.folder import (CALIBRATION_FILE, PLOT_FILES, REPORT_JSON_FILE,
                                   REPORT_TEXT_FILE, SUMMARY_FILE, read_json, write_json,
                                   write_text)


def save_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """The results of a run of several seeds (see `loop.train_and_evaluate`): written last,
    once every seed's run folder is complete."""
    write_json(Path(run_dir) / SUMMARY_FILE, summary)


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FmnistError(f"{run_dir} has no {SUMMARY_FILE}: it is no finished run of several "
                          f"seeds")
    return read_json(path)


def save_calibration(run_dir: Path, temperature: float, n_validation: int) -> None:
    write_json(run_dir / CALIBRATION_FILE, {"temperature": temperature, "fit_on": "validation",
                                            "n_validation": n_validation})


def load_temperature(run_dir: str | Path) -> float | None:
    """The calibrated temperature, or None when the run was not calibrated."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    fields = read_json(path)
    try:
        temperature = float(fields["temperature"])
    except (KeyError, TypeError, ValueError) as e:
        raise FmnistError(f"{path} is malformed (needs a number temperature): calibrate again "
                          f"or delete it") from e
    if not (math.isfinite(temperature) and temperature > 0):
        raise FmnistError(f"{path} has temperature {temperature}, not a positive number: "
                          f"calibrate again or delete it")
    return temperature


def save_report(run_dir: Path, text: str, report: dict[str, Any]) -> None:
    write_text(run_dir / REPORT_TEXT_FILE, text)
    write_json(run_dir / REPORT_JSON_FILE, report)


def plot_path(run_dir: Path, plot: str) -> Path:
    """Where the evaluation's `plot` (a key of PLOT_FILES) goes."""
    return run_dir / PLOT_FILES[plot]
