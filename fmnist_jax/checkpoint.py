"""Run folders: the config as JSON and the parameters through orbax.

A run folder holds `config.json`, `history.jsonl` (metrics per epoch), `timing.jsonl`
(seconds per epoch, apart so that the same seed gives a byte-identical history) and
`params/` (an orbax checkpoint of the final parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fmnist_jax.config import TrainConfig
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.steps import Normalization

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"
TIMING_FILE = "timing.jsonl"
PARAMS_DIR = "params"
NORMALIZATION_FILE = "normalization.json"  # the mean/std the model was trained with
CALIBRATION_FILE = "calibration.json"  # the temperature fit on the validation split


def save_params(run_dir: Path, params) -> None:
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(run_dir).absolute() / PARAMS_DIR, params)


def save_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_normalization(run_dir: str | Path) -> Normalization:
    path = Path(run_dir) / NORMALIZATION_FILE
    if not path.is_file():
        raise FmnistError(f"{run_dir} has no {NORMALIZATION_FILE}: the training did not "
                          f"finish; train again")
    fields = json.loads(path.read_text())
    return Normalization(float(fields["mean"]), float(fields["std"]))


def load_temperature(run_dir: str | Path) -> float | None:
    """The calibrated temperature, or None when the run was not calibrated."""
    path = Path(run_dir) / CALIBRATION_FILE
    return float(json.loads(path.read_text())["temperature"]) if path.is_file() else None


def load_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FmnistError(f"{run_dir} is not a run folder (no {CONFIG_FILE}): pass the folder "
                          f"that scripts/train.py wrote")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FmnistError(f"{path} is not valid JSON ({e.msg}): restore it from the run") from e
    return TrainConfig.from_dict(fields)


def load_params(run_dir: str | Path, cfg: TrainConfig):
    """The run's parameters, checked against the structure and shapes of `cfg.model`."""
    path = Path(run_dir).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise FmnistError(f"{run_dir} has no model ({PARAMS_DIR}/ is missing): the training did "
                          f"not finish; train again")
    abstract = jax.eval_shape(get_model(cfg.model).init, jax.random.key(0),
                              jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
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
