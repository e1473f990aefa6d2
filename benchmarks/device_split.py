"""Does splitting each batch over more devices make an epoch faster? Timed in one process.

Used by `python -m benchmarks.time_device_split`. For every batch size, one `CompiledEpochs`
per device count d, each over a mesh of the first d devices (`parallel.data_parallel`), all in
this process: on the CPU, start it with `--cpu-devices N` (jax's CPU devices share the
machine's cores, so d = 1 here runs as a one-device process would). The configs take turns
epoch by epoch (round by round), so a change in machine load hits them alike; compilation is
timed apart. The machine is shared and noisy: the ratio of medians within one run is the
result.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any, Callable

import jax

from fmnist_jax import data, streams
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.run.compiled import CompiledEpochs, step_options
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_optimizer
from fmnist_jax.run.parallel import data_parallel
from fmnist_jax.steps import create_train_state


def time_device_split(cfg: TrainConfig, train: data.Split, *, batch_sizes: list[int],
                      device_counts: list[int], rounds: int,
                      log_fn: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Train epochs of `cfg` (its batch size replaced by each of `batch_sizes`) on all of
    `train`, split over each of `device_counts` devices, `rounds` epochs each, interleaved.
    One row per (batch size, device count): compile seconds, every epoch's seconds, their
    median, that median over the first device count's median at the same batch size, and
    the ratio of each round's epoch to the first device count's in the same round."""
    norm = data.normalization_for(cfg.normalization, train.images_NxHxWx1)
    runs = {}
    for batch_size in batch_sizes:
        for count in device_counts:
            run_cfg = dataclasses.replace(cfg, batch_size=batch_size,
                                          eval_batch_size=batch_size)
            state = create_train_state(
                get_model(cfg.model), make_optimizer(run_cfg, len(train) // batch_size),
                streams.stream_key(cfg.seed, streams.INIT))
            compiled = CompiledEpochs(
                state, (train.images_NxHxWx1, train.labels_N), {}, batch_size=batch_size,
                eval_batch_size=batch_size, norm=norm, key=streams.epoch_shuffle_key(cfg.seed, 1),
                options=step_options(run_cfg),
                parallel=data_parallel(jax.devices()[:count]))
            runs[batch_size, count] = {"compiled": compiled, "state": state, "epoch_s": []}
            log_fn(f"batch {batch_size:4d} on {count} device(s): compiled in "
                   f"{compiled.compile_seconds:.2f} s")
    for epoch in range(1, rounds + 1):
        for (batch_size, count), run in runs.items():
            run["state"], _, seconds = run["compiled"].train(
                run["state"], streams.epoch_shuffle_key(cfg.seed, epoch))
            run["epoch_s"].append(seconds)
            log_fn(f"round {epoch} batch {batch_size:4d} on {count} device(s): {seconds:.3f} s"
                   f"  (load {os.getloadavg()[0]:.1f})")
    rows = []
    for (batch_size, count), run in runs.items():
        median = statistics.median(run["epoch_s"])
        first_s = runs[batch_size, device_counts[0]]["epoch_s"]
        # Each round's ratio pairs epochs run back to back, under nearly the same load.
        round_ratios = [s / f for s, f in zip(run["epoch_s"], first_s)]
        rows.append({"batch_size": batch_size, "devices": count,
                     "compile_s": run["compiled"].compile_seconds, "epoch_s": run["epoch_s"],
                     "median_s": median, "vs_first": median / statistics.median(first_s),
                     "round_ratios": round_ratios,
                     "median_round_ratio": statistics.median(round_ratios)})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    first = rows[0]["devices"]
    lines = [f"| batch | devices | compile s | s/epoch median (min-max) | median / {first} "
             f"device(s) | per-round ratios (median) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratios = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        lines.append(f"| {r['batch_size']} | {r['devices']} | {r['compile_s']:.2f} | "
                     f"{r['median_s']:.3f} ({min(r['epoch_s']):.3f}-{max(r['epoch_s']):.3f}) | "
                     f"{r['vs_first']:.2f}x | {ratios} ({r['median_round_ratio']:.2f}x) |")
    return "\n".join(lines)
