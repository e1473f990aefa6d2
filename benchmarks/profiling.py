"""Per-image cost of a LeNet-5 training step, JAX against torch-tensors PyTorch, in one process.

Used by `python -m benchmarks.profile_step`. Every number is a wall-clock time read after
`block_until_ready` (JAX) or after the step loop returns (torch on CPU runs synchronously),
with compilation and torch's first steps excluded. The machine is shared and noisy, so the
figures that mean something are RATIOS of runs interleaved in the same process: each round
runs every pipeline once, and the median over rounds is reported.

- `step_costs`: one `steps.train_epoch` (a `lax.scan` of K train steps, shuffled gather
  included) against `torch_train.train_epoch_tensors` over the same K batches.
- `op_breakdown`: one JAX step's time split by layer, by timing jitted forward+backward
  pieces in isolation (see its docstring for what each piece contains).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmnist_jax.data import HALF
from fmnist_jax.steps import create_train_state, train_epoch


def random_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


class JaxEpoch:
    """`steps.train_epoch` of `model` + Adam, compiled once for (n images, batch)."""

    def __init__(self, model: nn.Module, images_NxHxWx1, labels_N, batch_size: int):
        self.xy = jax.device_put((images_NxHxWx1, labels_N))
        self.state = create_train_state(model, optax.adam(1e-3), jax.random.key(0))
        self.key = jax.random.key(1)
        self.fn = train_epoch.lower(self.state, *self.xy, self.key,
                                    batch_size=batch_size, norm=HALF).compile()
        self.run()  # first run: allocations, thread pools

    def run(self) -> float:
        t0 = time.perf_counter()
        self.state, sums = self.fn(self.state, *self.xy, self.key, norm=HALF)
        jax.block_until_ready((self.state, sums))
        return time.perf_counter() - t0


class TorchEpoch:
    """`torch_train.train_epoch_tensors` over a fixed (steps, batch) order."""

    def __init__(self, images_NxHxWx1, labels_N, batch_size: int):
        from fmnist_jax.baseline import torch_train as tl

        self.tl = tl
        self.setup = tl.make_setup(device="cpu", seed=0)
        self.data = tl.to_device_split(images_NxHxWx1, labels_N, "cpu")
        n = len(labels_N)
        order_N = np.random.default_rng(0).permutation(n)
        self.order_SxB = order_N[: n // batch_size * batch_size].reshape(-1, batch_size)
        tl.train_epoch_tensors(self.setup, self.data, self.order_SxB[:5])  # warm-up

    def run(self) -> float:
        t0 = time.perf_counter()
        self.tl.train_epoch_tensors(self.setup, self.data, self.order_SxB)
        return time.perf_counter() - t0


def interleaved(runners: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            times[k].append(fn())
    return times


def step_costs(models: dict[str, nn.Module], batch_sizes: Sequence[int] = (64, 256, 1024), *,
               images_per_run: int = 8192, rounds: int = 5, torch: bool = True,
               log: Callable[[str], object] = print) -> dict[int, dict[str, float]]:
    """Median microseconds per image of a training step, per batch size and pipeline.

    Each run trains on `images_per_run` random images (images_per_run // batch steps).
    Returns {batch: {name: us_per_image}} plus 'name/torch' ratios when torch runs.
    """
    out: dict[int, dict[str, float]] = {}
    images_NxHxWx1, labels_N = random_images(images_per_run)
    for b in batch_sizes:
        runners: dict[str, Callable[[], float]] = {}
        if torch:
            runners["torch"] = TorchEpoch(images_NxHxWx1, labels_N, b).run
        for name, model in models.items():
            runners[name] = JaxEpoch(model, images_NxHxWx1, labels_N, b).run
        times = interleaved(runners, rounds)
        n = images_per_run // b * b
        us = {k: statistics.median(v) / n * 1e6 for k, v in times.items()}
        if torch:
            us.update({f"{k}/torch": us[k] / us["torch"] for k in models})
        out[b] = us
        log(f"batch {b:5d}: " + "  ".join(
            f"{k} {v:.3f}" if "/" in k else f"{k} {v:.1f} us/img" for k, v in us.items()))
    return out


# ----------------------------------------------------------------------- per-op breakdown


def op_breakdown(model: nn.Module, batch_size: int = 64, *, steps: int = 20,
                 trace_dir: str | None = None) -> tuple[float, list[tuple[float, str, str, str]]]:
    """Where one JAX train step's time goes, per compiled XLA op, from a `jax.profiler` trace.

    Runs `steps.train_epoch` (a scan of `steps` train steps) once untraced, then once under
    `jax.profiler.trace`; the XLA CPU runtime records one event per executed thunk (fusion,
    dot, concatenate...), named as in the compiled HLO, whose `op_name` metadata says which
    layer (and forward `jvp` or backward `transpose`) it came from. Returns (sum over thunks in
    us per step, [(us per step, thunk name, HLO shape, op_name)] most expensive first).
    """
    import glob
    import gzip
    import json
    import re
    import tempfile
    from collections import Counter

    images_NxHxWx1, labels_N = random_images(batch_size * steps)
    run = JaxEpoch(model, images_NxHxWx1, labels_N, batch_size)
    meta = {}
    for line in run.fn.as_text().splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*op_name="([^"]+)"', line)
        if m:
            meta[m.group(1)] = (m.group(2).split("{")[0], m.group(3).split("closed_call/")[-1])
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="fmnist_trace_")
    run.run()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    run.run()
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    us = Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in meta:
            us[e["name"]] += e["dur"]
    rows = [(v / steps, k, *meta[k]) for k, v in us.most_common()]
    return sum(r[0] for r in rows), rows


def _lenet5_dense_head(x):
    """LeNet-5's flatten and dense layers (fc1, fc2, fc3), called inside a compact module."""
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120, name="fc1")(x))
    x = nn.relu(nn.Dense(84, name="fc2")(x))
    return nn.Dense(10, name="fc3")(x)


class _Im2colLeNet5(nn.Module):
    """LeNet-5 with the im2col conv, then bias, ReLU, and a reshape-max pool differentiated
    by jnp (ties counted and split). Same parameters; for comparisons."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        from fmnist_jax.layers import Conv

        def pool(x):
            b, h, w, c = x.shape
            return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

        x = pool(nn.relu(Conv(6, (5, 5), padding=2, impl="im2col", name="conv1")(x)))
        x = pool(nn.relu(Conv(16, (5, 5), padding="VALID", impl="im2col", name="conv2")(x)))
        return _lenet5_dense_head(x)


def im2col_lenet5() -> nn.Module:
    return _Im2colLeNet5()


class _Toeplitz3dRowsLeNet5(nn.Module):
    """LeNet-5 with the row-Toeplitz matmul on 3-D rows (B, Ho, L), then the NHWC
    select-gradient pool, bias and ReLU. Same parameters; for comparisons with
    `conv_forms.conv_pool_toeplitz` (2-D rows, one layout with the pool)."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        from fmnist_jax.conv_forms import _banded_kernel, _toeplitz_rows, max_pool_2x2
        from fmnist_jax.layers import Conv

        class ConvPool(Conv):
            @nn.compact
            def __call__(self, x):
                _, pads = self._matmul_case(x)
                x, kernel, bias = self._params(x)
                (kh, kw, _, f), ((p, _), _) = kernel.shape, pads
                b, h, w, _ = x.shape
                ho, wo = h + 2 * p - kh + 1, w + 2 * p - kw + 1
                padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
                rows_BxHxL = _toeplitz_rows(padded, kh, ho, 1).reshape(b, ho, -1)
                conv_BxHxWxF = (rows_BxHxL @ _banded_kernel(kernel, w + 2 * p, list(range(wo)))
                                ).reshape(b, ho, wo, f)
                return nn.relu(max_pool_2x2(conv_BxHxWxF) + bias.reshape(1, 1, 1, -1))

        x = ConvPool(6, (5, 5), padding=2, name="conv1")(x)
        x = ConvPool(16, (5, 5), padding=0, name="conv2")(x)
        return _lenet5_dense_head(x)


def toeplitz_3d_rows_lenet5() -> nn.Module:
    return _Toeplitz3dRowsLeNet5()


class _TutorialCNNWith(nn.Module):
    """The tutorial CNN with each conv's formulation forced (same parameters as the model)."""

    conv1_impl: str
    conv2_impl: str

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        from fmnist_jax.layers import ConvReluPool

        x = ConvReluPool(16, (3, 3), padding=1, impl=self.conv1_impl, name="conv1")(x)
        x = ConvReluPool(32, (3, 3), padding=1, impl=self.conv2_impl, name="conv2")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


def cnn_formulations(batch_size: int = 32, *, images_per_run: int = 2048, rounds: int = 3,
                     log: Callable[[str], object] = print) -> dict[str, float]:
    """Median microseconds per image of a tutorial-CNN training step for each per-layer choice
    of conv formulation (conv1+conv2), interleaved in this process."""
    images_NxHxWx1, labels_N = random_images(images_per_run)
    pairs = [("im2col", "im2col"), ("im2col", "shifted"), ("toeplitz", "im2col"),
             ("toeplitz", "toeplitz"), ("lax", "lax")]
    runners = {f"{a}+{b}": JaxEpoch(_TutorialCNNWith(a, b), images_NxHxWx1, labels_N,
                                    batch_size).run
               for a, b in pairs}
    times = interleaved(runners, rounds)
    n = images_per_run // batch_size * batch_size
    us = {k: statistics.median(v) / n * 1e6 for k, v in times.items()}
    for k, v in us.items():
        log(f"tutorial CNN, batch {batch_size}, conv1+conv2 {k}: {v:.1f} us/img")
    return us


# (H=W, Cin, Cout, kernel, stride, padding): the models' layers, the user model's
# (benchmarks.user_model), strided, 1x1 and 7x7 ones, and shallow to deep kh x Cin (where
# the shifted form starts to pay).
LAYER_SHAPES = [(28, 1, 6, 5, 1, 2), (14, 6, 16, 5, 1, "VALID"), (28, 1, 16, 3, 1, 1),
                (14, 16, 32, 3, 1, 1), (28, 1, 32, 5, 1, "SAME"), (14, 32, 64, 5, 1, "SAME"),
                (28, 1, 32, 5, 2, "SAME"), (28, 8, 16, 3, 2, "SAME"), (14, 32, 64, 3, 2, "SAME"),
                (14, 32, 64, 1, 1, "VALID"), (28, 1, 16, 7, 1, "SAME"),
                (14, 16, 32, 7, 1, "SAME"), (14, 6, 16, 3, 1, "SAME"), (14, 4, 24, 5, 1, "SAME"),
                (28, 4, 32, 3, 1, "SAME"), (28, 3, 32, 5, 1, "SAME"), (14, 8, 32, 3, 1, "SAME"),
                (14, 16, 64, 5, 1, "SAME")]


def layer_program(module, batch: int, hw: int, c_in: int, iters: int
                  ) -> tuple[float, Callable[[], float]]:
    """(compile seconds, run() -> seconds) of a jitted loop of `iters` forward+backward passes
    of the conv layer `module` on a (batch, hw, hw, c_in) input, its parameters updated each
    pass as a training step would (and the input's gradient taken unless the layer is a first
    one, Cin = 1)."""
    x = jax.random.normal(jax.random.key(1), (batch, hw, hw, c_in))
    params = module.init(jax.random.key(2), x)
    cot = jax.random.normal(jax.random.key(3), jax.eval_shape(module.apply, params, x).shape)

    def loss(p, x, scale):
        return jnp.sum(module.apply(p, x * scale) * (cot * scale))

    def run(p, x):
        def body(i, carry):
            # an input and output gradient that change each pass, as a training step's do:
            # constant ones would let XLA hoist their patches (or rows) out of the loop
            p, acc = carry
            scale = 1.0 + 1e-6 * i.astype(jnp.float32)
            if c_in == 1:
                g, gx = jax.grad(loss)(p, x, scale), 0.0
            else:
                g, gx = jax.grad(loss, argnums=(0, 1))(p, x, scale)
                gx = jnp.sum(gx)
            return jax.tree_util.tree_map(lambda a, b: a - 1e-4 * b, p, g), acc + gx
        return jax.lax.fori_loop(0, iters, body, (p, jnp.float32(0.0)))

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, x))  # first run: allocations

    def timed() -> float:
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        return time.perf_counter() - t
    return compile_s, timed


def _conv_program(impl: str, shape: tuple, batch: int, iters: int) -> Callable[[], float]:
    """run() -> seconds of `layer_program` for one `layers.Conv` forced to `impl`."""
    from fmnist_jax.layers import Conv

    hw, c_in, c_out, k, stride, padding = shape
    module = Conv(c_out, (k, k), strides=stride, padding=padding, impl=impl)
    return layer_program(module, batch, hw, c_in, iters)[1]


def layer_formulations(shapes=LAYER_SHAPES, batch_size: int = 64, *, iters: int = 10,
                       rounds: int = 3, impls=("toeplitz", "im2col", "shifted", "lax"),
                       log: Callable[[str], object] = print) -> list[dict]:
    """Median microseconds per image of one conv layer's forward and backward pass, per
    formulation, interleaved round by round in this process; and which one
    `layers.conv_and_pool_impl` picks on a CPU."""
    import jax.numpy as jnp

    from fmnist_jax.layers import Conv, conv_and_pool_impl

    rows = []
    for shape in shapes:
        hw, c_in, c_out, k, stride, padding = shape
        runners = {impl: _conv_program(impl, shape, batch_size, iters) for impl in impls}
        times = interleaved(runners, rounds)
        us = {impl: statistics.median(t) / (iters * batch_size) * 1e6 for impl, t in times.items()}
        module = Conv(c_out, (k, k), strides=stride, padding=padding)
        _, pads = module._matmul_case(jnp.zeros((1, hw, hw, c_in)))
        picked = conv_and_pool_impl("cpu", (k, k, c_in, c_out), (stride, stride),
                                    hw + sum(pads[1]))[0]
        rows.append({"shape": shape, "us": us, "picked": picked})
        log(f"{hw}x{hw} {c_in:2d}->{c_out:2d} {k}x{k} stride {stride} {str(padding):5s}: "
            + "  ".join(f"{impl} {v:7.1f}" for impl, v in us.items())
            + f"  us/img; fastest {min(us, key=us.get)}, picked {picked}")
    return rows
