"""Calibration errors beyond the 15 equal-width bins of `metrics.expected_calibration_error`.

Pure, jittable JAX functions of probabilities (N, C) and int labels (N,), each equal to an
independent numpy reference in tests/test_calibration_errors.py within 1e-6:

- `equal_mass_ece`: top-1 ECE over bins holding equally many examples (Nixon et al. 2019,
  "Measuring calibration in deep learning"; Roelofs et al. 2022's ECE_EM).
- `ece_sweep`: equal-mass ECE with the most bins that keep the bin accuracies monotone in
  confidence (Roelofs et al. 2022, "Mitigating bias in calibration error estimation").
- `debiased_l2_ce`: the debiased estimate of the l2 (root-mean-square) top-1 calibration
  error over equal-mass bins (Kumar et al. 2019, "Verified uncertainty calibration").
- `classwise_ece`: per-class ECE of every class's probability, averaged over classes
  (Kull et al. 2019, "Beyond temperature scaling"), 15 equal-width bins.
- `smooth_ece`: SmoothECE with its bandwidth (Blasiok & Nakkiran 2024, "Smooth ECE"),
  computed as their reference implementation `relplot.smECE` computes it.
- `smooth_reliability`: the curve of their reliability diagram, accuracy against confidence
  by the same kernel regression (relplot's `KernelSmoother`), at a given bandwidth.

Equal-mass bins split the examples sorted by confidence (a stable sort) as numpy's
`array_split` does: the first N % B bins hold one example more. `n_bins` and `presorted`
(the examples come in ascending confidence already: `sort_by_confidence`) are static under
jit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np



def bin_edges(n_bins: int) -> np.ndarray:
    """The n_bins + 1 float32 edges torch.linspace(0, 1, n_bins + 1) makes on CPU.

    They are not always the float32 nearest to k / n_bins (for 15 bins the edge at 0.4 is
    0.40000004): torch rounds step * k below halfway and 1 - step * (n_bins - k) from there,
    once each, with step = float32(1 / n_bins). Matching them only matters for a confidence
    exactly on an edge; checked against torch 2.13 (x86) for n_bins up to 399.
    """
    step = float(np.float32(1.0) / np.float32(n_bins))  # exact in float64, as are the products
    k = np.arange(n_bins + 1)
    return np.where(k < (n_bins + 1) // 2, step * k, 1.0 - step * (n_bins - k)).astype(np.float32)


def _top1(probs_NxC: jax.Array, labels_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(top-1 confidence, 1.0 where the argmax is the label), both float32 (N,)."""
    confidence_N = jnp.max(probs_NxC, axis=-1).astype(jnp.float32)
    return confidence_N, (jnp.argmax(probs_NxC, axis=-1) == labels_N).astype(jnp.float32)


def sort_by_confidence(probs_NxC: jax.Array, labels_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The examples in ascending order of top-1 confidence (a stable sort): what the
    `presorted=True` of the equal-mass errors expects, sorted once for many calls (e.g. the
    resamples of `bootstrap_ci(..., ordered=True)`)."""
    order_N = jnp.argsort(jnp.max(probs_NxC, axis=-1), stable=True)
    return probs_NxC[order_N], labels_N[order_N]


def _sorted_top1(probs_NxC, labels_N, presorted=False):
    """Top-1 confidence and hits (float32 (N,)) in confidence order (a stable sort, skipped
    when the examples are `presorted`)."""
    confidence_N, hits_N = _top1(probs_NxC, labels_N)
    if presorted:
        return confidence_N, hits_N
    order_N = jnp.argsort(confidence_N, stable=True)
    return confidence_N[order_N], hits_N[order_N]


def _equal_mass_sums(confidence_N, hits_N, n_bins, max_bins):
    """(count, hits, hits - confidences) per bin of `n_bins` (may be traced) equal-mass bins
    of the sorted examples, as arrays of static length `max_bins` (0 beyond n_bins). Summed
    per bin, not as differences of prefix sums, which lose float32 digits."""
    n = confidence_N.shape[0]
    size, extra = n // n_bins, n % n_bins  # array_split: the first `extra` bins hold size + 1
    i_N = jnp.arange(n)
    bin_N = jnp.where(i_N < extra * (size + 1), i_N // (size + 1),
                      extra + (i_N - extra * (size + 1)) // jnp.maximum(size, 1))

    def per_bin(values_N):
        return jax.ops.segment_sum(values_N, bin_N, num_segments=max_bins)

    return per_bin(jnp.ones_like(hits_N)), per_bin(hits_N), per_bin(hits_N - confidence_N)


def equal_mass_ece(probs_NxC: jax.Array, labels_N: jax.Array, *, n_bins: int = 15,
                   presorted: bool = False) -> jax.Array:
    """Sum over equal-mass bins of |hits - confidences| in the bin, divided by N."""
    _, _, gap_B = _equal_mass_sums(*_sorted_top1(probs_NxC, labels_N, presorted), n_bins,
                                   n_bins)
    return jnp.sum(jnp.abs(gap_B)) / labels_N.shape[0]


_EXACT_PRODUCTS = 46340  # n * n fits in int32
_SWEEP_AT_ONCE = 128  # bin counts the sweep tests in one step before going on one at a time


def ece_sweep(probs_NxC: jax.Array, labels_N: jax.Array, *,
              presorted: bool = False) -> tuple[jax.Array, jax.Array]:
    """(ECE_sweep, its number of bins): equal-mass ECE with b bins, b the last of 1, 2, ...
    before the first whose bin accuracies are not non-decreasing in confidence (the sweep
    stops there, as Roelofs et al.'s). At most N bins."""
    n = labels_N.shape[0]
    confidence_N, hits_N = _sorted_top1(probs_NxC, labels_N, presorted)
    hits_before_N1 = jnp.concatenate([jnp.zeros(1, jnp.int32),
                                      jnp.cumsum(hits_N.astype(jnp.int32))])  # exact

    def monotone(b_B, num_bins):
        # For each bin count b: are bins 0 .. num_bins - 1 of b monotone (all of them when
        # b <= num_bins)? Bin k of b starts at k * (n // b) + min(k, n % b); acc_k+1 >= acc_k
        # is compared as hits_k+1 * size_k >= hits_k * size_k+1 in integers, where float32
        # ratios can tie.
        b_Bx1, k_1xK1 = b_B[:, None], jnp.arange(num_bins + 1)[None, :]
        starts_BxK1 = jnp.minimum(k_1xK1 * (n // b_Bx1) + jnp.minimum(k_1xK1, n % b_Bx1), n)
        size_BxK = starts_BxK1[:, 1:] - starts_BxK1[:, :-1]
        hits_BxK = hits_before_N1[starts_BxK1[:, 1:]] - hits_before_N1[starts_BxK1[:, :-1]]
        if n <= _EXACT_PRODUCTS:
            ok_BxKm1 = hits_BxK[:, 1:] * size_BxK[:, :-1] >= hits_BxK[:, :-1] * size_BxK[:, 1:]
        else:
            acc_BxK = hits_BxK / jnp.maximum(size_BxK, 1)
            ok_BxKm1 = acc_BxK[:, 1:] >= acc_BxK[:, :-1]
        return jnp.all(ok_BxKm1 | (jnp.arange(1, num_bins)[None, :] >= b_Bx1), axis=1)

    # The first bin counts at once, each over its first bins only: a loop of one bin count a
    # step spends O(N) on each (and under vmap runs as long as the longest sweep of a batch).
    at_once = min(n, _SWEEP_AT_ONCE)
    passed_B = monotone(jnp.arange(2, at_once + 1), at_once)
    b = 1 + jnp.sum(jnp.cumprod(passed_B.astype(jnp.int32)))
    b = jax.lax.while_loop(lambda b: (b < n) & monotone(jnp.stack([b + 1]), n)[0],
                           lambda b: b + 1, b)
    _, _, gap_N = _equal_mass_sums(confidence_N, hits_N, b, n)
    return jnp.sum(jnp.abs(gap_N)) / n, b


def debiased_l2_ce(probs_NxC: jax.Array, labels_N: jax.Array, *, n_bins: int = 15,
                   presorted: bool = False) -> jax.Array:
    """sqrt(max(0, sum_b n_b / N * ((acc_b - conf_b)^2 - acc_b (1 - acc_b) / (n_b - 1))))
    over equal-mass bins; a bin of one example adds 0."""
    # Kumar et al. 2019 (Sec. 5) subtract each bin's sampling variance of the accuracy from
    # its squared gap, which removes the plug-in estimate's upward bias to first order.
    n = labels_N.shape[0]
    size_B, hits_B, gap_B = _equal_mass_sums(*_sorted_top1(probs_NxC, labels_N, presorted),
                                             n_bins, n_bins)
    acc_B = hits_B / jnp.maximum(size_B, 1.0)
    error_B = ((gap_B / jnp.maximum(size_B, 1.0)) ** 2
               - acc_B * (1.0 - acc_B) / jnp.maximum(size_B - 1.0, 1.0))
    squared = jnp.sum(jnp.where(size_B >= 2, size_B / n * error_B, 0.0))
    return jnp.sqrt(jnp.maximum(squared, 0.0))


def equal_width_bin(values: jax.Array, n_bins: int) -> jax.Array:
    """The bin of each value in [0, 1] among `bin_edges(n_bins)` (the extra bin n_bins holds
    1.0): searchsorted(edges, values, "right") - 1, computed as floor(value * n_bins) moved by
    one where the torch edges or the rounding of value * n_bins disagree with it, which costs
    a sixth of a binary search on a CPU."""
    edges_E = jnp.asarray(np.append(bin_edges(n_bins), np.inf).astype(np.float32))
    values = values.astype(jnp.float32)
    guess = jnp.clip(jnp.floor(values * n_bins).astype(jnp.int32), 0, n_bins)
    return guess - (values < edges_E[guess]) + (values >= edges_E[guess + 1])


def classwise_ece(probs_NxC: jax.Array, labels_N: jax.Array, *,
                  n_bins: int = 15) -> jax.Array:
    """Mean over classes k of the ECE of p_k against 1[label == k] over all examples, binned
    as `metrics.reliability_diagram` bins (equal width, the extra bin for 1.0)."""
    n, num_classes = probs_NxC.shape
    probs_NxC = probs_NxC.astype(jnp.float32)
    bin_NxC = equal_width_bin(probs_NxC, n_bins)
    target_NxC = jax.nn.one_hot(labels_N, num_classes, dtype=jnp.float32)
    flat_NxC = bin_NxC + (n_bins + 1) * jnp.arange(num_classes)[None, :]  # one per class
    gap = jnp.zeros(num_classes * (n_bins + 1), jnp.float32).at[flat_NxC].add(
        target_NxC - probs_NxC)
    return jnp.sum(jnp.abs(gap)) / (n * num_classes)


# relplot's grids: the data are splat onto E points and smoothed there, then the error is
# summed over M points; E and M grow as the bandwidth shrinks (relplot.kernels/metrics).
_SIGMA_EPS = 0.001  # relplot.smECE's eps: a bandwidth below it stops the search
_REFINE = 10  # relplot's halvings of the bandwidth interval
_E_MAX = (round(20 / (2 / 2 ** _REFINE)) // 2) + 1  # the smallest bandwidth tried is 2^-9
_M_MAX = round(10 / (2 / 2 ** _REFINE))
# Two static grids: E = 1001 (sigma >= 0.01) with the whole kernel, and E up to _E_MAX with
# the kernel cut at 128 grid points, which is 12 sigma there (sigma * (E - 1) is about 10):
# the cut-off weights are below exp(-72), and the smoothing costs a tenth.
_WIDE = (1001, 500)
_NARROW = (_E_MAX, 128)


def _grid_points(sigma):
    """relplot's number of grid points E for bandwidth sigma (1001 for every sigma >= 0.01)."""
    return jnp.maximum(2000, jnp.round(20.0 / sigma).astype(jnp.int32)) // 2 + 1


def _smooth_at_one(f_N, r_N, t_M, sigma):
    """relplot's ReflectedGaussianKernel(sigma).smooth(f, r, t): kernel regression of r on
    the grid, reflected at 0 and 1, at t_M; and the density there."""
    e = _grid_points(sigma)
    return jax.lax.cond(e == _WIDE[0], functools.partial(_smooth_on_grid, *_WIDE),
                        functools.partial(_smooth_on_grid, *_NARROW), f_N, r_N, t_M, sigma, e)


_smooth_at = jax.custom_batching.custom_vmap(_smooth_at_one)


@_smooth_at.def_vmap
def _smooth_at_batched(axis_size, in_batched, *args):
    """`_smooth_at` of a batch. With a bandwidth per member, vmap's own rule turns the `cond`
    into a select of both grids, each computed always, where a bootstrap's batch mostly
    needs one; here each grid smooths the batch only when a member needs it: the same
    numbers for about half the work."""
    if not in_batched[-1]:  # one bandwidth: the `cond` stays one
        return (jax.vmap(_smooth_at_one, in_axes=[0 if b else None for b in in_batched])(*args),
                (True, True))
    args = [x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
            for x, batched in zip(args, in_batched)]
    e_B = _grid_points(args[-1])
    wide_B = e_B == _WIDE[0]

    def smoothed_where(grid, needed_B):
        smooth_fn = jax.vmap(functools.partial(_smooth_on_grid, *grid))
        unused = lambda: jax.tree_util.tree_map(  # noqa: E731
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(smooth_fn, *args, e_B))
        return jax.lax.cond(jnp.any(needed_B), lambda: smooth_fn(*args, e_B), unused)

    out = jax.tree_util.tree_map(lambda wide, narrow: jnp.where(wide_B[:, None], wide, narrow),
                                 smoothed_where(_WIDE, wide_B), smoothed_where(_NARROW, ~wide_B))
    return out, (True, True)


def _smooth_on_grid(e_max, half_width, f_N, r_N, t_M, sigma, e):
    """`_smooth_at` on a grid of e <= e_max points, the kernel cut at half_width points."""
    scale = (e - 1).astype(jnp.float32)
    bin_N = jnp.clip((f_N * scale).astype(jnp.int32), 0, e - 2)
    frac_N = f_N * scale - bin_N

    def splat(values_N):
        grid = jnp.zeros(e_max, jnp.float32).at[bin_N].add((1 - frac_N) * values_N)
        return grid.at[bin_N + 1].add(frac_N * values_N)

    grid_2xE = jnp.stack([splat(r_N), splat(jnp.ones_like(r_N))])
    # A symmetric kernel, so relplot's np.convolve is a correlation; for an even e its
    # centre falls half a grid step off, hence `shift`.
    j_K = jnp.arange(-half_width, half_width + 1)
    c = (e - 1) - e // 2
    shift = jnp.where(e % 2 == 0, 0.5, 0.0)
    x_K = (j_K - shift) / scale
    kernel_K = jnp.where((j_K >= -c) & (j_K <= e - 1 - c),
                         jnp.exp(-x_K * x_K / (2 * sigma * sigma))
                         / (np.sqrt(2 * np.pi) * sigma), 0.0)
    p = jnp.arange(e_max + 2 * half_width) - half_width  # grid index, reflected into [0, e)
    p = jnp.where(p < 0, -p, jnp.where(p >= e, 2 * e - 2 - p, p))
    padded_2xP = grid_2xE[:, jnp.clip(p, 0, e_max - 1)]
    smoothed_2xE = jax.vmap(lambda g: jnp.correlate(
        g, kernel_K, "valid", precision=jax.lax.Precision.HIGHEST))(padded_2xP)
    ind_M = jnp.clip((t_M * scale).astype(jnp.int32), 0, e - 2)
    residual_M = (t_M - ind_M / scale) * scale
    at_t_2xM = (smoothed_2xE[:, ind_M] * (1 - residual_M)[None, :]
                + smoothed_2xE[:, ind_M + 1] * residual_M[None, :])
    density_M = at_t_2xM[1] + 0.0001
    return at_t_2xM[0] / density_M, density_M


def _smooth_ece_at(f_N, y_N, sigma):
    m = jnp.maximum(jnp.round(10.0 / sigma).astype(jnp.int32), 200)
    i_M = jnp.arange(_M_MAX)
    t_M = jnp.where(i_M == m - 1, 1.0, i_M / (m - 1).astype(jnp.float32))
    residual_M, density_M = _smooth_at(f_N, f_N - y_N, t_M, sigma)
    density_M = jnp.where(i_M < m, density_M, 0.0)
    return jnp.sum(jnp.abs(residual_M) * density_M) / jnp.sum(density_M)


def smooth_ece(probs_NxC: jax.Array, labels_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(SmoothECE, its bandwidth sigma) of the top-1 confidence, as relplot.smECE(f, y,
    return_width=True): sigma is the fixed point smECE_sigma = sigma, found by relplot's 10
    halvings of [0, 1] (1 itself if smECE_1 > 1, which never happens), and the ECE of the
    reflected-Gaussian kernel regression of (confidence - hit) at that sigma."""
    f_N, y_N = _top1(probs_NxC, labels_N)

    def halve(_, bounds):  # relplot's check_smooth_ece decides which half to keep
        start, end, at_start = bounds
        mid = 0.5 * (start + end)
        at_mid = _smooth_ece_at(f_N, y_N, mid)
        too_wide = (mid < _SIGMA_EPS) | (mid < at_mid)
        return (jnp.where(too_wide, start, mid), jnp.where(too_wide, mid, end),
                jnp.where(too_wide, at_start, at_mid))

    # The error at `start` rides along (the last start is the bandwidth, its error the result)
    # rather than being computed a twelfth time.
    at_one = _smooth_ece_at(f_N, y_N, jnp.float32(1.0))
    start, _, at_start = jax.lax.fori_loop(0, _REFINE, halve,
                                           (jnp.float32(1.0), jnp.float32(0.0), at_one))
    one_too_wide = at_one > 1.0
    return jnp.where(one_too_wide, at_one, at_start), jnp.where(one_too_wide, 1.0, start)


SMOOTH_CURVE_POINTS = 201  # the confidences 0, 0.005, ..., 1 at which the curve is drawn


def smooth_reliability(probs_NxC: jax.Array, labels_N: jax.Array, sigma: jax.Array, *,
                       n_points: int = SMOOTH_CURVE_POINTS) -> jax.Array:
    """(n_points,) the expected top-1 hit at confidences linspace(0, 1, n_points): the
    reflected-Gaussian kernel regression of hits on confidences with bandwidth `sigma` (the
    SmoothECE bandwidth draws the curve whose gap to the diagonal SmoothECE measures), as
    relplot.estimators.KernelSmoother(ReflectedGaussianKernel(sigma)).predict."""
    f_N, y_N = _top1(probs_NxC, labels_N)
    curve_M, _ = _smooth_at(f_N, y_N, jnp.linspace(0.0, 1.0, n_points), sigma)
    return curve_M
