"""Epoch time of `--seeds K` for several K, in one process, against one ordinary run:

    python scripts/time_seeds.py                          # lenet5, K = 1, 3, 8, 32
    python scripts/time_seeds.py --seeds-list 1,3 --epochs 2 --train-images 6400

For each K: the preset's K members (seeds 0..K-1, each its own validation split of the
training images) are set up as `train.py --seeds K` sets them up and compiled ahead of time
(timed apart). Then `--epochs` rounds, each one epoch of every K in turn, so that a change in
the machine's load hits them alike; each epoch's clock stops after block_until_ready on its
metrics (`epochs.CompiledSeedEpochs.train`). The baseline is the ordinary one-model epoch
(`epochs.CompiledEpochs`, what `--seeds 1` runs), in the same rounds. Evaluation and
checkpoints are not timed. Prints one markdown row per K.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import data, streams
from fmnist_jax.config import get_config
from fmnist_jax.epochs import CompiledEpochs, CompiledSeedEpochs, step_options
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_optimizer, make_plateau
from fmnist_jax.steps import create_train_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lenet5")
    parser.add_argument("--seeds-list", default="1,3,8,32", help="the K to time")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per K (median)")
    parser.add_argument("--train-images", type=int, help="only the first N training images")
    parser.add_argument("--data-dir")
    parser.add_argument("--manual-dir")
    args = parser.parse_args()
    cfg = get_config(args.preset)
    train, _ = data.load(data_dir=args.data_dir, manual_dir=args.manual_dir)
    if args.train_images:
        train = data.Split(train.images_NxHxWx1[: args.train_images],
                           train.labels_N[: args.train_images])
    train_xy = jax.device_put((train.images_NxHxWx1, train.labels_N))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; preset "
          f"{args.preset}, {len(train)} training images given, {args.epochs} timed epoch(s) "
          f"per K")
    programs = {k: _set_up(k, cfg, train, train_xy) for k in
                [0] + [int(k) for k in args.seeds_list.split(",")]}  # 0: the one-model program
    seconds = {k: [] for k in programs}
    for epoch in range(1, args.epochs + 1):  # round by round: a change of load hits every K
        for k, program in programs.items():
            seconds[k].append(program.train(epoch))
    print("| seeds K | train images per seed | compile s | s/epoch (median) | epoch time / "
          "one run | per seed / one run |")
    print("| --- | --- | --- | --- | --- | --- |")
    baseline = statistics.median(seconds[0])
    for k, program in programs.items():
        median = statistics.median(seconds[k])
        label = "1 (one model, no vmap)" if k == 0 else str(k)
        print(f"| {label} | {program.n_train} | {program.compile_seconds:.2f} | {median:.2f} "
              f"({', '.join(f'{s:.2f}' for s in seconds[k])}) | {median / baseline:.2f}x | "
              f"{median / baseline / max(k, 1):.2f}x |", flush=True)


class _set_up:
    """K members (K = 0: the ordinary one-model program, seed 0), compiled; `train(epoch)`
    runs one epoch and returns its seconds."""

    def __init__(self, k, cfg, train, train_xy):
        self.k, self.seeds = k, list(range(max(k, 1)))
        splits = [data.train_val_indices(train.labels_N, cfg.val_fraction, seed)
                  for seed in self.seeds]
        self.n_train = len(splits[0][0])
        steps_per_epoch = self.n_train // cfg.batch_size
        model, tx = get_model(cfg.model), make_optimizer(cfg, steps_per_epoch)
        states = [create_train_state(model, tx, streams.stream_key(seed, streams.INIT),
                                     plateau_tx=make_plateau(cfg)) for seed in self.seeds]
        if k == 0:
            self.state = states[0]
            member_xy = jax.device_put((train.images_NxHxWx1[splits[0][0]],
                                        train.labels_N[splits[0][0]]))
            self.compiled = CompiledEpochs(self.state, member_xy, {}, batch_size=cfg.batch_size,
                                           eval_batch_size=cfg.eval_batch_size, norm=data.HALF,
                                           key=streams.epoch_shuffle_key(0, 1),
                                           options=step_options(cfg))
        else:
            self.state = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)
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


if __name__ == "__main__":
    main()
