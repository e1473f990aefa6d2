"""The random streams of a run: every key a run uses comes from its seed through here.

One seed (`TrainConfig.seed`) feeds several independent streams, one per purpose, so that
adding a use of randomness never shifts the numbers of another. The stream numbers are fixed
forever: changing one changes every result of that seed.
"""

from __future__ import annotations

import jax

INIT = 0  # the model's initial parameters
SHUFFLE = 1  # the batch order: epoch e (1-based) uses fold_in(key, e)
VAL_SPLIT = 2  # which images of each class are held out for validation
BOOTSTRAP = 3  # the evaluation report's bootstrap resamples
BENCH_WARMUP = 4  # the batches the bench's torch pipelines warm up on, before the clock


def stream_key(seed: int, stream: int) -> jax.Array:
    """The key of `stream` (one of the constants above) for a run with this seed."""
    return jax.random.fold_in(jax.random.key(seed), stream)


def epoch_shuffle_key(seed: int, epoch: int) -> jax.Array:
    """The key `steps.train_epoch` shuffles (and draws its step keys) with in epoch `epoch`."""
    return jax.random.fold_in(stream_key(seed, SHUFFLE), epoch)
