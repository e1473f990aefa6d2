"""Convolution and max-pool layers that compute what nn.Conv and nn.max_pool do, with the
formulation chosen per backend.

`Conv` takes nn.Conv's arguments and has its parameters ("kernel" (kh, kw, Cin, Cout), "bias"
(Cout,)), so a Flax model swaps `nn.Conv` for it and `nn.max_pool` for `max_pool` and keeps its
checkpoints. On a CPU the 2-D convolutions run as 2-D matrix products (row-Toeplitz, im2col or
im2col over the kernel's rows with shifted outputs: `fmnist_jax.conv_forms`) and the 2x2
pool's gradient as one select; on a GPU or TPU, and for every case the matrix forms do not
cover, nn.Conv's and nn.max_pool's own computation. `conv_and_pool_impl` is the one
place that chooses. Measurements: BENCHMARKS.md, `python -m benchmarks.profile_step`,
`python -m benchmarks.user_model`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence
from typing import Iterator

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.linen.linear import canonicalize_padding

from fmnist_jax.conv_forms import (CONV_IMPLS, POOL_IMPLS, Pads, _pad_hw, conv_pool_toeplitz,
                                   max_pool_2x2_select)
from fmnist_jax.errors import FmnistError

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


# The shifted form's matmul depth (kh x Cin) from which it beats im2col on a CPU: with a
# shallow one its output, kw times the conv's, costs more than im2col's patches save
# (BENCHMARKS.md, `python -m benchmarks.profile_step --layer-formulations`).
SHIFTED_MIN_DEPTH = 12


def conv_and_pool_impl(backend: str | None = None,
                       kernel_shape: tuple[int, ...] = (5, 5, 1, 6),
                       strides: tuple[int, int] = (1, 1),
                       padded_width: int = 32) -> tuple[str, str]:
    """THE place where the conv and pool formulations are chosen, per backend and layer.

    `kernel_shape` (kh, kw, Cin, Cout), `strides` and `padded_width` (the input's width with
    its padding) describe the conv layer; the defaults are LeNet-5's first layer.

    CPU: the select-gradient pool, and the conv form of the lower cost. The row-Toeplitz form
    does (columns it sees) / kw times im2col's arithmetic and reads far less memory, so it
    wins where im2col's matmul is memory-bound: few output channels. Measured over 14 layer
    shapes, forward and backward (`python -m benchmarks.profile_step --layer-formulations`,
    BENCHMARKS.md), the Toeplitz form is the faster exactly where Cout x (columns seen) / kw
    is at most 91 (LeNet-5's layers: 38 and 45; 7x7 kernels of 16 and 32 filters: 78 and 91)
    and a matrix form with fewer zeros where it is 155 or more (3x3 kernels of 16 or more
    filters, 32 or more filters, 1x1): the rule cuts at 120, and wants the kernel to see at
    least 25 values per output. Past the Toeplitz form's range, the shifted form
    (`conv2d_shifted`) where its matmul is deep enough, kh x Cin >= SHIFTED_MIN_DEPTH, at
    stride 1 across the width and a kernel wider than 1 (over 18 shapes it then picks the
    fastest of the three forms on 16); im2col for the rest. Anything else (GPU, TPU): XLA's convolution and
    reduce_window pool, i.e. nn.Conv and nn.max_pool, which cuDNN and friends already do
    well. Within `portable_formulations()` (an export), XLA's on every backend.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or _PORTABLE.get():
        return "lax", "lax"
    kh, kw, c_in, c_out = kernel_shape
    columns_seen = (padded_width - kw) // strides[1] * strides[1] + kw
    if kh * kw * c_in >= 25 and c_out * columns_seen <= 120 * kw:
        return "toeplitz", "select"
    if strides[1] == 1 and kw > 1 and kh * c_in >= SHIFTED_MIN_DEPTH:
        return "shifted", "select"
    return "im2col", "select"


def _pair(value: None | int | Sequence[int]) -> tuple[int, ...]:
    """nn.Conv's reading of strides and dilations: None is 1, an int is the same on every axis."""
    value = 1 if value is None else value
    return (value, value) if isinstance(value, int) else tuple(value)


class Conv(nn.Conv):
    """nn.Conv with the formulation picked by `conv_and_pool_impl`: a drop-in replacement.

    Same constructor arguments, same parameters ("kernel" (kh, kw, Cin, Cout) from
    `kernel_init`, "bias" (Cout,) from `bias_init`, in `param_dtype`) and the same outputs and
    gradients within float rounding: a params pytree moves between the two unchanged. The
    matrix-product forms cover 2-D convolutions of one batch axis (B, H, W, Cin) with any
    kernel size, strides 1 or 2, 'SAME', 'VALID' or explicit non-negative padding, no
    dilation, one feature group and no mask; anything else, and any backend but a CPU, runs
    nn.Conv's own computation. `impl` forces one of CONV_IMPLS where the case is covered
    (tests and benchmarks compare them).
    """

    impl: str | None = None

    def _matmul_case(self, inputs: jax.Array) -> tuple[tuple[int, int], Pads] | None:
        """(strides, pads) where the matrix-product forms compute this layer, else None."""
        kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                       else tuple(self.kernel_size))
        if self.impl is not None and self.impl not in CONV_IMPLS:
            raise FmnistError(f"unknown conv impl {self.impl!r}: choose one of "
                              f"{', '.join(CONV_IMPLS)}, or None for conv_and_pool_impl's choice")
        strides = _pair(self.strides)
        if (len(kernel_size) != 2 or inputs.ndim != 4 or self.feature_group_count != 1
                or _pair(self.input_dilation) != (1, 1) or _pair(self.kernel_dilation) != (1, 1)
                or self.mask is not None or self.conv_general_dilated is not None
                or self.conv_general_dilated_cls is not None
                or not all(s in (1, 2) for s in strides)):
            return None
        if isinstance(self.padding, str):
            if self.padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
                return None  # CIRCULAR, REFLECT, CAUSAL: nn.Conv pads them itself
            pads = jax.lax.padtype_to_pads(inputs.shape[1:3], kernel_size, strides,
                                           self.padding)
        else:
            pads = canonicalize_padding(self.padding, 2)
        pads = tuple((int(lo), int(hi)) for lo, hi in pads)
        if any(p < 0 for pair in pads for p in pair):
            return None
        if any(n + lo + hi < k for n, (lo, hi), k in zip(inputs.shape[1:3], pads, kernel_size)):
            return None  # no output: nn.Conv says what it says
        return strides, pads

    def _params(self, inputs: jax.Array):
        """kernel and bias (None without one) as nn.Conv makes them, promoted as it does."""
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, inputs.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)

    def _conv_impl(self, inputs: jax.Array, strides: tuple[int, int], pads: Pads) -> str:
        kh, kw = self.kernel_size
        return self.impl or conv_and_pool_impl(
            kernel_shape=(kh, kw, inputs.shape[-1], self.features), strides=strides,
            padded_width=inputs.shape[2] + sum(pads[1]))[0]

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        case = self._matmul_case(inputs)
        if case is None or self._conv_impl(inputs, *case) == "lax":
            return super().__call__(inputs)
        strides, pads = case
        x_BxHxWxF, kernel_YxXxIxO, bias_O = self._params(inputs)
        y_BxHxWxF = CONV_IMPLS[self._conv_impl(inputs, strides, pads)](
            x_BxHxWxF, kernel_YxXxIxO, pads, strides, self.precision)
        return y_BxHxWxF if bias_O is None else y_BxHxWxF + bias_O.reshape(1, 1, 1, -1)


def _select_pool_pads(inputs: jax.Array, window_shape, strides, padding) -> Pads | None:
    """The pads of a max_pool the select-gradient pool computes (a 2x2 window, stride 2,
    over (B, H, W, F) floats), else None."""
    if (inputs.ndim != 4 or tuple(window_shape) != (2, 2) or strides is None
            or tuple(strides) != (2, 2) or not jnp.issubdtype(inputs.dtype, jnp.floating)):
        return None
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(inputs.shape[1:3], (2, 2), (2, 2), padding)
    else:
        pads = tuple(map(tuple, padding))
        if len(pads) != 2 or any(len(pair) != 2 for pair in pads):
            return None
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return None if any(p < 0 for pair in pads for p in pair) else pads


def max_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> jax.Array:
    """nn.max_pool, drop-in: the same arguments, values and gradient (to the first maximum of
    each window). A 2x2 window with stride 2 over (B, H, W, F) runs as the select-gradient
    pool where `conv_and_pool_impl` picks it (a CPU); everything else is nn.max_pool. As
    with nn.max_pool, `strides` defaults to 1 (overlapping windows), not to the window."""
    pads = _select_pool_pads(inputs, window_shape, strides, padding)
    if pads is None or conv_and_pool_impl()[1] != "select":
        return nn.max_pool(inputs, tuple(window_shape), None if strides is None
                           else tuple(strides), padding)
    # padding pads with -inf, as reduce_window's init: it is never a window's first maximum
    # ahead of a value of the input, which comes before it in the window
    return max_pool_2x2_select(_pad_hw(inputs, pads, -jnp.inf))


class ConvReluPool(Conv):
    """max_pool(relu(conv(x) + bias), (2, 2), (2, 2)), computed as relu(pool(conv(x)) + bias).

    The same values (max commutes with adding a per-channel constant and with relu) and the
    same gradients, with the bias add and relu on 4x fewer elements. Arguments and
    parameters as `Conv` (nn.Conv's); `pool_impl` forces one of POOL_IMPLS. A stride-1
    Toeplitz conv with the select pool runs as one layout (`conv_pool_toeplitz`).
    """

    pool_impl: str | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.pool_impl is not None and self.pool_impl not in POOL_IMPLS:
            raise FmnistError(f"unknown pool impl {self.pool_impl!r}: choose one of "
                              f"{', '.join(POOL_IMPLS)}, or None for conv_and_pool_impl's choice")
        case = self._matmul_case(inputs)
        pool_impl = self.pool_impl or conv_and_pool_impl()[1]
        if case is None:  # nn.Conv's computation, bias included, then the pool
            return nn.relu(POOL_IMPLS[pool_impl](super().__call__(inputs)))
        strides, pads = case
        conv_impl = self._conv_impl(inputs, strides, pads)
        x_BxHxWxF, kernel_YxXxIxO, bias_O = self._params(inputs)
        fused = (conv_impl, pool_impl, strides) == ("toeplitz", "select", (1, 1))
        if fused and all(n + lo + hi - k >= 1 for n, (lo, hi), k in  # a pool window across
                         zip(inputs.shape[1:3], pads, self.kernel_size)):
            pooled_BxHxWxF = conv_pool_toeplitz(x_BxHxWxF, kernel_YxXxIxO, pads,
                                                precision=self.precision)
        else:
            pooled_BxHxWxF = POOL_IMPLS[pool_impl](CONV_IMPLS[conv_impl](
                x_BxHxWxF, kernel_YxXxIxO, pads, strides, self.precision))
        if bias_O is not None:
            pooled_BxHxWxF = pooled_BxHxWxF + bias_O.reshape(1, 1, 1, -1)
        return nn.relu(pooled_BxHxWxF)
