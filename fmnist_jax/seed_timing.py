"""Epoch time of `--seeds K` against one ordinary run (`scripts/time_seeds.py`).

`time_seeds` sets up, for each K, the K members as `train.py --seeds K` does (each its own
validation split, one stacked state) and the ordinary one-model epoch, compiles each ahead of
time (timed apart), then runs rounds of one epoch of every program in turn, so that a change
of the machine's load hits them alike. Evaluation and checkpoints are not timed.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import data, streams
from fmnist_jax.config import TrainConfig
from fmnist_jax.epochs import CompiledEpochs, CompiledSeedEpochs, step_options
from fmnist_jax.train import seed_members


def time_seeds(cfg: TrainConfig, train: data.Split, seeds_list: list[int],
               epochs: int) -> str:
    """Time `epochs` rounds of every K in `seeds_list` and of the one-model epoch; returns
    the markdown table, one row per K."""
    train_xy = jax.device_put((train.images_NxHxWx1, train.labels_N))
    programs = {k: _Program(k, cfg, train, train_xy)
                for k in [0] + list(seeds_list)}  # 0: the one-model program
    seconds = {k: [] for k in programs}
    for epoch in range(1, epochs + 1):  # round by round: a change of load hits every K
        for k, program in programs.items():
            seconds[k].append(program.train(epoch))
    lines = ["| seeds K | train images per seed | compile s | s/epoch (median) | epoch time / "
             "one run | per seed / one run |", "| --- | --- | --- | --- | --- | --- |"]
    baseline = statistics.median(seconds[0])
    for k, program in programs.items():
        median = statistics.median(seconds[k])
        label = "1 (one model, no vmap)" if k == 0 else str(k)
        lines.append(f"| {label} | {program.n_train} | {program.compile_seconds:.2f} | "
                     f"{median:.2f} ({', '.join(f'{s:.2f}' for s in seconds[k])}) | "
                     f"{median / baseline:.2f}x | {median / baseline / max(k, 1):.2f}x |")
    return "\n".join(lines)


class _Program:
    """K members (K = 0: the ordinary one-model program, seed 0), compiled; `train(epoch)`
    runs one epoch and returns its seconds."""

    def __init__(self, k, cfg, train, train_xy):
        self.k, self.seeds = k, list(range(max(k, 1)))
        splits, state_M, _ = seed_members(cfg, train.labels_N, self.seeds)
        self.n_train = len(splits[0][0])
        if k == 0:
            self.state = jax.tree_util.tree_map(lambda leaf_M: leaf_M[0], state_M)
            member_xy = jax.device_put((train.images_NxHxWx1[splits[0][0]],
                                        train.labels_N[splits[0][0]]))
            self.compiled = CompiledEpochs(self.state, member_xy, {}, batch_size=cfg.batch_size,
                                           eval_batch_size=cfg.eval_batch_size, norm=data.HALF,
                                           key=streams.epoch_shuffle_key(0, 1),
                                           options=step_options(cfg))
        else:
            self.state = state_M
            half_M = np.full(k, 0.5, np.float32)
            self.active_M = jnp.ones(k, bool)
            self.compiled = CompiledSeedEpochs(
                self.state, train_xy,
                jax.device_put(np.stack([t for t, _ in splits]).astype(np.int32)), {},
                batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                norm_M=data.Normalization(half_M, half_M), key_M=self._keys(1),
                active_M=self.active_M, options=step_options(cfg))
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

