"""Helpers shared by the tests: tiny learnable data, the tiny run's config, paths."""

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmnist_jax.data import Split
from fmnist_jax.steps import train_step

REPO = Path(__file__).resolve().parents[1]
SHARED_MANUAL_DIR = REPO.parent / "shared" / "datasets" / "fashion_mnist"


def needs(module: str):
    """Skip a test of a dependency's own behaviour where it is not installed (a GPU box that
    got the project with --no-deps: no tensorflow-datasets, no tensorboardX)."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"needs {module}")


# The batch size of the unit tests' single steps and augmentations (test_steps, test_augment,
# test_optim): with one shape across files, a test reuses what another compiled.
STEP_BATCH = 32


# One Adam(1e-3) object for the unit tests' LeNet-5 states. The optimizer is a static field of
# the state, so jit caches on its identity: tests in different files that jit a step or an
# epoch with the same shapes then share one compiled program.
SHARED_ADAM = optax.adam(1e-3)


# `steps.train_step` under jit, without donating the state (the tests reuse theirs): one
# compilation per model, options and shape. Run eagerly, JAX would compile each op on its
# own instead: about 8 s for a first LeNet-5 step, as much for the MLP, on this project's CPU.
jitted_train_step = jax.jit(train_step, static_argnames="options")


def make_split(n: int, seed: int = 0) -> Split:
    """n learnable images: class c has a bright horizontal bar at row 2c+4, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 4: 2 * c + 6, 4:24, 0] = 250
    return Split(images_NxHxWx1=images, labels_N=labels)


def step_batch(n: int = STEP_BATCH, seed: int = 0):
    """(images, labels) of `make_split(n, seed)` as device arrays: a unit test's batch."""
    import jax.numpy as jnp

    split = make_split(n, seed)
    return jnp.asarray(split.images_NxHxWx1), jnp.asarray(split.labels_N)


def tiny_config():
    """The config of the shared tiny run. Tests that train again use it too, so that XLA
    compiles the epoch once (no validation split: the run is uncalibrated)."""
    from fmnist_jax.run.presets import get_config

    return get_config(epochs=2, batch_size=32, eval_batch_size=100, val_fraction=0.0, seed=4)


def train_quietly(cfg, workdir, splits):
    """`train_and_evaluate` on (train, test) `splits`, without logs or a progress bar."""
    from fmnist_jax.run.loop import train_and_evaluate

    train, test = splits
    return train_and_evaluate(cfg, workdir, train=train, test=test, log_fn=lambda s: None,
                              progress=False)


def run_script(script: str, *args, timeout: float = 120, **kwargs):
    """`python scripts/SCRIPT args` (or `python -m benchmarks.NAME args` for a SCRIPT named
    so) from the repository root, with this checkout first on the import path (so a test
    runs this tree, not an installed copy); output captured as text."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}
    command = (["-m", script] if script.startswith("benchmarks.") else [f"scripts/{script}"])
    return subprocess.run([sys.executable, *command, *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout,
                          **kwargs)


def one_error_line(result) -> str:
    """The single `error: ...` line of a failed command, after checking it failed with exit 1
    and printed nothing else on stderr (no traceback, no log line)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def start_script(script: str, *args, **kwargs):
    """`run_script`'s command started in the background (a subprocess.Popen with this
    checkout first on the import path, stdout as text lines), for tests that kill it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, f"scripts/{script}", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=REPO, env=env, **kwargs)


def read_tensorboard_scalars(folder) -> dict[str, dict[str, dict[int, float]]]:
    """{split: {tag: {step: value}}} from the event files under `folder`/SPLIT/, read
    without TensorFlow: each file is TFRecord framing (length, its masked CRC-32C, the
    record, its masked CRC-32C) around Event protocol buffers. A step written twice
    fails the read: a run's events must hold every epoch once."""
    import struct
    from pathlib import Path

    from fmnist_jax.run.tensorboard import summary_writer_class

    summary_writer_class()  # imports tensorboardX without torch
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, dict[str, dict[int, float]]] = {}
    for path in sorted(Path(folder).glob("*/events.out.tfevents.*")):
        split = scalars.setdefault(path.parent.name, {})
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked_crc32c(header)
            record = data[offset + 12:offset + 12 + length]
            assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == \
                masked_crc32c(record), f"{path}: a record's checksum is wrong"
            offset += 16 + length
            event = Event.FromString(record)
            for value in event.summary.value:
                steps = split.setdefault(value.tag, {})
                assert event.step not in steps, f"{path}: {value.tag} step {event.step} twice"
                steps[event.step] = value.simple_value
    return scalars


def assert_close_to_scale(x, y):
    """|x - y| <= 1e-5 * max|y| + 1e-7: within 1e-5 of the array's own scale.

    A gradient entry is a float32 sum of thousands of products; summed in another order (any
    two conv formulations do) it moves by ~1e-7 of the terms' size, which for entries of
    size ~50 exceeds a flat 1e-5 even for nn.Conv against itself on another backend.
    """
    y = np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * float(np.max(np.abs(y))) + 1e-7)


def assert_trees_close_to_scale(a, b):
    jax.tree_util.tree_map(assert_close_to_scale, a, b)


class FlaxLeNet5(nn.Module):
    """LeNet5 written with nn.Conv and nn.max_pool: the reference for the whole model."""

    @nn.compact
    def __call__(self, x, *, train=False):
        pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
        x = pool(nn.relu(nn.Conv(6, (5, 5), padding=2, name="conv1")(x)))
        x = pool(nn.relu(nn.Conv(16, (5, 5), padding=0, name="conv2")(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(10, name="fc3")(x)


def assert_model_equals_flax(ours: nn.Module, ref: nn.Module) -> None:
    """`ours` and the reference `ref` (same parameter layout): the same init from one key,
    and logits, loss and gradients within 1e-5 on a batch of 8 random images."""
    from fmnist_jax.steps import init_variables

    x_BxHxWx1 = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    labels_B = jnp.arange(8) % 10
    # Ours through the package's jitted init (the parameters depend on the input's shape
    # only): compiled once per model, LeNet-5's shared with every LeNet-5 state of the suite,
    # where ours.init would run the model's forward pass eagerly, compiling op by op.
    params = init_variables(ours, jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                           ref.init(jax.random.key(0), x_BxHxWx1))  # same layout and init

    def logits_loss_grad(model):
        def loss(p):
            logits_BxC = model.apply(p, x_BxHxWx1)
            return (optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean(),
                    logits_BxC)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    ((l_ours, logits_ours), g_ours), ((l_ref, logits_ref), g_ref) = (logits_loss_grad(ours),
                                                                     logits_loss_grad(ref))
    np.testing.assert_allclose(logits_ours, logits_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_ours, l_ref, rtol=1e-5)
    assert_trees_close_to_scale(g_ours, g_ref)
