"""The conv and max-pool formulations the layers of `fmnist_jax.layers` choose from: pure
functions of arrays, each computing what lax's convolution (nn.Conv's) or reduce_window max
pool (nn.max_pool's) computes, outputs and gradients within float rounding.

Convs: `conv2d_toeplitz` (one matmul per image row against the kernel laid out as a banded
matrix), `conv2d_im2col` (all kh x kw patches, one matmul), `conv2d_shifted` (patches of the
kernel's rows, kw shifted slices of the output), `conv2d_lax` (XLA's), and
`conv_pool_toeplitz` (a Toeplitz conv and its 2x2 pool in one layout). Pools:
`max_pool_2x2_select` (the gradient as one select) and `max_pool_2x2_lax`. Which one runs is
`layers.conv_and_pool_impl`'s choice alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax.linen.linear import canonicalize_padding

# Why these formulations on a CPU (measurements: BENCHMARKS.md, `python -m
# benchmarks.profile_step`): with few channels XLA's CPU convolution is slow and an im2col
# matmul with a handful of output columns is memory-bound (its patch matrix is written and
# read several times a step). The row-Toeplitz form turns each conv into one well-shaped
# matmul per image row, rows (B x Ho, kh x Wp x I) @ T (kh x Wp x I, Wo x O), T the kernel
# laid out as a banded matrix: more flops (T's zeros), far less memory traffic. With many
# channels im2col's matmul is well shaped and the Toeplitz form's extra flops cost more than
# they save. Between the two, with many input channels, im2col's patch matrices (kh x kw
# times the input, and times the output's gradient in the backward pass) cost about as much
# to build as the matmuls themselves: the shifted form builds patches of the kernel's rows
# only and sums kw shifted slices of its output, kw times less to build for Wp / Wo more
# flops. XLA's own CPU convolution is no way out inside a training loop: there its kernel
# gradient leaves Eigen for a slow emitter (jax#12868). Every conv matmul is 2-D (batch and
# image rows flattened together), which keeps XLA:CPU from fusing a strided transpose into the
# pool's gradient. The pool's gradient is a custom VJP: one elementwise select giving each
# window's gradient to its first maximum, as nn.max_pool's select-and-scatter does (jnp's max
# gradient splits ties instead). A conv and its pool can run in one layout
# (`conv_pool_toeplitz`: a window's four values in contiguous blocks). On GPU/TPU none of this
# applies: `conv_and_pool_impl` picks lax's convolution (nn.Conv's, cuDNN) and reduce_window
# max pooling (nn.max_pool's) there.

Pads = tuple[tuple[int, int], tuple[int, int]]  # (low, high) zeros of H and of W


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
        grads.append(jnp.where(first, grad_pooled, jnp.zeros((), grad_pooled.dtype)))
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


def _pad_hw(x_BxHxWxF: jax.Array, pads: Pads, value: float = 0.0) -> jax.Array:
    if not any(lo or hi for lo, hi in pads):
        return x_BxHxWxF
    return jnp.pad(x_BxHxWxF, ((0, 0), *pads, (0, 0)), constant_values=value)


def max_pool_2x2_select(x_BxHxWxF: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (2, 2), strides=(2, 2))` for any H and W: the select-gradient pool on
    the even part (a last odd row or column is in no window, as with nn.max_pool)."""
    _, h, w, _ = x_BxHxWxF.shape
    return max_pool_2x2(x_BxHxWxF[:, : h - h % 2, : w - w % 2, :])


def max_pool_2x2_lax(x_BxHxWxF: jax.Array) -> jax.Array:
    """nn.max_pool's own formulation (reduce_window max): the GPU/TPU choice."""
    return nn.max_pool(x_BxHxWxF, (2, 2), strides=(2, 2))


def _as_pads(padding: int | Sequence) -> Pads:
    """An int or two (low, high) pairs or ints, as nn.Conv reads them (flax's own
    canonicalization), as two (low, high) pairs."""
    (h_lo, h_hi), (w_lo, w_hi) = canonicalize_padding(padding, 2)
    return (int(h_lo), int(h_hi)), (int(w_lo), int(w_hi))


def _banded_kernel(kernel_YxXxIxO: jax.Array, wp: int, out_columns: list[int]) -> jax.Array:
    """The kernel as the row-Toeplitz matrix (kh x wp x I, len(out_columns) x O): column
    block k computes output column `out_columns[k]`; T[i, (w', c), (k, f)] =
    kernel[i, w' - w, c, f] with w = out_columns[k] where 0 <= w' - w < kw, else 0."""
    kh, kw, c_in, f = kernel_YxXxIxO.shape
    band = np.zeros((wp, len(out_columns), kw), kernel_YxXxIxO.dtype)  # (w' == w + j)
    for k, w in enumerate(out_columns):
        band[w + np.arange(kw), k, np.arange(kw)] = 1
    return jnp.einsum("pwj,ijcf->ipcwf", band, kernel_YxXxIxO,
                      precision=jax.lax.Precision.HIGHEST).reshape(kh * wp * c_in, -1)


def _toeplitz_rows(padded_BxHxWxF: jax.Array, kh: int, ho: int, row_stride: int) -> jax.Array:
    """(B x Ho, kh x padded width x I): output row (b, h) sees padded rows
    h x stride .. h x stride + kh - 1."""
    b, hp, wp, c_in = padded_BxHxWxF.shape
    x_rows = padded_BxHxWxF.reshape(b, hp, wp * c_in)  # each padded row flattened to (W, I)
    last = (ho - 1) * row_stride + 1
    return jnp.concatenate([x_rows[:, i:i + last:row_stride, :] for i in range(kh)],
                           axis=-1).reshape(b * ho, -1)


def _out_size(padded: int, k: int, stride: int) -> int:
    return (padded - k) // stride + 1


def conv2d_toeplitz(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, pads: int | Pads,
                    strides: tuple[int, int] = (1, 1), precision=None) -> jax.Array:
    """2-D conv, no bias, as one matmul per output row against a banded kernel matrix.

    out[b, h, (w, f)] = sum_i xpad[b, h sh + i, (w', c)] T[i, (w', c), (w, f)], with
    T[i, (w', c), (w, f)] = kernel[i, w' - w sw, c, f] where 0 <= w' - w sw < kw, else 0:
    a stride takes every other output row (the rows gathered) and column (T's columns).
    """
    kh, kw, _, f = kernel_YxXxIxO.shape
    (sh, sw) = strides
    padded_BxHxWxF = _pad_hw(x_BxHxWxF, _as_pads(pads))
    b, hp, wp, _ = padded_BxHxWxF.shape
    ho, wo = _out_size(hp, kh, sh), _out_size(wp, kw, sw)
    w_used = (wo - 1) * sw + kw  # columns past the last window are seen by none
    banded = _banded_kernel(kernel_YxXxIxO, w_used, [w * sw for w in range(wo)])
    rows = _toeplitz_rows(padded_BxHxWxF[:, :, :w_used, :], kh, ho, sh)
    return jnp.matmul(rows, banded, precision=precision).reshape(b, ho, wo, f)


def conv_pool_toeplitz(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, pads: int | Pads,
                       column_groups: int = 2, precision=None) -> jax.Array:
    """max_pool_2x2_select(conv2d_toeplitz(x, kernel, pads)) (stride 1) in one layout.

    The banded matrix's columns come even output columns first, then odd ones, so each
    matmul row is [even w's (w, f) | odd w's (w, f)] and rows alternate even and odd h: a
    2x2 window's four values are the same element of four contiguous blocks, and the pooled
    row comes out as (w, f), the layout the next layer's rows want. The max and its gradient
    (`_max_of_2x2`) are contiguous, where the NHWC pool's are strided by the channel count.
    An odd last conv row or column, which no pool window holds, is not computed.

    The output columns are split into `column_groups` groups of even width, each its own
    matmul against the input columns it sees: a narrower banded matrix has fewer zeros
    (LeNet-5's layers: 0.56x and 0.66x the arithmetic of one group); two groups are the
    default, the faster on a CPU (BENCHMARKS.md).
    """
    kh, kw, _, f = kernel_YxXxIxO.shape
    padded_BxHxWxF = _pad_hw(x_BxHxWxF, _as_pads(pads))
    b, hp, wp, _ = padded_BxHxWxF.shape
    ho, wo = (hp - kh + 1) // 2 * 2, (wp - kw + 1) // 2 * 2  # the conv rows the pool reads
    padded_BxHxWxF = padded_BxHxWxF[:, :ho + kh - 1]
    pooled = []
    for pairs in np.array_split(np.arange(wo // 2), min(column_groups, wo // 2)):
        start, stop = 2 * int(pairs[0]), 2 * int(pairs[-1]) + 2  # its output columns
        w_in = stop - start + kw - 1  # the input columns they see
        parity_order = list(range(0, stop - start, 2)) + list(range(1, stop - start, 2))
        banded = _banded_kernel(kernel_YxXxIxO, w_in, parity_order)
        rows = _toeplitz_rows(padded_BxHxWxF[:, :, start:start + w_in, :], kh, ho, 1)
        conv_BxHx2x2xR = jnp.matmul(rows, banded, precision=precision).reshape(
            b, ho // 2, 2, 2, (stop - start) // 2 * f)
        pooled.append(_max_of_2x2(conv_BxHx2x2xR))
    return jnp.concatenate(pooled, axis=-1).reshape(b, ho // 2, wo // 2, f)


def _im2col_patches(padded_BxHxWxF: jax.Array, kh: int, kw: int,
                    strides: tuple[int, int]) -> jax.Array:
    """(B, Ho, Wo, kh x kw x I): every output's window, kh*kw shifted (strided) slices."""
    (sh, sw) = strides
    _, hp, wp, _ = padded_BxHxWxF.shape
    ho, wo = _out_size(hp, kh, sh), _out_size(wp, kw, sw)
    h_last, w_last = (ho - 1) * sh + 1, (wo - 1) * sw + 1
    return jnp.concatenate([padded_BxHxWxF[:, i:i + h_last:sh, j:j + w_last:sw, :]
                            for i in range(kh) for j in range(kw)], axis=-1)


def _im2col_valid(padded_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array,
                  strides: tuple[int, int], precision) -> jax.Array:
    """A 'VALID' conv as one matmul of the im2col patches and the flattened kernel."""
    kh, kw, c_in, f = kernel_YxXxIxO.shape
    patches_BxHxWxL = _im2col_patches(padded_BxHxWxF, kh, kw, strides)
    b, ho, wo, _ = patches_BxHxWxL.shape
    return jnp.matmul(patches_BxHxWxL.reshape(b * ho * wo, kh * kw * c_in),
                      kernel_YxXxIxO.reshape(kh * kw * c_in, f),
                      precision=precision).reshape(b, ho, wo, f)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _im2col_stride1(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, pads: Pads,
                    precision) -> jax.Array:
    return _im2col_valid(_pad_hw(x_BxHxWxF, pads), kernel_YxXxIxO, (1, 1), precision)


def _im2col_stride1_fwd(x_BxHxWxF, kernel_YxXxIxO, pads, precision):
    patches_BxHxWxL = _im2col_patches(_pad_hw(x_BxHxWxF, pads), *kernel_YxXxIxO.shape[:2],
                                      (1, 1))
    kh, kw, c_in, f = kernel_YxXxIxO.shape
    b, ho, wo, _ = patches_BxHxWxL.shape
    y_BxHxWxF = jnp.matmul(patches_BxHxWxL.reshape(b * ho * wo, kh * kw * c_in),
                           kernel_YxXxIxO.reshape(kh * kw * c_in, f),
                           precision=precision).reshape(b, ho, wo, f)
    return y_BxHxWxF, (patches_BxHxWxL, kernel_YxXxIxO)


def _im2col_stride1_bwd(pads, precision, saved, grad_y_BxHxWxO):
    """The kernel's gradient from the saved patches; the input's as a conv of the output's
    gradient with the flipped kernel, itself an im2col matmul: autodiff's col2im instead
    adds kh*kw shifted slices of a (B x Ho x Wo, kh x kw x I) matrix, which on a CPU took
    longer than all the layer's matmuls with many channels (32 -> 64, 5x5)."""
    patches_BxHxWxL, kernel_YxXxIxO = saved
    kh, kw, c_in, f = kernel_YxXxIxO.shape
    b, ho, wo, _ = patches_BxHxWxL.shape
    grad_kernel_LxO = jnp.matmul(patches_BxHxWxL.reshape(b * ho * wo, -1).T,
                                 grad_y_BxHxWxO.reshape(b * ho * wo, f), precision=precision)
    (h_lo, h_hi), (w_lo, w_hi) = pads
    # x's row r is seen by output rows r + lo - kh + 1 .. r + lo: pad (or crop, where a pad
    # is wider than the kernel) the output's gradient so that each input row has kh of them.
    grad_padded_BxHxWxO = jax.lax.pad(grad_y_BxHxWxO, jnp.zeros((), grad_y_BxHxWxO.dtype),
                                      [(0, 0, 0), (kh - 1 - h_lo, kh - 1 - h_hi, 0),
                                       (kw - 1 - w_lo, kw - 1 - w_hi, 0), (0, 0, 0)])
    flipped_YxXxOxI = jnp.flip(kernel_YxXxIxO, (0, 1)).transpose(0, 1, 3, 2)
    grad_x_BxHxWxI = _im2col_valid(grad_padded_BxHxWxO, flipped_YxXxOxI, (1, 1), precision)
    return grad_x_BxHxWxI, grad_kernel_LxO.reshape(kernel_YxXxIxO.shape)


_im2col_stride1.defvjp(_im2col_stride1_fwd, _im2col_stride1_bwd)


def conv2d_im2col(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, pads: int | Pads,
                  strides: tuple[int, int] = (1, 1), precision=None) -> jax.Array:
    """2-D conv, no bias, as im2col: kh*kw shifted (strided) slices, concatenated, one matmul.
    At stride 1 the input's gradient is a second im2col matmul (`_im2col_stride1_bwd`)."""
    pads = _as_pads(pads)
    if tuple(strides) == (1, 1):
        return _im2col_stride1(x_BxHxWxF, kernel_YxXxIxO, pads, precision)
    return _im2col_valid(_pad_hw(x_BxHxWxF, pads), kernel_YxXxIxO, tuple(strides), precision)


def _shifted_rows(padded_BxHxWxF: jax.Array, kh: int, ho: int, row_stride: int) -> jax.Array:
    """(B, Ho, Wp, kh x I): output row h's patch of the kernel's rows, h x stride + i."""
    h_last = (ho - 1) * row_stride + 1
    return jnp.concatenate([padded_BxHxWxF[:, i:i + h_last:row_stride] for i in range(kh)],
                           axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_shifted(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, pads: Pads,
                  strides: tuple[int, int], precision) -> jax.Array:
    return _conv_shifted_fwd(x_BxHxWxF, kernel_YxXxIxO, pads, strides, precision)[0]


def _conv_shifted_fwd(x_BxHxWxF, kernel_YxXxIxO, pads, strides, precision):
    kh, kw, c_in, f = kernel_YxXxIxO.shape
    (sh, sw) = strides
    padded_BxHxWxF = _pad_hw(x_BxHxWxF, pads)
    b, hp, wp, _ = padded_BxHxWxF.shape
    ho, wo = _out_size(hp, kh, sh), _out_size(wp, kw, sw)
    rows_BxHxWxL = _shifted_rows(padded_BxHxWxF, kh, ho, sh)
    kernel_LxXO = kernel_YxXxIxO.transpose(0, 2, 1, 3).reshape(kh * c_in, kw * f)
    y_BxHxWxXxO = jnp.matmul(rows_BxHxWxL.reshape(b * ho * wp, kh * c_in), kernel_LxXO,
                             precision=precision).reshape(b, ho, wp, kw, f)
    w_last = (wo - 1) * sw + 1
    out_BxHxWxO = sum(y_BxHxWxXxO[:, :, j:j + w_last:sw, j, :] for j in range(kw))
    return out_BxHxWxO, (rows_BxHxWxL, kernel_LxXO, x_BxHxWxF.shape)


def _conv_shifted_bwd(pads, strides, precision, saved, grad_out_BxHxWxO):
    """The output's gradient spread to the kw shifted slices in one stack of pads (autodiff
    adds kw arrays of the whole (B, Ho, Wp, kw, O) shape, mostly zeros, which on a CPU took
    as long as a matmul), then the two matmuls, and the rows' gradient back to the input."""
    rows_BxHxWxL, kernel_LxXO, x_shape = saved
    (sh, sw) = strides
    (h_lo, h_hi), (w_lo, w_hi) = pads
    b, ho, wp, _ = rows_BxHxWxL.shape
    _, _, wo, f = grad_out_BxHxWxO.shape
    kw = kernel_LxXO.shape[1] // f
    c_in = x_shape[-1]
    kh = kernel_LxXO.shape[0] // c_in
    zero = jnp.zeros((), grad_out_BxHxWxO.dtype)
    w_last = (wo - 1) * sw + 1
    grad_y_BxHxWxXxO = jnp.stack(
        [jax.lax.pad(grad_out_BxHxWxO, zero, [(0, 0, 0), (0, 0, 0),
                                               (j, wp - j - w_last, sw - 1), (0, 0, 0)])
         for j in range(kw)], axis=3)
    grad_y_MxXO = grad_y_BxHxWxXxO.reshape(b * ho * wp, kw * f)
    grad_kernel_LxXO = jnp.matmul(rows_BxHxWxL.reshape(b * ho * wp, -1).T, grad_y_MxXO,
                                  precision=precision)
    grad_rows_BxHxWxL = jnp.matmul(grad_y_MxXO, kernel_LxXO.T,
                                   precision=precision).reshape(b, ho, wp, kh * c_in)
    hp = x_shape[1] + h_lo + h_hi
    h_last = (ho - 1) * sh + 1
    grad_padded_BxHxWxF = sum(
        jax.lax.pad(grad_rows_BxHxWxL[..., i * c_in:(i + 1) * c_in], zero,
                    [(0, 0, 0), (i, hp - i - h_last, sh - 1), (0, 0, 0), (0, 0, 0)])
        for i in range(kh))
    grad_x_BxHxWxF = grad_padded_BxHxWxF[:, h_lo:hp - h_hi, w_lo:wp - w_hi]
    grad_kernel_YxXxIxO = grad_kernel_LxXO.reshape(kh, c_in, kw, f).transpose(0, 2, 1, 3)
    return grad_x_BxHxWxF, grad_kernel_YxXxIxO


_conv_shifted.defvjp(_conv_shifted_fwd, _conv_shifted_bwd)


def conv2d_shifted(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, pads: int | Pads,
                   strides: tuple[int, int] = (1, 1), precision=None) -> jax.Array:
    """2-D conv, no bias, as im2col over the kernel's rows only: one matmul of the row
    patches (B x Ho x Wp, kh x I) and the kernel laid out (kh x I, kw x O), then the sum of
    kw column-shifted slices of its output.

    out[b, h, w, f] = sum_j y[b, h, w sw + j, j, f], y = rows @ kernel: the patch matrix is
    kh, not kh x kw, times the input, and the backward pass is two matmuls between a stack
    of pads and a sum of pads (`_conv_shifted_bwd`). It computes Wp columns where Wo are
    kept (Wp / Wo the extra flops).
    """
    return _conv_shifted(x_BxHxWxF, kernel_YxXxIxO, _as_pads(pads), tuple(strides), precision)


def conv2d_lax(x_BxHxWxF: jax.Array, kernel_YxXxIxO: jax.Array, pads: int | Pads,
               strides: tuple[int, int] = (1, 1), precision=None) -> jax.Array:
    """nn.Conv's own formulation (XLA convolution; cuDNN on GPU)."""
    return jax.lax.conv_general_dilated(x_BxHxWxF, kernel_YxXxIxO, strides, _as_pads(pads),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


CONV_IMPLS = {"toeplitz": conv2d_toeplitz, "im2col": conv2d_im2col, "shifted": conv2d_shifted,
              "lax": conv2d_lax}
POOL_IMPLS = {"select": max_pool_2x2_select, "lax": max_pool_2x2_lax}
