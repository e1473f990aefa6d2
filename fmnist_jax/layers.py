"""The convolution and max-pool layers of the models, with the formulation chosen per backend.

On a CPU the convolutions run as 2-D matrix products (row-Toeplitz or im2col) and the pool's
gradient as one select; on a GPU or TPU, XLA's own convolution and reduce_window (nn.Conv and
nn.max_pool). `conv_and_pool_impl` is the one place that chooses. Measurements: BENCHMARKS.md,
`python -m benchmarks.profile_step`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

# Why these formulations on a CPU (measurements: BENCHMARKS.md, `python -m
# benchmarks.profile_step`): LeNet-5's channel counts are tiny (1 -> 6 -> 16), so XLA's CPU
# convolution is slow and an im2col matmul with 6 output columns is memory-bound (its patch
# matrix is written and read several times a step). The row-Toeplitz form turns each conv into
# one well-shaped matmul per image row, rows (B x Ho, kh x Wp x I) @ T (kh x Wp x I, Wo x O),
# T the kernel laid out as a banded matrix: more flops (T's zeros), far less memory traffic.
# Every conv matmul is 2-D (batch and image rows flattened together), which keeps XLA:CPU from
# fusing a strided transpose into the pool's gradient. The pool's gradient is a custom VJP: one
# elementwise select giving each window's gradient to its first maximum, as nn.max_pool's
# select-and-scatter does (jnp's max gradient splits ties instead). A LeNet-5 conv and its pool
# run in one layout (`conv_pool_toeplitz`: a window's four values in contiguous blocks).
# On GPU/TPU none of this applies: `conv_and_pool_impl` picks lax's convolution (nn.Conv's,
# cuDNN) and reduce_window max pooling (nn.max_pool's) there.


def _first_max_grads(window_values: list[jax.Array], window_max: jax.Array,
                     grad_pooled: jax.Array) -> list[jax.Array]:
    """Each window position's share of the pooled gradient: all of it at the first position
    (in the order given) whose value equals the window's max, zero elsewhere. All arrays
    share one shape, the pooled output's."""
    taken = jnp.zeros(window_max.shape, bool)
    grads = []
    for values in window_values:
        first = (values == window_max) & ~taken
        taken = taken | first
        grads.append(jnp.where(first, grad_pooled, 0.0))
    return grads


@jax.custom_vjp
def max_pool_2x2(x_BxHxWxF: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2 (H and W even), as a reshape and a max.

    Same values as `nn.max_pool(x, (2, 2), strides=(2, 2))` and the same gradient (to the
    first maximum of each window in row-major order, ties included), computed as one
    elementwise select instead of XLA's select-and-scatter, which is slow on CPU.
    """
    b, h, w, c = x_BxHxWxF.shape
    return x_BxHxWxF.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_fwd(x_BxHxWxF):
    pooled_BxHxWxF = max_pool_2x2(x_BxHxWxF)
    return pooled_BxHxWxF, (x_BxHxWxF, pooled_BxHxWxF)


def _max_pool_bwd(saved, grad_pooled_BxHxWxF):
    x_BxHxWxF, pooled_BxHxWxF = saved
    b, h, w, c = x_BxHxWxF.shape
    windows_BxHx2xWx2xF = x_BxHxWxF.reshape(b, h // 2, 2, w // 2, 2, c)
    grads = _first_max_grads(
        [windows_BxHx2xWx2xF[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)],
        pooled_BxHxWxF, grad_pooled_BxHxWxF)
    grad_x_BxHx2xWx2xF = jnp.stack([jnp.stack(grads[0:2], axis=3),
                                    jnp.stack(grads[2:4], axis=3)], axis=2)
    return (grad_x_BxHx2xWx2xF.reshape(b, h, w, c),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def _max_of_2x2(rows_BxHx2x2xR: jax.Array) -> jax.Array:
    """max over axes 2 and 3 (a pool window's row and column parity), gradient to the first
    maximum in row-major window order: `max_pool_2x2`'s, for the layout of `conv_pool_toeplitz`."""
    return rows_BxHx2x2xR.max(axis=(2, 3))


def _max_of_2x2_fwd(rows_BxHx2x2xR):
    pooled_BxHxR = _max_of_2x2(rows_BxHx2x2xR)
    return pooled_BxHxR, (rows_BxHx2x2xR, pooled_BxHxR)


def _max_of_2x2_bwd(saved, grad_pooled_BxHxR):
    rows_BxHx2x2xR, pooled_BxHxR = saved
    grads = _first_max_grads([rows_BxHx2x2xR[:, :, i, j, :] for i in (0, 1) for j in (0, 1)],
                             pooled_BxHxR, grad_pooled_BxHxR)
    return (jnp.stack([jnp.stack(grads[0:2], axis=2), jnp.stack(grads[2:4], axis=2)], axis=2),)


_max_of_2x2.defvjp(_max_of_2x2_fwd, _max_of_2x2_bwd)


def max_pool_2x2_lax(x_BxHxWxF: jax.Array) -> jax.Array:
    """nn.max_pool's own formulation (reduce_window max): the GPU/TPU choice."""
    return nn.max_pool(x_BxHxWxF, (2, 2), strides=(2, 2))


def _pad_hw(x_BxHxWxF: jax.Array, p: int) -> jax.Array:
    return jnp.pad(x_BxHxWxF, ((0, 0), (p, p), (p, p), (0, 0))) if p else x_BxHxWxF


def _banded_kernel(kernel_YxXxIxO: jax.Array, wp: int, out_columns: list[int]) -> jax.Array:
    """The kernel as the row-Toeplitz matrix (kh x wp x I, len(out_columns) x O): column
    block k computes output column `out_columns[k]`; T[i, (w', c), (k, f)] =
    kernel[i, w' - w, c, f] with w = out_columns[k] where 0 <= w' - w < kw, else 0."""
    kh, kw, c_in, f = kernel_YxXxIxO.shape
    band = np.zeros((wp, len(out_columns), kw), np.float32)  # band[w', k, j] = (w' == w + j)
    for k, w in enumerate(out_columns):
        band[w + np.arange(kw), k, np.arange(kw)] = 1.0
    return jnp.einsum("pwj,ijcf->ipcwf", band, kernel_YxXxIxO,
                      precision=jax.lax.Precision.HIGHEST).reshape(kh * wp * c_in, -1)


def _toeplitz_rows(x_BxHxWxF: jax.Array, kh: int, padding: int) -> jax.Array:
    """(B x Ho, kh x padded width x I): output row (b, h) sees padded rows h .. h + kh - 1."""
    padded_BxHxWxF = _pad_hw(x_BxHxWxF, padding)
    b, hp, wp, c_in = padded_BxHxWxF.shape
    ho = hp - kh + 1
    x_rows = padded_BxHxWxF.reshape(b, hp, wp * c_in)  # each padded row flattened to (W, I)
    return jnp.concatenate([x_rows[:, i:i + ho, :] for i in range(kh)], axis=-1).reshape(b * ho, -1)


def conv2d_toeplitz(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, padding: int) -> jax.Array:
    """Stride-1 conv, no bias, as one matmul per image row against a banded kernel matrix.

    out[b, h, (w, f)] = sum_i xpad[b, h + i, (w', c)] T[i, (w', c), (w, f)], with
    T[i, (w', c), (w, f)] = kernel[i, w' - w, c, f] where 0 <= w' - w < kw, else 0.
    """
    kh, kw, _, f = kernel_YxXxIxO.shape
    b, h, w, _ = x_BxHxWxF.shape
    ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    banded = _banded_kernel(kernel_YxXxIxO, w + 2 * padding, list(range(wo)))
    return (_toeplitz_rows(x_BxHxWxF, kh, padding) @ banded).reshape(b, ho, wo, f)


def conv_pool_toeplitz(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, padding: int,
                       column_groups: int = 2) -> jax.Array:
    """max_pool_2x2(conv2d_toeplitz(x, kernel, padding)) in one layout (Ho, Wo even).

    The banded matrix's columns come even output columns first, then odd ones, so each
    matmul row is [even w's (w, f) | odd w's (w, f)] and rows alternate even and odd h: a
    2x2 window's four values are the same element of four contiguous blocks, and the pooled
    row comes out as (w, f), the layout the next layer's rows want. The max and its gradient
    (`_max_of_2x2`) are contiguous, where the NHWC pool's are strided by the channel count.

    The output columns are split into `column_groups` groups of even width, each its own
    matmul against the input columns it sees: a narrower banded matrix has fewer zeros
    (LeNet-5's layers: 0.56x and 0.66x the arithmetic of one group); two groups are the
    default, the faster on a CPU (BENCHMARKS.md).
    """
    kh, kw, _, f = kernel_YxXxIxO.shape
    padded_BxHxWxF = _pad_hw(x_BxHxWxF, padding)
    b, hp, wp, _ = padded_BxHxWxF.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    pooled = []
    for pairs in np.array_split(np.arange(wo // 2), min(column_groups, wo // 2)):
        start, stop = 2 * int(pairs[0]), 2 * int(pairs[-1]) + 2  # its output columns
        w_in = stop - start + kw - 1  # the input columns they see
        parity_order = list(range(0, stop - start, 2)) + list(range(1, stop - start, 2))
        banded = _banded_kernel(kernel_YxXxIxO, w_in, parity_order)
        rows = _toeplitz_rows(padded_BxHxWxF[:, :, start:start + w_in, :], kh, 0)
        conv_BxHx2x2xR = (rows @ banded).reshape(b, ho // 2, 2, 2, (stop - start) // 2 * f)
        pooled.append(_max_of_2x2(conv_BxHx2x2xR))
    return jnp.concatenate(pooled, axis=-1).reshape(b, ho // 2, wo // 2, f)


def conv2d_im2col(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, padding: int) -> jax.Array:
    """Stride-1 conv, no bias, as im2col: kh*kw shifted slices, concatenated, one matmul."""
    kh, kw, c_in, f = kernel_YxXxIxO.shape
    padded_BxHxWxF = _pad_hw(x_BxHxWxF, padding)
    ho, wo = padded_BxHxWxF.shape[1] - kh + 1, padded_BxHxWxF.shape[2] - kw + 1
    patches_BxHxWxL = jnp.concatenate(
        [padded_BxHxWxF[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)],
        axis=-1)
    b = padded_BxHxWxF.shape[0]
    return (patches_BxHxWxL.reshape(b * ho * wo, kh * kw * c_in)
            @ kernel_YxXxIxO.reshape(kh * kw * c_in, f)).reshape(b, ho, wo, f)


def conv2d_lax(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, padding: int) -> jax.Array:
    """nn.Conv's own formulation (XLA convolution; cuDNN on GPU)."""
    p = padding
    return jax.lax.conv_general_dilated(x_BxHxWxF, kernel_YxXxIxO, (1, 1), [(p, p), (p, p)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


CONV_IMPLS = {"toeplitz": conv2d_toeplitz, "im2col": conv2d_im2col, "lax": conv2d_lax}
POOL_IMPLS = {"select": max_pool_2x2, "lax": max_pool_2x2_lax}
# Set while a model is traced for export: the function then holds XLA's own convolution and
# reduce_window on every backend, so it runs, and converts, on any platform.
_PORTABLE = contextvars.ContextVar("portable_formulations", default=False)


@contextlib.contextmanager
def portable_formulations() -> Iterator[None]:
    """Within this block the layers trace XLA's convolution and reduce_window pool (the
    formulations of a GPU, with the same outputs) whatever the backend."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def conv_and_pool_impl(backend: str | None = None,
                       kernel_shape: tuple[int, ...] = (5, 5, 1, 6)) -> tuple[str, str]:
    """THE place where the conv and pool formulations are chosen, per backend and layer.

    CPU: the select-gradient pool; the row-Toeplitz conv for LeNet-5's layers (5x5 kernels,
    at most 96 input x output channels), whose banded matrix stays small, and im2col for the
    rest: on the tutorial CNN's 3x3 layers (16 and 32 channels) the Toeplitz form's 5-10x
    redundant arithmetic makes a training step no faster, or slower, than im2col
    (`python -m benchmarks.profile_step --cnn-formulations`, BENCHMARKS.md). Anything else
    (GPU, TPU): XLA's convolution and reduce_window pool, i.e. nn.Conv and nn.max_pool,
    which cuDNN and friends already do well. Within `portable_formulations()` (an export),
    XLA's on every backend.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or _PORTABLE.get():
        return "lax", "lax"
    kh, kw, c_in, c_out = kernel_shape
    toeplitz = kh * kw * c_in >= 25 and c_in * c_out <= 96
    return ("toeplitz" if toeplitz else "im2col"), "select"


class Conv2D(nn.Module):
    """Stride-1 2D convolution + bias, with the formulation picked by `conv_and_pool_impl`.

    Same parameters as `nn.Conv` (`kernel` (kh, kw, Cin, Cout) lecun-normal, `bias` zeros)
    and the same outputs. `impl` forces one of CONV_IMPLS (tests compare them).
    """

    features: int
    kernel_size: tuple[int, int]
    padding: int = 0  # zeros on each side of H and W
    impl: str | None = None

    def params_of(self, c_in: int) -> tuple[jax.Array, jax.Array]:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, c_in, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return kernel, bias

    def conv(self, x_BxHxWxF: jax.Array, kernel: jax.Array) -> jax.Array:
        impl = self.impl or conv_and_pool_impl(kernel_shape=kernel.shape)[0]
        return CONV_IMPLS[impl](x_BxHxWxF, kernel, self.padding)

    @nn.compact
    def __call__(self, x_BxHxWxF: jax.Array) -> jax.Array:
        kernel, bias = self.params_of(x_BxHxWxF.shape[-1])
        return self.conv(x_BxHxWxF, kernel) + bias.reshape(1, 1, 1, -1)


class ConvReluPool(Conv2D):
    """max_pool_2x2(relu(conv(x) + bias)), computed as relu(pool(conv(x)) + bias).

    The same values (max commutes with adding a per-channel constant and with relu) and the
    same gradients, with the bias add and relu on 4x fewer elements. Parameters as Conv2D.
    `pool_impl` forces one of POOL_IMPLS. The Toeplitz conv with the select pool runs as
    one layout (`conv_pool_toeplitz`).
    """

    pool_impl: str | None = None

    @nn.compact
    def __call__(self, x_BxHxWxF: jax.Array) -> jax.Array:
        kernel, bias = self.params_of(x_BxHxWxF.shape[-1])
        conv_impl = self.impl or conv_and_pool_impl(kernel_shape=kernel.shape)[0]
        pool_impl = self.pool_impl or conv_and_pool_impl()[1]
        if (conv_impl, pool_impl) == ("toeplitz", "select"):
            pooled = conv_pool_toeplitz(x_BxHxWxF, kernel, self.padding)
        else:
            pooled = POOL_IMPLS[pool_impl](CONV_IMPLS[conv_impl](x_BxHxWxF, kernel, self.padding))
        return nn.relu(pooled + bias.reshape(1, 1, 1, -1))
