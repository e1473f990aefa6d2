"""A user's own Flax CNN trained on a CPU: with nn.Conv and nn.max_pool, with
`fmnist_jax.layers.Conv` and `layers.max_pool` in their place, and the same model in PyTorch.

    python -m benchmarks.user_model --manual-dir DIR      # an epoch each, 2 rounds
    python -m benchmarks.user_model --synthetic --images 6400 --rounds 3
    python -m benchmarks.user_model --smoke               # a tiny run, for the tests

The model, as a user would write it: conv 32@5x5 'SAME', ReLU, max-pool 2x2 -> conv 64@5x5
'SAME', ReLU, max-pool 2x2 -> flatten 3136 -> dense 10 (83,466 parameters). The two Flax
versions differ only in the layer they call, and share one set of initial weights (the same
parameter names: a checkpoint of one loads into the other). Each trains `--images` training
images (default all 60,000: one epoch; nn.Conv only `--nn-conv-images` of them, its time
scaled to the epoch) with Adam 1e-3, batch 64 (the project default): JAX
through `steps.train_epoch` (one lax.scan per epoch, data on the device), torch through
`baseline.torch_train.train_epoch_tensors` (the split as tensors, index batches).

Timing: compilation (JAX) and a few warm-up steps (both) happen before any clock and are
reported apart; then `--rounds` rounds, each one epoch of every pipeline in turn, so a change
in the machine's load hits them alike; each clock stops after block_until_ready (torch on a
CPU runs synchronously). Reported: each pipeline's median epoch time and its ratio to
torch's, and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmnist_jax import data, layers
from fmnist_jax.data import HALF
from fmnist_jax.errors import FmnistError
from fmnist_jax.files import first_line
from fmnist_jax.models import count_params
from fmnist_jax.steps import create_train_state, train_epoch

PIPELINES = ("flax-nn-conv", "fmnist-conv", "torch")
WARMUP_STEPS = 5


class UserCNN(nn.Module):
    """The user's model, written once; `conv` and `pool` are nn.Conv and nn.max_pool, or
    their drop-ins layers.Conv and layers.max_pool."""

    conv: Callable = nn.Conv
    pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x_BxHxWx1: jax.Array) -> jax.Array:
        x = self.pool(nn.relu(self.conv(32, (5, 5), padding="SAME")(x_BxHxWx1)), (2, 2),
                      strides=(2, 2))  # (B, 14, 14, 32)
        x = self.pool(nn.relu(self.conv(64, (5, 5), padding="SAME")(x)), (2, 2),
                      strides=(2, 2))  # (B, 7, 7, 64)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


FLAX_MODELS = {"flax-nn-conv": UserCNN(nn.Conv, nn.max_pool),
               "fmnist-conv": UserCNN(layers.Conv, layers.max_pool)}


class JaxEpochs:
    """`steps.train_epoch` of one model + Adam over the given images, compiled (timed) and
    warmed up on a few batches of its own before the first timed epoch."""

    def __init__(self, model: nn.Module, params, images_NxHxWx1, labels_N, batch_size: int,
                 warmup: bool = True):
        tx = optax.adam(1e-3)  # one object: the compiled epoch takes states of this tx only

        def fresh_state():
            return create_train_state(model, tx, jax.random.key(0)).replace(
                params=jax.tree_util.tree_map(jnp.array, params))

        self.state = fresh_state()
        self.xy = jax.device_put((images_NxHxWx1, labels_N))
        self.key = jax.random.key(1)
        t0 = time.perf_counter()
        self.fn = train_epoch.lower(self.state, *self.xy, self.key, batch_size=batch_size,
                                    norm=HALF).compile()
        self.compile_s = time.perf_counter() - t0
        # Warm-up (thread pools, allocations): a long epoch warms up on a short one, its own
        # small program, so a slow pipeline does not spend a whole epoch before the clock.
        if not warmup:
            pass
        elif len(labels_N) // batch_size <= WARMUP_STEPS:
            self.run()
        else:
            few = jax.device_put((images_NxHxWx1[:WARMUP_STEPS * batch_size],
                                  labels_N[:WARMUP_STEPS * batch_size]))
            jax.block_until_ready(train_epoch(fresh_state(), *few, self.key,
                                              batch_size=batch_size, norm=HALF))
        self.state = fresh_state()

    def run(self) -> float:
        t0 = time.perf_counter()
        self.state, sums = self.fn(self.state, *self.xy, self.key, norm=HALF)
        jax.block_until_ready((self.state, sums))
        return time.perf_counter() - t0


def torch_epochs(images_NxHxWx1, labels_N, batch_size: int) -> tuple[Callable[[], float], int]:
    """(run() -> seconds of one torch epoch, the torch model's parameter count)."""
    from fmnist_jax.baseline import torch_train as tl

    import torch
    from torch import nn as tnn
    import torch.nn.functional as F

    class TorchUserCNN(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(1, 32, 5, padding=2)
            self.conv2 = tnn.Conv2d(32, 64, 5, padding=2)
            self.fc = tnn.Linear(64 * 7 * 7, 10)

        def forward(self, x_Bx1xHxW):
            x = F.max_pool2d(F.relu(self.conv1(x_Bx1xHxW)), 2)  # (B, 32, 14, 14)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, 7, 7)
            return self.fc(torch.flatten(x, 1))

    torch.manual_seed(0)
    net = TorchUserCNN()
    setup = tl.TorchSetup(model=net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
                          device=torch.device("cpu"), forward=net)
    split = tl.to_device_split(images_NxHxWx1, labels_N, "cpu")
    n = len(labels_N)
    order_SxB = np.random.default_rng(0).permutation(n)[: n // batch_size * batch_size]
    order_SxB = order_SxB.reshape(-1, batch_size)
    tl.train_epoch_tensors(setup, split, order_SxB[:WARMUP_STEPS])  # warm-up

    def run() -> float:
        t0 = time.perf_counter()
        tl.train_epoch_tensors(setup, split, order_SxB)
        return time.perf_counter() - t0
    return run, sum(p.numel() for p in net.parameters())


def load_average() -> float:
    return os.getloadavg()[0]


def time_pipelines(images_NxHxWx1, labels_N, *, batch_size: int = 64, rounds: int = 2,
                   pipelines=PIPELINES, nn_conv_images: int | None = None, warmup: bool = True,
                   log: Callable[[str], object] = print) -> list[dict]:
    """One row per pipeline: median epoch seconds, every round's, set-up (compile and
    warm-up) seconds, and the ratio to torch's median (when torch runs).

    `nn_conv_images`: the nn.Conv pipeline trains only the first that many images (XLA's
    CPU convolution takes many times the others' epoch), and its times are scaled to the
    whole epoch by the number of steps (a scan's steps all cost the same); the row says so.
    """
    params = jax.jit(FLAX_MODELS["fmnist-conv"].init)(
        jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    steps = len(labels_N) // batch_size
    runners, setup_s, compile_s, n_params, scale, images = {}, {}, {}, {}, {}, {}
    for name in pipelines:
        t0 = time.perf_counter()
        n = len(labels_N)
        if name == "flax-nn-conv" and nn_conv_images and nn_conv_images < n:
            n = nn_conv_images // batch_size * batch_size
        images[name], scale[name] = n, steps / (n // batch_size)
        if name == "torch":
            runners[name], n_params[name] = torch_epochs(images_NxHxWx1, labels_N, batch_size)
        else:
            epochs = JaxEpochs(FLAX_MODELS[name], params, images_NxHxWx1[:n], labels_N[:n],
                               batch_size, warmup)
            runners[name], n_params[name] = epochs.run, count_params(params)
            compile_s[name] = epochs.compile_s
        setup_s[name] = time.perf_counter() - t0
        log(f"{name}: set up in {setup_s[name]:.1f} s"
            + (f" (compile {compile_s[name]:.1f} s)" if name in compile_s else "")
            + f", {n_params[name]:,} parameters, {n:,} images an epoch")
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for r in range(rounds):
        for name, run in runners.items():
            times[name].append(run() * scale[name])
            log(f"round {r + 1}: {name} {times[name][-1]:.2f} s an epoch "
                f"(load {load_average():.2f})")
    rows = [{"pipeline": name, "epoch_s": statistics.median(t), "rounds_s": t,
             "setup_s": setup_s[name], "params": n_params[name], "images": images[name]}
            for name, t in times.items()]
    if "torch" in times:
        for row in rows:
            row["vs_torch"] = row["epoch_s"] / statistics.median(times["torch"])
    return rows


def markdown_table(rows: list[dict], images: int) -> str:
    lines = [f"| pipeline | epoch of {images:,} images (median) | every round | "
             "compile / warm-up | / torch |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        ratio = f"{row['vs_torch']:.2f}" if "vs_torch" in row else "-"
        scaled = (f" (scaled from {row['images']:,} images)" if row["images"] < images
                  else "")
        lines.append(f"| {row['pipeline']}{scaled} | {row['epoch_s']:.2f} s | "
                     + ", ".join(f"{t:.2f}" for t in row["rounds_s"])
                     + f" | {row['setup_s']:.1f} s | {ratio} |")
    return "\n".join(lines)


def synthetic_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60000,
                    help="training images per epoch (default: all 60,000)")
    ap.add_argument("--rounds", type=int, default=2, help="epochs of each pipeline, in turn")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--nn-conv-images", type=int, default=3200,
                    help="the nn.Conv pipeline trains only this many images, its time scaled "
                         "to the epoch (0: the whole epoch; XLA's CPU conv is slow)")
    ap.add_argument("--pipelines", default=",".join(PIPELINES),
                    help=f"comma-separated, from {', '.join(PIPELINES)}")
    ap.add_argument("--manual-dir", default=os.environ.get(data.MANUAL_DIR_ENV),
                    help=f"the official .gz files (default ${data.MANUAL_DIR_ENV})")
    ap.add_argument("--synthetic", action="store_true",
                    help="random uint8 images of the same shape instead of the real data")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny run: 16 synthetic images, batch 8 (nn.Conv: 8), one round, no warm-up")
    a = ap.parse_args()
    try:
        pipelines = tuple(p for p in a.pipelines.split(",") if p)
        unknown = [p for p in pipelines if p not in PIPELINES]
        if unknown or not pipelines:
            raise FmnistError(f"unknown pipelines {unknown}: choose from {', '.join(PIPELINES)}")
        if a.smoke:
            a.images, a.rounds, a.batch_size, a.synthetic = 16, 1, 8, True
            a.nn_conv_images = 8
        if a.batch_size < 1 or a.images < a.batch_size or a.rounds < 1:
            raise FmnistError(f"--images {a.images} must hold a batch of --batch-size "
                              f"{a.batch_size}, and --rounds be at least 1")
        if a.nn_conv_images and a.nn_conv_images < a.batch_size:
            raise FmnistError(f"--nn-conv-images {a.nn_conv_images} must hold a batch of "
                              f"--batch-size {a.batch_size} (or be 0: the whole epoch)")
        if a.synthetic:
            images_NxHxWx1, labels_N = synthetic_images(a.images)
            source = "synthetic images"
        else:
            if not a.manual_dir:
                raise FmnistError(f"no data: pass --manual-dir DIR (the official .gz files, or "
                                  f"set {data.MANUAL_DIR_ENV}), or --synthetic")
            train, _ = data.load(manual_dir=a.manual_dir, source="idx")
            if a.images > len(train.labels_N):
                raise FmnistError(f"--images {a.images}: the training split has "
                                  f"{len(train.labels_N)}")
            images_NxHxWx1 = train.images_NxHxWx1[:a.images]
            labels_N = train.labels_N[:a.images]
            source = f"the first {a.images:,} Fashion-MNIST training images"
        start_load = load_average()
        print(f"{source}, batch {a.batch_size}, {a.rounds} rounds; jax backend "
              f"{jax.default_backend()}, load average {start_load:.2f} at the start")
        rows = time_pipelines(images_NxHxWx1, labels_N, batch_size=a.batch_size,
                              rounds=a.rounds, pipelines=pipelines,
                              nn_conv_images=a.nn_conv_images, warmup=not a.smoke)
    except FmnistError as e:
        raise SystemExit(f"error: {first_line(e)}") from None
    print(markdown_table(rows, len(labels_N)))
    print(f"load average: {start_load:.2f} at the start, {load_average():.2f} at the end")


if __name__ == "__main__":
    main()
