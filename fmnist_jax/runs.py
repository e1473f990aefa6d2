"""The run folder: every file in it is named, written and read here, and nowhere else.

A run folder holds:

| file                                  | written by              | what                                  |
| ------------------------------------- | ----------------------- | ------------------------------------- |
| config.json                           | training, at the start  | the full TrainConfig                  |
| normalization.json                    | training, at the start  | the pixel mean/std the model saw      |
| data.json                             | training, at the start  | fingerprints of its train/test data   |
| history.jsonl                         | training, every epoch   | losses and accuracies (reproducible)  |
| timing.jsonl                          | training, every epoch   | compile, train and eval seconds       |
| params/                               | training, at the end    | parameters and BatchNorm statistics   |
| calibration.json                      | evaluation              | the temperature fit on validation     |
| report.txt, report.json, *.png        | evaluation              | the report and its plots              |

Timings live apart from the history, so that the same seed writes the same history bytes.
An existing run is never overwritten. Per-epoch checkpoints will go under `checkpoints/`.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from fmnist_jax.config import TrainConfig
from fmnist_jax.data import Normalization, Split, fingerprint
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.steps import init_variables

CONFIG_FILE = "config.json"
NORMALIZATION_FILE = "normalization.json"
DATA_FILE = "data.json"
HISTORY_FILE = "history.jsonl"
TIMING_FILE = "timing.jsonl"
PARAMS_DIR = "params"
CALIBRATION_FILE = "calibration.json"
REPORT_TEXT_FILE = "report.txt"
REPORT_JSON_FILE = "report.json"
PLOT_FILES = {"confusion_matrix": "confusion_matrix.png", "reliability": "reliability.png",
              "curves": "curves.png"}


# ---------------------------------------------------------------------------------------
# The folder


def create(workdir: str | Path) -> Path:
    """Make the run folder (parents too) for a new run; refuse one that already holds a run."""
    run_dir = Path(workdir)
    if (run_dir / HISTORY_FILE).exists():
        raise FmnistError(f"{run_dir} already holds a run: pass another --workdir or delete it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmnistError(f"cannot make the run folder {run_dir} ({e.strerror}): pass another "
                          f"--workdir") from e
    return run_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> Any:
    """A JSON file of the run; a hand-edited or truncated one is an FmnistError."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FmnistError(f"{path} is malformed ({e.msg}): restore it from the run") from e


# ---------------------------------------------------------------------------------------
# What training writes


def save_config(run_dir: Path, cfg: TrainConfig) -> None:
    (run_dir / CONFIG_FILE).write_text(cfg.to_json() + "\n")


def load_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FmnistError(f"{run_dir} is not a run folder (no {CONFIG_FILE}): pass the folder "
                          f"that scripts/train.py wrote")
    fields = _read_json(path)
    if not isinstance(fields, dict):
        raise FmnistError(f"{path} is malformed (not a JSON object): restore it from the run")
    return TrainConfig.from_dict(fields)


def save_normalization(run_dir: Path, norm: Normalization) -> None:
    _write_json(run_dir / NORMALIZATION_FILE, norm._asdict())


def load_normalization(run_dir: str | Path) -> Normalization:
    path = Path(run_dir) / NORMALIZATION_FILE
    if not path.is_file():
        raise FmnistError(f"{run_dir} has no {NORMALIZATION_FILE}: the training did not "
                          f"finish; train again")
    fields = _read_json(path)
    try:
        norm = Normalization(float(fields["mean"]), float(fields["std"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FmnistError(f"{path} is malformed (needs numbers mean and std): restore it from "
                          f"the run") from e
    if not (math.isfinite(norm.mean) and math.isfinite(norm.std) and norm.std > 0):
        raise FmnistError(f"{path} has mean {norm.mean} and std {norm.std}: std must be a "
                          f"positive number; restore it from the run")
    return norm


def save_data_fingerprints(run_dir: Path, train: Split, test: Split) -> None:
    _write_json(run_dir / DATA_FILE, {"train_sha256": fingerprint(train),
                                      "test_sha256": fingerprint(test),
                                      "n_train": len(train), "n_test": len(test)})


def check_data(run_dir: str | Path, train: Split, test: Split) -> None:
    """FmnistError unless `train` and `test` are the images (in the same order) the run was
    trained on: its validation split is only held out of those. Runs without data.json pass."""
    path = Path(run_dir) / DATA_FILE
    if not path.is_file():
        return
    stored = _read_json(path)
    for name, split in (("train", train), ("test", test)):
        if stored.get(f"{name}_sha256") != fingerprint(split):
            raise FmnistError(f"the {name} images given are not the ones {run_dir} was trained "
                              f"on ({len(split)} images here, {stored.get(f'n_{name}')} then): "
                              f"pass the same data (the same tfds folder, or the same CSV files)")


class EpochLog:
    """history.jsonl and timing.jsonl, appended to and flushed once per epoch.

    Use as a context manager: `with runs.EpochLog(run_dir) as log: log.epoch(row, seconds)`.
    """

    def __init__(self, run_dir: Path):
        self._history = open(run_dir / HISTORY_FILE, "w")
        self._timing = open(run_dir / TIMING_FILE, "w")

    def compile_seconds(self, seconds: float) -> None:
        self._timing.write(json.dumps({"compile_seconds": seconds}) + "\n")
        self._timing.flush()

    def epoch(self, row: dict[str, Any], timing: dict[str, float]) -> None:
        """One epoch: its metrics `row` (with "epoch") to the history, `timing` apart."""
        self._history.write(json.dumps(row) + "\n")
        self._history.flush()
        self._timing.write(json.dumps({"epoch": row["epoch"], **timing}) + "\n")
        self._timing.flush()

    def __enter__(self) -> EpochLog:
        return self

    def __exit__(self, *exc) -> None:
        self._history.close()
        self._timing.close()


def load_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run (empty if it has no history yet)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except json.JSONDecodeError as e:
        raise FmnistError(f"{path} is malformed ({e.msg}): restore it from the run") from e


def save_variables(run_dir: Path, variables: dict) -> None:
    """The model's variables ({"params": ...} and "batch_stats" if it has BatchNorm), orbax."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(run_dir).absolute() / PARAMS_DIR, variables)


def load_variables(run_dir: str | Path, cfg: TrainConfig) -> dict:
    """The run's variables, checked against the structure and shapes of `cfg.model`'s."""
    path = Path(run_dir).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise FmnistError(f"{run_dir} has no model ({PARAMS_DIR}/ is missing): the training did "
                          f"not finish; train again")
    abstract = {name: tree for name, tree in jax.eval_shape(
        functools.partial(init_variables, get_model(cfg.model)), jax.random.key(0)).items()
        if tree}
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(path).item_metadata.tree  # shapes, no data
            if _shapes(stored) != _shapes(abstract):
                raise FmnistError(f"{path} holds parameters of another model than {cfg.model!r} "
                                  f"(config.json): use the run folder the checkpoint came from")
            return checkpointer.restore(path, abstract)
        except FmnistError:
            raise
        except Exception as e:  # orbax raises many types for a damaged folder
            raise FmnistError(f"{path} could not be read ({type(e).__name__}): the checkpoint "
                              f"is damaged; train again") from e


def _shapes(tree):
    return jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), tree)


# ---------------------------------------------------------------------------------------
# What evaluation writes


def save_calibration(run_dir: Path, temperature: float, n_validation: int) -> None:
    _write_json(run_dir / CALIBRATION_FILE, {"temperature": temperature, "fit_on": "validation",
                                             "n_validation": n_validation})


def load_temperature(run_dir: str | Path) -> float | None:
    """The calibrated temperature, or None when the run was not calibrated."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    fields = _read_json(path)
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
    (run_dir / REPORT_TEXT_FILE).write_text(text)
    _write_json(run_dir / REPORT_JSON_FILE, report)


def plot_path(run_dir: Path, plot: str) -> Path:
    """Where the evaluation's `plot` (a key of PLOT_FILES) goes."""
    return run_dir / PLOT_FILES[plot]
