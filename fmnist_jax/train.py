"""The host loop: `train_and_evaluate(cfg, workdir)` -> (state, history).

The data goes to the device once; each epoch is one call of the jitted `train_epoch` (a
`lax.scan` over every step) and one of `evaluate`; the host reads metrics once per epoch.
Compilation is done ahead of time and timed apart from the epochs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from fmnist_jax import checkpoint, data
from fmnist_jax.config import TrainConfig
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_optimizer
from fmnist_jax.steps import Normalization, Sums, create_train_state, evaluate, train_epoch


def normalization_for(cfg: TrainConfig, train_images_NxHxWx1: np.ndarray) -> Normalization:
    if cfg.normalization == "dataset":
        return Normalization(*data.dataset_mean_std(train_images_NxHxWx1))
    return Normalization(0.5, 0.5)


# Independent random streams of a run, all from cfg.seed.
INIT_STREAM, SHUFFLE_STREAM, VAL_SPLIT_STREAM, BOOTSTRAP_STREAM = 0, 1, 2, 3


def stream_key(seed: int, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stream)


def split_train_val(cfg: TrainConfig, train: data.Split) -> tuple[data.Split, data.Split | None]:
    """The run's training images and its held-out validation split (None if val_fraction 0)."""
    if cfg.val_fraction == 0:
        return train, None
    rest, val = data.stratified_split(train, cfg.val_fraction,
                                      stream_key(cfg.seed, VAL_SPLIT_STREAM))
    if len(val) == 0:
        raise FmnistError(f"val fraction {cfg.val_fraction} holds out no image: pass 0 for no "
                          f"validation split, or a larger fraction")
    return rest, val


def _rates(sums: Sums) -> tuple[float, float]:
    """(mean loss, accuracy) from device sums: the host reads them once per epoch and split."""
    loss, correct, count = (float(x) for x in jax.device_get(sums))
    return loss / count, correct / count


def prepare_run_dir(workdir: str | Path) -> Path:
    run_dir = Path(workdir)
    if (run_dir / checkpoint.HISTORY_FILE).exists():
        raise FmnistError(f"{run_dir} already holds a run: pass another --workdir or delete it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmnistError(f"cannot make the run folder {run_dir} ({e.strerror}): pass another "
                          f"--workdir") from e
    return run_dir


def train_and_evaluate(cfg: TrainConfig, workdir: str | Path, *,
                       train: data.Split | None = None, test: data.Split | None = None,
                       data_dir=None, manual_dir=None,
                       log_fn: Callable[[str], Any] = tqdm.write, progress: bool = True):
    """Train `cfg` and evaluate on the test split after every epoch.

    Writes config.json, history.jsonl, timing.jsonl and params/ into `workdir`. `train` and
    `test` default to Fashion-MNIST loaded through `data` (tests pass small splits).
    Returns (final TrainState, list of per-epoch metric dicts).
    """
    cfg.validate()
    run_dir = prepare_run_dir(workdir)
    if train is None or test is None:
        train, test = data.load_fashion_mnist(data_dir=data_dir, manual_dir=manual_dir)
    train, val = split_train_val(cfg, train)
    if cfg.batch_size > len(train):
        raise FmnistError(f"batch size {cfg.batch_size} is larger than the {len(train)} training "
                          f"images: lower --batch-size")
    (run_dir / checkpoint.CONFIG_FILE).write_text(cfg.to_json() + "\n")
    log_fn(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
           f"jax {jax.__version__}")
    log_fn(f"config: {json.dumps(json.loads(cfg.to_json()))}")

    norm = normalization_for(cfg, train.images_NxHxWx1)
    checkpoint.save_json(run_dir / checkpoint.NORMALIZATION_FILE, norm._asdict())
    steps_per_epoch = len(train) // cfg.batch_size
    shuffle_key = stream_key(cfg.seed, SHUFFLE_STREAM)
    state = create_train_state(get_model(cfg.model), make_optimizer(cfg, steps_per_epoch),
                               stream_key(cfg.seed, INIT_STREAM))
    train_x, train_y, test_x, test_y = jax.device_put(
        (train.images_NxHxWx1, train.labels_N, test.images_NxHxWx1, test.labels_N))
    eval_sets = {"test": (test_x, test_y)}
    if val is not None:
        eval_sets = {"val": jax.device_put((val.images_NxHxWx1, val.labels_N)), **eval_sets}
    log_fn(f"images: {len(train)} train, {len(val) if val else 0} validation (held out), "
           f"{len(test)} test")

    t0 = time.perf_counter()
    epoch_fn = train_epoch.lower(state, train_x, train_y, shuffle_key,
                                 batch_size=cfg.batch_size, norm=norm).compile()
    eval_fns = {name: evaluate.lower(state, x, y, batch_size=cfg.eval_batch_size,
                                     norm=norm).compile() for name, (x, y) in eval_sets.items()}
    compile_s = time.perf_counter() - t0
    log_fn(f"compiled train epoch and eval in {compile_s:.2f} s "
           f"({steps_per_epoch} steps of {cfg.batch_size} per epoch)")

    history: list[dict[str, Any]] = []
    with open(run_dir / checkpoint.HISTORY_FILE, "w") as history_file, \
            open(run_dir / checkpoint.TIMING_FILE, "w") as timing_file:
        timing_file.write(json.dumps({"compile_seconds": compile_s}) + "\n")
        bar = tqdm(range(1, cfg.epochs + 1), desc="epochs", unit="epoch", disable=not progress,
                   file=sys.stderr, leave=False)
        for epoch in bar:
            t0 = time.perf_counter()
            state, train_sums = epoch_fn(state, train_x, train_y,
                                         jax.random.fold_in(shuffle_key, epoch), norm=norm)
            train_loss, train_acc = _rates(jax.block_until_ready(train_sums))
            train_s = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                raise FmnistError(f"training diverged at epoch {epoch} (loss {train_loss}): "
                                  f"lower --lr or set clip_norm")
            t0 = time.perf_counter()
            row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc}
            for name, (x, y) in eval_sets.items():
                row[f"{name}_loss"], row[f"{name}_accuracy"] = _rates(
                    eval_fns[name](state, x, y, norm=norm))
            eval_s = time.perf_counter() - t0
            history.append(row)
            history_file.write(json.dumps(row) + "\n")
            history_file.flush()
            timing_file.write(json.dumps({"epoch": epoch, "train_seconds": train_s,
                                          "eval_seconds": eval_s}) + "\n")
            bar.set_postfix(loss=f"{train_loss:.4f}", test_acc=f"{row['test_accuracy']:.4f}")
            evals = "  ".join(f"{name} loss {row[f'{name}_loss']:.4f} acc "
                              f"{row[f'{name}_accuracy']:.4f}" for name in eval_sets)
            log_fn(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                   f"{evals}  {train_s:.2f} s (+{eval_s:.2f} s eval)")
        bar.close()
    checkpoint.save_params(run_dir, state.params)
    log_fn(f"final test accuracy: {history[-1]['test_accuracy']:.4f} "
           f"({int(round(history[-1]['test_accuracy'] * len(test)))}/{len(test)}); run folder: {run_dir}")
    return state, history
