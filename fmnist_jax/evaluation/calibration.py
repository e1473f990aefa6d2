"""Calibration maps fit on a validation split, never the test set: temperature scaling
(Guo et al. 2017), vector scaling (Guo et al. 2017) and Dirichlet calibration with ODIR
(Kull et al. 2019, "Beyond temperature scaling").

    cal_map = fit_calibration("dirichlet", val_logits_NxC, val_labels_N)
    test_probs_NxC = jax.nn.softmax(apply_calibration(cal_map, test_logits_NxC))

A map is a plain dict, the form calibration.json stores (`run.results` loads and checks it):

    {"kind": "temperature", "temperature": T}           logits / T
    {"kind": "vector", "w": [C], "b": [C]}               logits * w + b
    {"kind": "dirichlet", "W": [[C] * C], "b": [C]}      log_softmax(logits) @ W.T + b

`apply_calibration` is the one function that applies a map: the report, predict and the
StableHLO export call it, and the ONNX and torch exports are checked against it.

Fit a map on held-out validation data: fitting it on the test set tunes parameters on the
data meant to measure the model, and the test NLL/ECE reported afterwards are optimistic.
Dividing by T > 0 keeps every argmax; vector and Dirichlet maps can change predictions.

A maintained library does this already, but not in JAX: `dirichletcal` (Kull's group;
numpy/scipy, sklearn estimators) fits Dirichlet/ODIR and `netcal` (PyTorch) has temperature
and logistic maps. Neither is jittable nor deterministic to the byte across their optimizers'
stopping rules, and either would add a dependency for ~100 lines, so the maps are fit here:
optax.lbfgs for a fixed number of iterations, from the identity map, full batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmnist_jax.errors import FmnistError
from fmnist_jax.metrics import nll
from fmnist_jax.run.results import CALIBRATION_KINDS

T_MIN, T_MAX = 1e-3, 1e3  # the search interval; an optimum outside it returns the nearer end
_BISECTIONS = 48  # halvings of [log T_MIN, log T_MAX]: below float32 resolution of log T
LBFGS_STEPS = 100  # a fixed count, so the same inputs give the same bytes
CV_FOLDS = 5  # folds of the validation split: sample i is in fold i % CV_FOLDS
# ODIR's grid. Kull et al. 2019 choose lambda (off-diagonal entries of W) and mu (the
# intercept b) by cross-validation on the calibration set over a grid of both; here mu = lambda,
# one grid of 5 instead of 25 fits per fold: both penalties are already means over their
# entries, so one weight treats them alike, and the fit stays a few seconds on a CPU. The
# grid spans "almost free" to "almost diagonal, no intercept" for 10 classes.
ODIR_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def identity_map(kind: str = "temperature", num_classes: int = 10) -> dict:
    """The map that changes no probability: T = 1, w = 1 and b = 0, or W = I and b = 0."""
    return _to_map(kind, _identity_params(kind, num_classes))


def apply_calibration(cal_map: dict, logits_NxC: jax.Array) -> jax.Array:
    """Calibrated logits (N, C) of any map: softmax of them are the calibrated probabilities.

    Pure and jittable in `logits_NxC`: the map's parameters become float32 constants."""
    kind = cal_map["kind"]
    names = ("temperature",) if kind == "temperature" else ("W" if kind == "dirichlet" else "w",
                                                             "b")
    params = {name: jnp.asarray(cal_map[name], jnp.float32) for name in names}
    return _map_logits(kind, params, logits_NxC)


def _map_logits(kind: str, params: dict, logits_NxC: jax.Array) -> jax.Array:
    if kind == "temperature":
        return logits_NxC / params["temperature"]
    if kind == "vector":
        return logits_NxC * params["w"][None, :] + params["b"][None, :]
    if kind == "dirichlet":  # a linear map of the log-probabilities, as the paper writes it
        return jax.nn.log_softmax(logits_NxC, axis=-1) @ params["W"].T + params["b"][None, :]
    raise FmnistError(f"unknown calibration map {kind!r}: choose one of "
                      f"{', '.join(CALIBRATION_KINDS)}")


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


def _check_shapes(logits_NxC, labels_N, who: str):
    logits_NxC, labels_N = jnp.asarray(logits_NxC), jnp.asarray(labels_N)
    if logits_NxC.ndim != 2 or labels_N.shape != logits_NxC.shape[:1] or labels_N.size == 0:
        raise FmnistError(f"{who} needs logits (N, C) and labels (N,) with N > 0, "
                          f"got {logits_NxC.shape} and {labels_N.shape}")
    return logits_NxC.astype(jnp.float32), labels_N


def fit_temperature(logits_NxC: jax.Array, labels_N: jax.Array) -> float:
    """The T > 0 minimizing the mean NLL of softmax(logits / T) on (validation!) data.

    Exact to float32 resolution and deterministic (see `_fit_log_temperature`). T is searched
    in [T_MIN, T_MAX]: logits that separate the classes perfectly make NLL fall forever as
    T -> 0, and then T_MIN comes back. Never fit T on the test set: see the module docstring.
    """
    logits_NxC, labels_N = _check_shapes(logits_NxC, labels_N, "fit_temperature")
    log_t = _fit_log_temperature(logits_NxC, labels_N, _BISECTIONS)
    return float(np.exp(np.float64(log_t)))


# ---------------------------------------------------------------------------------------
# Vector scaling and Dirichlet calibration: L-BFGS from the identity


def _identity_params(kind: str, c: int) -> dict:
    if kind == "temperature":
        return {"temperature": jnp.float32(1.0)}
    if kind == "vector":
        return {"w": jnp.ones(c, jnp.float32), "b": jnp.zeros(c, jnp.float32)}
    if kind == "dirichlet":
        return {"W": jnp.eye(c, dtype=jnp.float32), "b": jnp.zeros(c, jnp.float32)}
    raise FmnistError(f"unknown calibration map {kind!r}: choose one of "
                      f"{', '.join(CALIBRATION_KINDS)}")


def _to_map(kind: str, params: dict) -> dict:
    """Arrays -> the JSON-able map (float32 values as Python floats: exact both ways)."""
    return {"kind": kind, **{name: np.asarray(value, np.float32).tolist()
                             for name, value in params.items()}}


def _objective(kind, params, logits_NxC, labels_N, weights_N, lam, mu):
    """Weighted mean NLL of the map, plus ODIR for Dirichlet (Kull et al. 2019, eq. 7)."""
    nll_N = optax.softmax_cross_entropy_with_integer_labels(
        _map_logits(kind, params, logits_NxC), labels_N)
    loss = jnp.sum(weights_N * nll_N) / jnp.sum(weights_N)
    if kind == "dirichlet":
        c = logits_NxC.shape[1]
        off_diagonal_CxC = params["W"] * (1.0 - jnp.eye(c, dtype=params["W"].dtype))
        loss += (lam * jnp.sum(off_diagonal_CxC ** 2) / (c * (c - 1))
                 + mu * jnp.sum(params["b"] ** 2) / c)
    return loss


def _fit_params_one(kind, logits_NxC, labels_N, weights_N, lam, mu, n_steps):
    """LBFGS_STEPS of L-BFGS (zoom line search) from the identity map: no step size to tune,
    and a step whose value is not finite is refused (the last finite parameters are kept)."""
    objective = functools.partial(_objective, kind, logits_NxC=logits_NxC, labels_N=labels_N,
                                  weights_N=weights_N, lam=lam, mu=mu)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(_, carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, new_state = solver.update(grad, state, params, value=value, grad=grad,
                                           value_fn=objective)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x))
                                    for x in jax.tree_util.tree_leaves(new_params)]))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        return (jax.tree_util.tree_map(keep, new_params, params),
                jax.tree_util.tree_map(keep, new_state, state))

    params = _identity_params(kind, logits_NxC.shape[1])
    params, _ = jax.lax.fori_loop(0, n_steps, step, (params, solver.init(params)))
    return params


@functools.partial(jax.jit, static_argnames=("kind", "n_steps"))
def _fit_params(kind, logits_NxC, labels_N, weights_BxN, lam_B, mu_B, n_steps):
    """One fit per row of weights (a fold's training samples) and (lambda, mu), at once."""
    return jax.vmap(_fit_params_one, in_axes=(None, None, None, 0, 0, 0, None))(
        kind, logits_NxC, labels_N, weights_BxN, lam_B, mu_B, n_steps)


@functools.partial(jax.jit, static_argnames="kind")
def _held_out_nll_sums(kind, params_B, logits_NxC, labels_N, held_out_BxN):
    """For each fitted map b: the summed NLL over its held-out samples."""
    def one(params, held_out_N):
        nll_N = optax.softmax_cross_entropy_with_integer_labels(
            _map_logits(kind, params, logits_NxC), labels_N)
        return jnp.sum(held_out_N * nll_N)
    return jax.vmap(one)(params_B, held_out_BxN)


def _cross_validate(kind, logits_NxC, labels_N, lam_G, mu_G, k: int) -> np.ndarray:
    """k-fold cross-validated mean NLL of each (lambda, mu) (sample i in fold i % k): every
    fold's map is fit on the other folds, all fits at once, each sample scored once."""
    g = len(lam_G)
    fold_N = np.arange(len(labels_N)) % k
    held_out_FxN = (fold_N[None, :] == np.arange(k)[:, None]).astype(np.float32)
    held_out_BxN = np.tile(held_out_FxN, (g, 1))  # row i * k + f: grid point i, fold f
    params_B = _fit_params(kind, logits_NxC, labels_N, 1.0 - held_out_BxN,
                           np.repeat(lam_G, k).astype(np.float32),
                           np.repeat(mu_G, k).astype(np.float32), LBFGS_STEPS)
    sums_B = np.asarray(_held_out_nll_sums(kind, params_B, logits_NxC, labels_N,
                                           held_out_BxN), np.float64)
    return sums_B.reshape(g, k).sum(axis=1) / len(labels_N)


def fit_and_score(kind: str, logits_NxC, labels_N, *, k: int = CV_FOLDS) -> tuple[dict, float]:
    """(the map of `kind` fit on all these (validation!) samples, its k-fold cross-validated
    NLL on them). The cross-validated NLL says which kind of map generalises best without
    touching the test set: each sample is scored by a map fit without it.

    temperature: `fit_temperature`. vector: unregularised, as Guo et al. Dirichlet: ODIR
    with lambda = mu chosen from ODIR_LAMBDAS by the same k-fold cross-validation, then fit
    on all samples; its cross-validated NLL is that of the chosen lambda, so a choice among
    5 flatters it slightly (nesting a second cross-validation would cost 5 times the fits).
    Deterministic: the same inputs give the same map and number, to the byte.
    """
    if kind not in CALIBRATION_KINDS:
        raise FmnistError(f"unknown calibration map {kind!r}: choose one of "
                          f"{', '.join(CALIBRATION_KINDS)}")
    logits_NxC, labels_N = _check_shapes(logits_NxC, labels_N, "fit_and_score")
    if len(labels_N) < k:
        raise FmnistError(f"fit_and_score needs at least {k} samples for {k} folds, got "
                          f"{len(labels_N)}")
    if kind == "temperature":
        fold_N = np.arange(len(labels_N)) % k
        total = 0.0
        for f in range(k):  # bisection per fold: the exact T, as the final fit
            train, held = fold_N != f, fold_N == f
            t = fit_temperature(logits_NxC[train], labels_N[train])
            total += float(nll(logits_NxC[held] / t, labels_N[held])) * int(held.sum())
        return ({"kind": "temperature", "temperature": fit_temperature(logits_NxC, labels_N)},
                total / len(labels_N))
    lam_G = np.float32(ODIR_LAMBDAS if kind == "dirichlet" else [0.0])
    cv_nll_G = _cross_validate(kind, logits_NxC, labels_N, lam_G, lam_G, k)
    best = int(np.argmin(cv_nll_G))  # the first minimum: the weakest regularisation of ties
    lam = float(lam_G[best])
    params = _fit_params(kind, logits_NxC, labels_N, jnp.ones((1, len(labels_N)), jnp.float32),
                         jnp.float32([lam]), jnp.float32([lam]), LBFGS_STEPS)
    cal_map = _to_map(kind, jax.tree_util.tree_map(lambda x: x[0], params))
    if kind == "dirichlet":
        cal_map.update(odir_lambda=lam, odir_mu=lam)
    return cal_map, float(cv_nll_G[best])


def fit_calibration(kind: str, logits_NxC, labels_N, *, k: int = CV_FOLDS) -> dict:
    """The map of `kind` (one of CALIBRATION_KINDS) fit on (validation!) data: see
    `fit_and_score`."""
    return fit_and_score(kind, logits_NxC, labels_N, k=k)[0]
