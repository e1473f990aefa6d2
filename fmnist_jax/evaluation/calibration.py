"""Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides the logits.

    T = fit_temperature(val_logits_NxC, val_labels_N)  # a validation split, never the test set
    test_probs_NxC = jax.nn.softmax(apply_temperature(test_logits_NxC, T))

Fit T on held-out validation data: fitting it on the test set tunes a parameter on the data
that is meant to measure the model, and the test NLL/ECE reported afterwards are optimistic.
Dividing by T > 0 keeps every argmax, so accuracy (and the confusion matrix) do not change.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax.errors import FmnistError
from fmnist_jax.metrics import nll

T_MIN, T_MAX = 1e-3, 1e3  # the search interval; an optimum outside it returns the nearer end
_BISECTIONS = 48  # halvings of [log T_MIN, log T_MAX]: below float32 resolution of log T


def apply_temperature(logits_NxC: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """Logits / T: softmax of it is sharper for T < 1 and softer for T > 1."""
    return logits_NxC / temperature


@functools.partial(jax.jit, static_argnames="n_steps")
def _fit_log_temperature(logits_NxC: jax.Array, labels_N: jax.Array, n_steps: int) -> jax.Array:
    """log T minimizing NLL(softmax(logits / T)), by bisection on the sign of the derivative.

    NLL is convex in beta = 1 / T (a mean of logsumexp(beta z) - beta z_y), so its derivative
    in beta changes sign once, at the optimum, and bisection in log T finds it: deterministic,
    no step size, and a fixed number of iterations. `dNLL/dbeta > 0` means beta is too large.
    """
    slope_fn = jax.grad(lambda beta: nll(logits_NxC * beta, labels_N))

    def halve(_, bounds):
        lo, hi = bounds  # in log T
        mid = 0.5 * (lo + hi)
        too_sharp = slope_fn(jnp.exp(-mid)) > 0  # beta too large, so T too small
        return jnp.where(too_sharp, mid, lo), jnp.where(too_sharp, hi, mid)

    lo, hi = jax.lax.fori_loop(0, n_steps, halve,
                               (jnp.float32(np.log(T_MIN)), jnp.float32(np.log(T_MAX))))
    return 0.5 * (lo + hi)


def fit_temperature(logits_NxC: jax.Array, labels_N: jax.Array) -> float:
    """The T > 0 minimizing the mean NLL of softmax(logits / T) on (validation!) data.

    Exact to float32 resolution and deterministic (see `_fit_log_temperature`). T is searched
    in [T_MIN, T_MAX]: logits that separate the classes perfectly make NLL fall forever as
    T -> 0, and then T_MIN comes back. Never fit T on the test set: see the module docstring.
    """
    logits_NxC, labels_N = jnp.asarray(logits_NxC), jnp.asarray(labels_N)
    if logits_NxC.ndim != 2 or labels_N.shape != logits_NxC.shape[:1] or labels_N.size == 0:
        raise FmnistError(f"fit_temperature needs logits (N, C) and labels (N,) with N > 0, "
                          f"got {logits_NxC.shape} and {labels_N.shape}")
    log_t = _fit_log_temperature(logits_NxC.astype(jnp.float32), labels_N, _BISECTIONS)
    return float(np.exp(np.float64(log_t)))
