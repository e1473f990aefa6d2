"""Epoch time of `--seeds K` for several K, in one process, against one ordinary run:

    python -m benchmarks.time_seeds                          # lenet5, K = 1, 3, 8, 32
    python -m benchmarks.time_seeds --seeds-list 1,3 --epochs 2 --train-images 6400
    python -m benchmarks.time_seeds --cpu-devices 1          # no device split

For each K: the preset's K members (seeds 0..K-1, each its own validation split of the
training images) are set up as `train.py --seeds K` sets them up and compiled ahead of time
(timed apart). Then `--epochs` rounds, each one epoch of every K in turn, so that a change in
the machine's load hits them alike; each epoch's clock stops after block_until_ready on its
metrics (`epochs.CompiledSeedEpochs.train`). The baseline is the ordinary one-model epoch
(`epochs.CompiledEpochs`, what `--seeds 1` runs), in the same rounds. Evaluation and
checkpoints are not timed. Prints one markdown row per program.

The CPU is split into one XLA device per core (`--cpu-devices`, default: the cores this
process may use). Each K runs twice: all K in lockstep under one vmap on one device, and as
`train.py --seeds K` runs it (a device per core up to one per seed, each device's seeds
one after another: `benchmarks.seed_timing`). The one-model epoch runs on one device.
"""

import argparse
import os

from fmnist_jax import data
from fmnist_jax.run import parallel
from fmnist_jax.run.presets import get_config
from benchmarks.seed_timing import time_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lenet5")
    parser.add_argument("--seeds-list", default="1,3,8,32", help="the K to time")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per K (median)")
    parser.add_argument("--train-images", type=int, help="only the first N training images")
    parser.add_argument("--cpu-devices", type=int, default=len(os.sched_getaffinity(0)),
                        help="split the CPU into N XLA devices (default: one per core)")
    parser.add_argument("--data-dir")
    parser.add_argument("--manual-dir")
    args = parser.parse_args()
    parallel.use_cpu_devices(args.cpu_devices)
    cfg = get_config(args.preset)
    train, _ = data.load(data_dir=args.data_dir, manual_dir=args.manual_dir)
    if args.train_images:
        train = data.Split(train.images_NxHxWx1[: args.train_images],
                           train.labels_N[: args.train_images])
    import jax

    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, jax "
          f"{jax.__version__}; preset "
          f"{args.preset}, {len(train)} training images given, {args.epochs} timed epoch(s) "
          f"per K")
    print(time_seeds(cfg, train, [int(k) for k in args.seeds_list.split(",")], args.epochs))


if __name__ == "__main__":
    main()
