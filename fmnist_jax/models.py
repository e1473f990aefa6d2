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

NUM_CLASSES = 10


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2 (H and W even), as a reshape and a max.

    Same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`, but its gradient is an
    elementwise mask instead of XLA's select-and-scatter, which is slow on CPU.
    """
    b, h, w, c = x_BxHxWxC.shape
    return x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv2D(nn.Module):
    """Stride-1 2D convolution as im2col: kh*kw shifted slices, concatenated, then one matmul.

    Same parameters as `nn.Conv` (`kernel` (kh, kw, Cin, Cout) lecun-normal, `bias` zeros) and
    the same outputs; on CPU it trains LeNet-5 several times faster, because XLA's CPU
    convolution is slow for these tiny channel counts while its matmul is fast.
    """

    features: int
    kernel_size: tuple[int, int]
    padding: int = 0  # zeros on each side of H and W

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        c_in = x_BxHxWxC.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, c_in, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        p = self.padding
        x = jnp.pad(x_BxHxWxC, ((0, 0), (p, p), (p, p), (0, 0))) if p else x_BxHxWxC
        h_out, w_out = x.shape[1] - kh + 1, x.shape[2] - kw + 1
        patches_BxHxWxK = jnp.concatenate(
            [x[:, i:i + h_out, j:j + w_out, :] for i in range(kh) for j in range(kw)], axis=-1)
        out_BxHxWxF = patches_BxHxWxK @ kernel.reshape(kh * kw * c_in, self.features)
        return out_BxHxWxF + bias.reshape(1, 1, 1, -1)


class LeNet5(nn.Module):
    """LeNet-5 as the LeNet-5 report's layer table: 61,706 parameters.

    conv 6@5x5 pad 2, ReLU, pool 2 -> conv 16@5x5 valid, ReLU, pool 2 -> flatten 400
    -> dense 120, ReLU -> dense 84, ReLU -> dense 10.
    """

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm: the same function in training and evaluation
        x = nn.relu(Conv2D(6, (5, 5), padding=2, name="conv1")(x_BxHxWx1))
        x = max_pool_2x2(x)  # (B, 14, 14, 6)
        x = nn.relu(Conv2D(16, (5, 5), name="conv2")(x))
        x = max_pool_2x2(x)  # (B, 5, 5, 16)
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
        x = max_pool_2x2(nn.relu(Conv2D(16, (3, 3), padding=1, name="conv1")(x_BxHxWx1)))
        x = max_pool_2x2(nn.relu(Conv2D(32, (3, 3), padding=1, name="conv2")(x)))
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
        x = max_pool_2x2(nn.relu(Conv2D(6, (5, 5), padding=2, name="conv1")(x_BxHxWx1)))
        x = nn.relu(Conv2D(16, (5, 5), name="conv2")(x))  # (B, 10, 10, 16)
        x = jnp.mean(x, axis=(1, 2))  # (B, 16)
        return nn.Dense(self.num_classes, name="fc")(x)


# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out), untruncated.
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class MLP(nn.Module):
    """The notebook's MLP: 784 -> 512 -> 256 -> 128 -> 10; each hidden layer Dense, BatchNorm,
    ReLU, Dropout 0.3. Dense kernels Kaiming-normal (fan_out), biases zero, as the notebook
    initializes them. 569,226 trainable parameters; BatchNorm's running statistics (momentum
    0.9 here is torch's 0.1, eps 1e-5) live in the "batch_stats" collection."""

    hidden: tuple[int, ...] = (512, 256, 128)
    dropout_rate: float = 0.3
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
        x = x_BxHxWx1.reshape(x_BxHxWx1.shape[0], -1)  # (B, 784)
        for i, width in enumerate(self.hidden, start=1):
            x = nn.Dense(width, kernel_init=_KAIMING_FAN_OUT, name=f"fc{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             name=f"bn{i}")(x)
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
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
