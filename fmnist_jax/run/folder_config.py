"""The config of a run folder, read back: config.json, seeds.json of a run of several seeds
(or a sweep), and claim.json, the config recorded as the run began (see `folder` for the whole folder).

A run claims its folder by creating config.json and records the same config in claim.json;
a --resume refuses a config.json (or seeds.json) that differs from that record, naming the
fields, since a resumed run keeps its config. Folders written before claim.json existed
have none, and resume unchecked.

claim.json (and seeds.json) also record train.py's own options, which are not the config:
its data flags, and whether it writes the report and with which calibration map
(`recorded_options`). A --resume, and evaluate.py, take those it is not given from there.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fmnist_jax.data import DATA_SOURCES
from fmnist_jax.errors import FmnistError
from fmnist_jax.run.config import TrainConfig

CONFIG_FILE = "config.json"
CLAIM_FILE = "claim.json"
SEEDS_FILE = "seeds.json"
OPTIONS_KEY = "options"  # claim.json's and seeds.json's record of train.py's own options
DATA_FLAGS = ("data_dir", "manual_dir", "data_source", "train_csv", "test_csv")


def member_dir(run_dir: str | Path, seed: int) -> Path:
    """The run folder of `seed` inside the folder of a run of several seeds (no sweep)."""
    return Path(run_dir) / f"seed-{seed}"


def member_dirs(run_dir: str | Path, cfg: TrainConfig) -> list[Path]:
    """The run folder of each member of `cfg` (`TrainConfig.members`' order) inside the
    folder of its run of several seeds or sweep: seed-S, or POINT/seed-S."""
    return [Path(run_dir) / name for name in cfg.member_names()]


def seed_run_dirs(run_dir: str | Path) -> list[Path] | None:
    """Each member's run folder (`member_dirs`) when `run_dir` is the folder of a run of
    several seeds or of a sweep; None for any other folder."""
    run_dir = Path(run_dir)
    if not holds_seeds(run_dir):
        return None
    return member_dirs(run_dir, stored_config(run_dir))


def holds_seeds(run_dir: Path) -> bool:
    """Whether `run_dir` is the folder of a run of several seeds or of a sweep (seeds.json,
    no config.json)."""
    return (run_dir / SEEDS_FILE).is_file() and not (run_dir / CONFIG_FILE).is_file()


def read_json(path: Path, fix: str = "restore it from the run") -> Any:
    """A JSON file of the run; a hand-edited, truncated or binary one is an FmnistError
    ending with `fix`."""
    try:
        return json.loads(path.read_bytes().decode())
    except UnicodeDecodeError as e:  # binary garbage: as damaged as bad JSON
        raise FmnistError(f"{path} is malformed (not UTF-8 text: {e.reason} at byte {e.start})"
                          f": {fix}") from e
    except json.JSONDecodeError as e:
        raise FmnistError(f"{path} is malformed ({e.msg}): {fix}") from e


def load_config(run_dir: str | Path) -> TrainConfig:
    """The config of one model's run folder (for the folder of several seeds, the error
    names one of its seeds' folders)."""
    path = Path(run_dir) / CONFIG_FILE
    if holds_seeds(Path(run_dir)):
        whole = stored_config(run_dir)
        raise FmnistError(f"{run_dir} holds the runs of "
                          f"{'a sweep' if whole.sweep else 'several seeds'}, one folder each: "
                          f"pass one of them, e.g. {member_dirs(run_dir, whole)[0]}")
    if not path.is_file():
        whole = seeds_run_of(Path(run_dir))
        if whole is not None:  # the user's own --seeds run, damaged: not "no run folder"
            whole_cfg = stored_config(whole)
            seeds = (f"the sweep {whole}" if whole_cfg.sweep
                     else f"the --seeds {whole_cfg.seeds} run {whole}")
            if not Path(run_dir).is_dir():
                raise FmnistError(f"{run_dir} is missing from {seeds} ({SEEDS_FILE} lists it): "
                                  f"restore it from a copy of the run")
            raise FmnistError(f"{path} is missing, in a seed's folder of {seeds}: restore it "
                              f"from a copy of the run")
        raise FmnistError(f"{run_dir} is not a run folder (no {CONFIG_FILE}): pass the folder "
                          f"that scripts/train.py wrote")
    return _config_from(path, read_json(path), "not a JSON object")


def seeds_run_of(run_dir: Path) -> Path | None:
    """The folder of the run of several seeds (or sweep) that `run_dir` is a member's
    folder of (by name, as its seeds.json gives them), else None."""
    for depth in (1, 2):  # seed-S, or a sweep's POINT/seed-S
        near = run_dir if len(run_dir.parts) > depth else run_dir.absolute()
        if len(near.parents) < depth:  # a folder just under the root has no grandparent
            return None
        whole = near.parents[depth - 1]
        if not holds_seeds(whole):
            continue
        try:
            names = stored_config(whole).member_names()
        except FmnistError:  # a damaged seeds.json: it names no member's folder
            return None
        return whole if "/".join(near.parts[-depth:]) in names else None
    return None


def check_config_unchanged(run_dir: str | Path) -> None:
    """FmnistError, naming what changed, when the config of the run in `run_dir` (of each of
    its seeds', and its seeds.json) is not the one recorded in claim.json as it began: a
    resumed run keeps its config. Folders without claim.json pass."""
    run_dir = Path(run_dir)
    dirs = seed_run_dirs(run_dir)
    given = dict(zip(dirs, stored_config(run_dir).members())) if dirs else {}
    for path in dirs or [run_dir]:
        record = path / CLAIM_FILE
        if not record.is_file():
            continue
        fields = read_json(record)
        began = _config_from(record, fields.get("config") if isinstance(fields, dict) else None,
                             "no config object")
        now = load_config(path)
        if now != began:
            raise _edited(path / CONFIG_FILE, began, now)
        if path != run_dir and given[path] != began:
            raise _edited(run_dir / SEEDS_FILE, began, given[path])


def _edited(path: Path, began: TrainConfig, now: TrainConfig) -> FmnistError:
    changes = ", ".join(f"{name} {json.dumps(value)} -> {json.dumps(getattr(now, name))}"
                        for name, value in dataclasses.asdict(began).items()
                        if getattr(now, name) != value)
    return FmnistError(f"{path} was edited after the run began ({changes}): set it back; a "
                       f"resumed run keeps its config (start a new run for another)")


def stored_config(run_dir: str | Path) -> TrainConfig:
    """The config a run folder was started with: config.json's, or for the folder of a run
    of several seeds the one in seeds.json (with `seeds`)."""
    path = Path(run_dir) / SEEDS_FILE
    if not holds_seeds(Path(run_dir)):
        return load_config(run_dir)
    fields = read_json(path)
    return _config_from(path, fields.get("config") if isinstance(fields, dict) else None,
                        "no config object")


def _config_from(path: Path, fields: Any, malformed: str) -> TrainConfig:
    if not isinstance(fields, dict):
        raise FmnistError(f"{path} is malformed ({malformed}): restore it from the run")
    try:
        return TrainConfig.from_dict(fields)
    except FmnistError as e:  # name the file: the user did not type these values
        raise FmnistError(f"{path}: {e}: restore it from the run") from e


def recorded_options(run_dir: str | Path) -> dict[str, Any] | None:
    """train.py's own options the run in `run_dir` began with: "calibration" (the map),
    "report" (whether it writes one) and the data flags (`DATA_FLAGS`, paths absolute, None
    where not given), from claim.json (seeds.json for the folder of a run of several seeds);
    None for a run begun by a version that did not record them."""
    run_dir = Path(run_dir)
    path = run_dir / (SEEDS_FILE if holds_seeds(run_dir) else CLAIM_FILE)
    if not path.is_file():
        return None
    record = read_json(path)
    options = record.get(OPTIONS_KEY) if isinstance(record, dict) else None
    if options is None:
        return None
    if not (isinstance(options, dict) and isinstance(options.get("calibration"), str)
            and isinstance(options.get("report"), bool)
            and all(isinstance(options.get(flag, ""), str | None) for flag in DATA_FLAGS)
            and options.get("data_source", "auto") in DATA_SOURCES):
        raise FmnistError(f"{path} is malformed (its {OPTIONS_KEY} are not train.py's): "
                          f"restore it from the run")
    return options
