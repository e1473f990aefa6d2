"""Why nn.Conv trains slowly on a CPU, and what the matmuls alone cost.

    python -m benchmarks.xla_conv_in_loop            # batch 64, the user model's 32 -> 64 layer
    python -m benchmarks.xla_conv_in_loop --smoke    # tiny sizes, for the tests

1. One 5x5 'SAME' convolution through lax (nn.Conv's computation): its forward pass, the
   input's gradient and the kernel's gradient, each as one jitted call and inside a
   `fori_loop` (as in a training epoch's scan), milliseconds per pass. Inside a loop XLA:CPU
   runs the kernel's gradient outside its Eigen path (jax#12868).
2. The matmuls of the user model's two convolutions as im2col would run them (forward, the
   kernel's and the input's gradient), each a jitted `x @ y`, against `torch.mm` of the same
   shapes, and torch's two Conv2d layers forward and backward: the bound a matrix form can
   reach. Medians of `--reps` calls, after two warm-up calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_s(fn, reps: int) -> float:
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def conv_in_and_out_of_a_loop(batch: int, hw: int, c_in: int, c_out: int, reps: int,
                              loop: int) -> dict[str, tuple[float, float]]:
    """{piece: (ms as one call, ms per pass inside a fori_loop of `loop` passes)}."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, hw, hw, c_in), np.float32))
    k = jnp.asarray(rng.standard_normal((5, 5, c_in, c_out), np.float32) * 0.1)
    g = jnp.asarray(rng.standard_normal((batch, hw, hw, c_out), np.float32))

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    pieces = {"forward": conv,
              "input gradient": lambda x, k: jax.vjp(lambda x: conv(x, k), x)[1](g)[0],
              "kernel gradient": lambda x, k: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]}
    out = {}
    for name, piece in pieces.items():
        def looped(x, k, piece=piece):
            # an input that changes each pass, so XLA cannot hoist the piece out of the loop
            return jax.lax.fori_loop(
                0, loop, lambda i, acc: acc + piece(x * (1 + 1e-6 * i), k).sum(), 0.0)
        one, many = jax.jit(piece), jax.jit(looped)
        out[name] = (_median_s(lambda: one(x, k), reps) * 1e3,
                     _median_s(lambda: many(x, k), reps) / loop * 1e3)
    return out


def matmul_bound(batch: int, reps: int) -> dict[str, float]:
    """ms per step: the user model's conv matmuls in XLA and in torch.mm; torch's layers."""
    import torch

    shapes = {"conv1 forward": (batch * 784, 25, 32), "conv1 kernel": (25, batch * 784, 32),
              "conv2 forward": (batch * 196, 800, 64), "conv2 kernel": (800, batch * 196, 64),
              "conv2 input": (batch * 196, 1600, 32)}
    rng = np.random.default_rng(0)
    xla = tch = 0.0
    matmul = jax.jit(lambda a, b: a @ b)
    for m, k, n in shapes.values():
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        xla += _median_s(lambda: matmul(ja, jb), reps)
        tch += _median_s(lambda: torch.mm(ta, tb), reps)
    conv1, conv2 = torch.nn.Conv2d(1, 32, 5, padding=2), torch.nn.Conv2d(32, 64, 5, padding=2)
    x1 = torch.randn(batch, 1, 28, 28)
    x2 = torch.randn(batch, 32, 14, 14, requires_grad=True)

    def layers():
        (conv1(x1).sum() + conv2(x2).sum()).backward()
    return {"xla matmuls": xla * 1e3, "torch.mm": tch * 1e3,
            "torch layers": _median_s(layers, reps) * 1e3}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one rep")
    a = ap.parse_args(argv)
    batch, hw, c_in, c_out, loop = (2, 6, 2, 3, 2) if a.smoke else (64, 14, 32, 64, 5)
    reps = 1 if a.smoke else a.reps
    print(f"jax {jax.__version__} on {jax.default_backend()}, load {os.getloadavg()[0]:.2f}")
    for name, (one, looped) in conv_in_and_out_of_a_loop(batch, hw, c_in, c_out, reps,
                                                         loop).items():
        print(f"lax conv {c_in} -> {c_out} 5x5, batch {batch}, {name}: {one:.1f} ms as one "
              f"call, {looped:.1f} ms a pass in a loop")
    for name, ms in matmul_bound(2 if a.smoke else batch, reps).items():
        print(f"the user model's conv matmuls, {name}: {ms:.1f} ms a step")
    print(f"load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
