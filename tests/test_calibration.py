"""Temperature scaling: the fitted T is the NLL minimum, and T never changes a prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import metrics
from fmnist_jax.evaluation import calibration
from fmnist_jax.errors import FmnistError

C = 10


def make_logits(seed, scale, n=2000):
    """Logits whose softmax is over- (scale > 1) or under-confident (scale < 1).

    x = 2 onehot(y) + N(0, I) has the exact posterior softmax(2 x) (uniform y), so 2 x are
    calibrated logits, and these are `scale` times them: the best T is about `scale`.
    """
    rng = np.random.default_rng(seed)
    labels_N = rng.integers(0, C, n)
    logits_NxC = 2.0 * (2.0 * np.eye(C)[labels_N] + rng.normal(size=(n, C)))
    return (scale * logits_NxC).astype(np.float32), labels_N


def nll64(logits_NxC, labels_N, temperature):
    """Mean NLL of softmax(logits / T) in float64, as the independent reference."""
    z = np.asarray(logits_NxC, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.mean(log_probs[np.arange(len(labels_N)), labels_N])


# The fast set: over-confident logits (a trained net's); the others are slow (the float64
# grid of 4,001 temperatures takes about a second a case).
@pytest.mark.parametrize("seed,scale", [(0, 3.0), *(pytest.param(*case, marks=pytest.mark.slow)
                                                    for case in [(1, 0.4), (2, 1.0)])])
def test_fit_temperature_finds_the_nll_minimum_of_a_fine_grid(seed, scale):
    logits_NxC, labels_N = make_logits(seed, scale)
    t_fit = calibration.fit_temperature(logits_NxC, labels_N)
    log_grid = np.linspace(np.log(0.05), np.log(20.0), 4001)  # steps of 0.15% in T
    nll_grid = np.array([nll64(logits_NxC, labels_N, t) for t in np.exp(log_grid)])
    best = int(np.argmin(nll_grid))
    assert abs(np.log(t_fit) - log_grid[best]) <= 2 * (log_grid[1] - log_grid[0])
    assert nll64(logits_NxC, labels_N, t_fit) <= nll_grid[best] + 1e-7
    assert t_fit == calibration.fit_temperature(logits_NxC, labels_N)  # deterministic
    # the scale the logits were blown up by is roughly undone
    assert 0.85 < t_fit / scale < 1.15


def test_temperature_never_changes_accuracy_and_helps_nll():
    logits_NxC, labels_N = make_logits(3, 4.0)
    t_fit = calibration.fit_temperature(logits_NxC, labels_N)
    logits, labels = jnp.asarray(logits_NxC), jnp.asarray(labels_N)
    preds_N = jnp.argmax(logits, axis=-1)
    for t in (t_fit, 0.01, 0.5, 7.0, 1e3):
        scaled = calibration.apply_temperature(logits, t)
        np.testing.assert_array_equal(jnp.argmax(scaled, axis=-1), preds_N)
        assert float(metrics.accuracy(scaled, labels)) == float(metrics.accuracy(logits, labels))
    scaled = calibration.apply_temperature(logits, t_fit)
    assert float(metrics.nll(scaled, labels)) < float(metrics.nll(logits, labels))
    probs_before, probs_after = jax.nn.softmax(logits), jax.nn.softmax(scaled)
    assert float(metrics.expected_calibration_error(probs_after, labels)) < float(
        metrics.expected_calibration_error(probs_before, labels))


def test_apply_temperature_divides_and_accepts_an_array_temperature():
    logits_NxC = jnp.arange(20.0).reshape(2, C)
    np.testing.assert_allclose(calibration.apply_temperature(logits_NxC, 2.0), logits_NxC / 2)
    np.testing.assert_allclose(calibration.apply_temperature(logits_NxC, jnp.float32(4.0)),
                               logits_NxC / 4)


def test_separable_logits_give_the_smallest_temperature():
    labels_N = np.arange(50) % C
    logits_NxC = 5.0 * np.eye(C, dtype=np.float32)[labels_N]  # NLL falls forever as T -> 0
    t_fit = calibration.fit_temperature(logits_NxC, labels_N)
    assert calibration.T_MIN <= t_fit < 1.0001 * calibration.T_MIN


@pytest.mark.parametrize("logits_shape,labels_shape", [((5,), (5,)), ((5, C), (4,)),
                                                        ((0, C), (0,))])
def test_fit_temperature_rejects_bad_shapes(logits_shape, labels_shape):
    with pytest.raises(FmnistError, match="fit_temperature"):
        calibration.fit_temperature(np.zeros(logits_shape, np.float32),
                                    np.zeros(labels_shape, np.int32))
