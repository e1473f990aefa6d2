"""Flax linen models, picked by name with `get_model`.

Inputs are normalized float images (B, 28, 28, 1), NHWC; outputs are logits (B, 10).
Layer names (conv1, fc1, ...) are stable: checkpoints and the PyTorch weight exchange use them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmnist_jax.errors import FmnistError
from fmnist_jax.layers import Conv, ConvReluPool

NUM_CLASSES = 10


class LeNet5(nn.Module):
    """LeNet-5 as the LeNet-5 report's layer table: 61,706 parameters.

    conv 6@5x5 pad 2, ReLU, pool 2 -> conv 16@5x5 valid, ReLU, pool 2 -> flatten 400
    -> dense 120, ReLU -> dense 84, ReLU -> dense 10.
    """

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm: the same function in training and evaluation
        x = ConvReluPool(6, (5, 5), padding=2, name="conv1")(x_BxHxWx1)  # (B, 14, 14, 6)
        x = ConvReluPool(16, (5, 5), padding="VALID", name="conv2")(x)  # (B, 5, 5, 16)
        x = x.reshape(x.shape[0], -1)  # (B, 400), flattened in H, W, C order
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


class TutorialCNN(nn.Module):
    """The tutorial's CNN: conv 16 and 32 (3x3, pad 1), each ReLU + pool 2, dense 1568 -> 128, ReLU -> 10."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        x = ConvReluPool(16, (3, 3), padding=1, name="conv1")(x_BxHxWx1)  # (B, 14, 14, 16)
        x = ConvReluPool(32, (3, 3), padding=1, name="conv2")(x)  # (B, 7, 7, 32)
        x = x.reshape(x.shape[0], -1)  # (B, 1568)
        x = nn.relu(nn.Dense(128, name="fc1")(x))
        return nn.Dense(self.num_classes, name="fc2")(x)


class LeNet5GAP(nn.Module):
    """The practice article's LeNet-5 variant: the same two convolutions (the first 5x5 with
    padding), then global average pooling over the 10x10 map in place of the second pool,
    flatten and the two big dense layers: 16 features -> dense 10. 2,742 parameters."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        x = ConvReluPool(6, (5, 5), padding=2, name="conv1")(x_BxHxWx1)  # (B, 14, 14, 6)
        x = nn.relu(Conv(16, (5, 5), padding="VALID", name="conv2")(x))  # (B, 10, 10, 16)
        x = jnp.mean(x, axis=(1, 2))  # (B, 16)
        return nn.Dense(self.num_classes, name="fc")(x)


# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out), untruncated.
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm1d(nn.Module):
    """torch's nn.BatchNorm1d on (B, F) features, defaults included: momentum 0.1 (torch's
    convention: new = 0.9 old + 0.1 batch), eps 1e-5, scale 1 and bias 0.

    Why not `nn.BatchNorm`: in training both normalize by the batch's biased variance, but
    torch's running variance averages the batch's *unbiased* variance (times B / (B - 1)) and
    flax's the biased one, so with flax evaluation would divide by a variance 1/63 smaller
    at the notebook's batch 64. Everything else is flax's: the parameters "scale" and "bias",
    the running "mean" and "var" in the "batch_stats" collection (the names nn.BatchNorm
    uses, so checkpoints keep their layout), and no update while initializing.
    """

    momentum: float = 0.1  # torch's: the weight of the new batch
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x_BxF: jax.Array, *, train: bool) -> jax.Array:
        features = x_BxF.shape[-1]
        # float32 as flax's own layers, also where x64 makes float64 the default dtype.
        scale = self.param("scale", nn.initializers.ones_init(), (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if train:
            mean_F = jnp.mean(x_BxF, axis=0)
            var_F = jnp.mean(jnp.square(x_BxF - mean_F[None, :]), axis=0)  # biased: normalizes
            if not self.is_initializing():
                n = x_BxF.shape[0]
                unbiased_F = var_F * (n / max(n - 1, 1))
                running_mean.value = ((1 - self.momentum) * running_mean.value
                                      + self.momentum * mean_F)
                running_var.value = ((1 - self.momentum) * running_var.value
                                     + self.momentum * unbiased_F)
        else:
            mean_F, var_F = running_mean.value, running_var.value
        inv_F = jax.lax.rsqrt(var_F + self.epsilon) * scale
        return (x_BxF - mean_F[None, :]) * inv_F[None, :] + bias[None, :]


class MLP(nn.Module):
    """The notebook's MLP: 784 -> 512 -> 256 -> 128 -> 10; each hidden layer Dense, BatchNorm,
    ReLU, Dropout 0.3. Every dense kernel (the last layer's too: the notebook initializes all
    its nn.Linear) Kaiming-normal (fan_out, gain sqrt 2), every bias zero, as the notebook
    initializes them. 569,226 trainable parameters; BatchNorm (`BatchNorm1d`: torch's
    momentum 0.1, eps 1e-5, unbiased running variance) keeps its running statistics in the
    "batch_stats" collection."""

    hidden: tuple[int, ...] = (512, 256, 128)
    dropout_rate: float = 0.3
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
        x = x_BxHxWx1.reshape(x_BxHxWx1.shape[0], -1)  # (B, 784)
        for i, width in enumerate(self.hidden, start=1):
            x = nn.Dense(width, kernel_init=_KAIMING_FAN_OUT, name=f"fc{i}")(x)
            x = BatchNorm1d(name=f"bn{i}")(x, train=train)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        return nn.Dense(self.num_classes, kernel_init=_KAIMING_FAN_OUT,
                        name=f"fc{len(self.hidden) + 1}")(x)


MODELS: dict[str, type[nn.Module]] = {"lenet5": LeNet5, "cnn": TutorialCNN,
                                      "lenet5-gap": LeNet5GAP, "mlp": MLP}


@functools.cache
def get_model(name: str) -> nn.Module:
    """The model registered under `name` (see MODELS).

    One instance per name: modules are immutable, and jit caches on `model.apply`'s identity
    (a TrainState keeps it as static data), so the same model never compiles twice.
    """
    if name not in MODELS:
        raise FmnistError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]()


def count_params(params) -> int:
    # `.size`, not jnp.size: the leaves may be jax.ShapeDtypeStruct (jax.eval_shape's)
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))
