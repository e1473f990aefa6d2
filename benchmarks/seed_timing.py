"""Epoch time of `--seeds K` against one ordinary run (`python -m benchmarks.time_seeds`).

`time_seeds` sets up, for each K, the K members as `train.py --seeds K` does (each its own
validation split, one stacked state) and the ordinary one-model epoch, compiles each ahead of
time (timed apart), then runs rounds of one epoch of every program in turn, so that a change
of the machine's load hits them alike. Evaluation and checkpoints are not timed.

Every K runs twice: all K in lockstep under one `jax.vmap` on the first device, and as
`train.py --seeds K` runs it: on a CPU, split into one device per core up to one per seed
(`parallel.cpu_devices_for`, the process's devices standing for the cores), the members of
each device one after another (`parallel.members_at_once_for`, spare places where the
devices do not divide K); elsewhere every device, in lockstep. The one-model epoch runs on
the first device: what one model takes without splitting its batches (which on this
project's CPU costs more than it saves, BENCHMARKS.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import data, streams
from fmnist_jax.run import parallel
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.run.compiled import CompiledEpochs, CompiledSeedEpochs, step_options
from fmnist_jax.run.prepare import seed_members


def time_seeds(cfg: TrainConfig, train: data.Split, seeds_list: list[int],
               epochs: int) -> str:
    """Time `epochs` rounds of every K in `seeds_list` (in lockstep on one device, and as
    `train.py --seeds K` runs it) and of the one-model epoch; returns the markdown table, one
    row per program."""
    return markdown_table(seed_rows(cfg, train, seeds_list, epochs))


def seed_rows(cfg: TrainConfig, train: data.Split, seeds_list: list[int], epochs: int, *,
              time_left: Callable[[], float] | None = None,
              on_progress: Callable[[list[dict[str, Any]]], Any] | None = None
              ) -> list[dict[str, Any]]:
    """`time_seeds`'s measurements, one dict per program (K = 0: the one-model epoch).
    With `time_left` (seconds), a program is set up only while more than its predecessor
    took to set up is left, and a round only while a round's time is left; the programs
    left out are not in the rows. `on_progress` gets the rows so far after every round (a
    caller that may be stopped saves them)."""
    devices = jax.devices()
    configs = [(0, devices[:1], None)]  # (K, devices, members at once); K = 0: one model
    for k in seeds_list:
        configs.append((k, devices[:1], None))
        as_train_py = (devices[:parallel.cpu_devices_for(k, len(devices))]
                       if devices[0].platform == "cpu" else devices)
        at_once = parallel.members_at_once_for(devices[0].platform)
        if (len(as_train_py), at_once) != (1, None):
            configs.append((k, as_train_py, at_once))
    programs, setup_s = [], 0.0
    for k, program_devices, at_once in configs:
        if time_left is not None and programs and time_left() < 2 * setup_s:
            break
        t0 = time.perf_counter()
        programs.append(_Program(k, cfg, train, program_devices, at_once))
        setup_s = time.perf_counter() - t0
    seconds = [[] for _ in programs]

    def rows() -> list[dict[str, Any]]:
        done = []
        for (k, program_devices, at_once), program, times in zip(configs, programs, seconds):
            d = len(program_devices)
            done.append({"seeds": k, "devices": d,
                         "groups": parallel.seed_groups(k, d, at_once),
                         "members_at_once": at_once, "train_images_per_seed": program.n_train,
                         "compile_s": program.compile_seconds, "epoch_s": times,
                         "epoch_s_median": statistics.median(times)})
        return done

    for epoch in range(1, epochs + 1):  # round by round: a change of load hits every K
        t0 = time.perf_counter()
        for i, program in enumerate(programs):
            seconds[i].append(program.train(epoch))
        if on_progress is not None:
            on_progress(rows())
        if time_left is not None and time_left() < time.perf_counter() - t0:
            break
    return rows()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One markdown row per program of `seed_rows`, against the first row (one model)."""
    lines = ["| seeds K | devices | members | train images per seed | compile s | s/epoch "
             "(median) | epoch time / one run | per seed / one run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    baseline = rows[0]["epoch_s_median"]
    for row in rows:
        k, d, at_once, groups = row["seeds"], row["devices"], row["members_at_once"], row["groups"]
        median, times = row["epoch_s_median"], row["epoch_s"]
        label = "1 (one model, no vmap)" if k == 0 else str(k)
        spares = -k % groups
        where = str(d) if d == 1 else f"{d} ({groups} groups of seeds{_spares(spares)})"
        members = ("" if k == 0 else "in lockstep (vmap)" if at_once is None else
                   "one after another" if at_once == 1 else f"{at_once} at a time")
        lines.append(f"| {label} | {where} | {members} | {row['train_images_per_seed']} | "
                     f"{row['compile_s']:.2f} | "
                     f"{median:.2f} ({', '.join(f'{s:.2f}' for s in times)}) | "
                     f"{median / baseline:.2f}x | {median / baseline / max(k, 1):.2f}x |")
    return "\n".join(lines)


def _spares(count: int) -> str:
    return f", {count} spare place{'s' * (count > 1)}" if count else ""


class _Program:
    """K members (K = 0: the ordinary one-model program, seed 0) on `devices`, `at_once` of
    a group's members in lockstep, compiled; `train(epoch)` runs one epoch and returns its
    seconds."""

    def __init__(self, k, cfg, train, devices, at_once):
        self.k, self.seeds = k, list(range(max(k, 1)))
        splits, state_M, _ = seed_members(cfg, train.labels_N, self.seeds)
        self.n_train = len(splits[0][0])
        if k == 0:
            self.state = jax.tree_util.tree_map(lambda leaf_M: leaf_M[0], state_M)
            member_xy = (train.images_NxHxWx1[splits[0][0]], train.labels_N[splits[0][0]])
            self.compiled = CompiledEpochs(self.state, member_xy, {}, batch_size=cfg.batch_size,
                                           eval_batch_size=cfg.eval_batch_size, norm=data.HALF,
                                           key=streams.epoch_shuffle_key(0, 1),
                                           options=step_options(cfg),
                                           parallel=parallel.data_parallel(devices))
        else:
            self.state = state_M
            half_M = np.full(k, 0.5, np.float32)
            self.active_M = jnp.ones(k, bool)
            self.compiled = CompiledSeedEpochs(
                self.state, (train.images_NxHxWx1, train.labels_N),
                np.stack([t for t, _ in splits]).astype(np.int32), {},
                batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                norm_M=data.Normalization(half_M, half_M), key_M=self._keys(1),
                active_M=self.active_M, options=step_options(cfg),
                parallel=parallel.data_parallel(devices, members=k, members_at_once=at_once))
        self.compile_seconds = self.compiled.compile_seconds

    def _keys(self, epoch):
        return jnp.stack([streams.epoch_shuffle_key(seed, epoch) for seed in self.seeds])

    def train(self, epoch: int) -> float:
        if self.k == 0:
            self.state, _, seconds = self.compiled.train(self.state,
                                                         streams.epoch_shuffle_key(0, epoch))
        else:
            self.state, _, seconds = self.compiled.train(self.state, self._keys(epoch),
                                                         self.active_M)
        return seconds

