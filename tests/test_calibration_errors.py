"""Each calibration error of fmnist_jax.metrics equals an independent float64 numpy
version of its paper's definition within 1e-6, on random and on trained-model logits; SmoothECE
also equals relplot's smECE where relplot is installed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import metrics as cm

TOL = 1e-6


def _top1(probs, labels):
    probs = np.asarray(probs, np.float32)
    return probs.max(1).astype(np.float64), (probs.argmax(1) == labels).astype(np.float64)


def _bins(conf, n_bins):
    return np.array_split(np.argsort(conf, kind="stable"), n_bins)


def ref_equal_mass_ece(probs, labels, n_bins=15):
    conf, hit = _top1(probs, labels)
    return sum(abs(np.sum(hit[b] - conf[b])) for b in _bins(conf, n_bins)) / len(conf)


def ref_ece_sweep(probs, labels):
    conf, hit = _top1(probs, labels)
    best = 1
    for b in range(2, len(conf) + 1):
        acc = [hit[idx].mean() for idx in _bins(conf, b)]
        if np.any(np.diff(acc) < 0):
            break
        best = b
    return ref_equal_mass_ece(probs, labels, best), best


def ref_debiased_l2(probs, labels, n_bins=15):
    conf, hit = _top1(probs, labels)
    total = 0.0
    for idx in _bins(conf, n_bins):
        if len(idx) >= 2:
            acc = hit[idx].mean()
            total += len(idx) / len(conf) * (
                (acc - conf[idx].mean()) ** 2 - acc * (1 - acc) / (len(idx) - 1))
    return np.sqrt(max(total, 0.0))


def ref_classwise_ece(probs, labels, n_bins=15):
    probs = np.asarray(probs, np.float32)
    n, c = probs.shape
    edges = cm.bin_edges(n_bins)
    total = 0.0
    for k in range(c):
        p = probs[:, k].astype(np.float64)
        target = (labels == k).astype(np.float64)
        which = np.searchsorted(edges, probs[:, k], side="right") - 1
        total += sum(abs(np.sum(target[which == b] - p[which == b])) for b in range(n_bins + 1))
    return total / (n * c)


def ref_smooth_ece(probs, labels):
    """relplot 1.0.3's smECE(f, y, return_width=True), written out: a reflected-Gaussian kernel
    regression of f - y on a grid, and the bandwidth search for smECE_sigma = sigma."""
    f, y = _top1(probs, labels)

    def apply(values_at, sigma, t):
        e = max(2000, round(20 / sigma)) // 2 + 1
        grid = np.zeros(e)
        b = (f * (e - 1)).astype(int).clip(0, e - 2)
        frac = f * (e - 1) - b
        np.add.at(grid, b, (1 - frac) * values_at)
        np.add.at(grid, b + 1, frac * values_at)
        x = np.linspace(0, 1, e)
        kernel = np.exp(-(x - 0.5) ** 2 / (2 * sigma ** 2)) / (np.sqrt(2 * np.pi) * sigma)
        ext = np.concatenate([np.flip(grid)[:-1], grid, np.flip(grid)[1:]])
        smoothed = np.convolve(ext, kernel, "valid")[e // 2: e // 2 + e]
        ind = (t * (e - 1)).astype(int).clip(0, e - 2)
        r = (t - ind / (e - 1)) * (e - 1)
        return smoothed[ind] * (1 - r) + smoothed[ind + 1] * r

    def at(sigma):
        t = np.linspace(0, 1, max(round(10 / sigma), 200))
        dens = apply(np.ones_like(f), sigma, t) + 0.0001
        rs = apply(f - y, sigma, t) / dens
        return np.sum(np.abs(rs) * dens) / np.sum(dens)

    def wide(alpha):
        return alpha < 0.001 or alpha < at(alpha)

    start, end = 1.0, 0.0
    if not wide(1.0):
        for _ in range(10):
            mid = (start + end) / 2
            start, end = (start, mid) if wide(mid) else (mid, end)
    return at(start), start


def _random_case(seed, n=2000, c=10, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)).astype(np.float32) * scale
    labels = rng.integers(0, c, n)
    # Half the labels follow the logits, so accuracies and confidences are not unrelated.
    follow = rng.random(n) < 0.5
    labels[follow] = logits[follow].argmax(1)
    return np.asarray(jax.nn.softmax(jnp.asarray(logits))), labels


@pytest.fixture(scope="module")
def trained_case(tiny_run):
    """Probabilities of the session's tiny trained LeNet-5 on 300 held-out images."""
    from fmnist_jax.run import folder
    from fmnist_jax.steps import predict_logits
    from tests.helpers import make_split

    run_dir, state, _ = tiny_run
    test = make_split(300, seed=1)
    logits = predict_logits(state, jnp.asarray(test.images_NxHxWx1), batch_size=100,
                            norm=folder.load_normalization(run_dir))
    return np.asarray(jax.nn.softmax(logits)), np.asarray(test.labels_N)


CASES = [("random", 0), ("random", 1), ("random-10k", 2), ("trained", None)]
# Each shape compiles every error once: the fast set keeps one, 10,000 random images (a test
# set's size); the 2,000 random ones and the trained model's (a training first) are slow, CI
# runs them.
FAST_CASES = {"random-10k"}


@pytest.fixture(params=[pytest.param(c, id=c[0] + str(c[1]),
                                     marks=() if c[0] in FAST_CASES else pytest.mark.slow)
                        for c in CASES])
def case(request):
    kind, seed = request.param
    if kind == "trained":
        return request.getfixturevalue("trained_case")
    return _random_case(seed, n=10_000 if kind == "random-10k" else 2000)


@pytest.mark.parametrize("metric_fn,ref_fn", [
    (cm.equal_mass_ece, ref_equal_mass_ece), (cm.debiased_l2_ce, ref_debiased_l2),
    (cm.classwise_ece, ref_classwise_ece)], ids=["equal_mass", "debiased_l2", "classwise"])
def test_error_matches_reference(case, metric_fn, ref_fn):
    probs, labels = case
    assert float(jax.jit(metric_fn)(probs, labels)) == pytest.approx(ref_fn(probs, labels),
                                                                     abs=TOL)


def test_ece_sweep_matches_reference(case):
    probs, labels = case
    got, bins = jax.jit(cm.ece_sweep)(probs, labels)
    want, want_bins = ref_ece_sweep(probs, labels)
    assert int(bins) == want_bins
    assert float(got) == pytest.approx(want, abs=TOL)


@pytest.mark.slow
def test_the_equal_mass_errors_of_presorted_examples_skip_the_sort_and_agree():
    """What the report's bootstrap hands them: the examples sorted once, every resample laid
    out in that order (bootstrap_ci(..., ordered=True)), the same errors as unsorted."""
    probs, labels = _random_case(5, n=3000)
    sorted_probs, sorted_labels = cm.sort_by_confidence(jnp.asarray(probs), jnp.asarray(labels))
    for fn in (cm.equal_mass_ece, cm.debiased_l2_ce, lambda p, y, **kw: cm.ece_sweep(p, y, **kw)[0]):
        assert float(fn(sorted_probs, sorted_labels, presorted=True)) == pytest.approx(
            float(fn(probs, labels)), abs=1e-7)
    key = jax.random.PRNGKey(3)
    ordered = cm.bootstrap_ci(functools.partial(cm.equal_mass_ece, presorted=True), key,
                              sorted_probs, sorted_labels, n_resamples=50, ordered=True)
    plain = cm.bootstrap_ci(cm.equal_mass_ece, key, sorted_probs, sorted_labels,
                            n_resamples=50)
    for a, b in zip(ordered, plain):  # the same draws, laid out in order: no sort needed
        assert float(a) == pytest.approx(float(b), abs=1e-6)


def test_smooth_ece_matches_reference(case):
    probs, labels = case
    got, sigma = jax.jit(cm.smooth_ece)(probs, labels)
    want, want_sigma = ref_smooth_ece(probs, labels)
    assert float(sigma) == pytest.approx(want_sigma, abs=1e-9)
    assert float(got) == pytest.approx(want, abs=TOL)


def test_smooth_ece_matches_relplot(case):
    relplot = pytest.importorskip("relplot")
    probs, labels = case
    f, y = _top1(probs, labels)
    want, want_sigma = relplot.smECE(f, y, return_width=True)
    got, sigma = jax.jit(cm.smooth_ece)(probs, labels)
    assert float(sigma) == pytest.approx(want_sigma, abs=1e-9)
    assert float(got) == pytest.approx(want, abs=TOL)


@pytest.mark.slow  # five errors of 10,000 images, each compiled twice: about 12 s
def test_a_calibrated_model_scores_near_zero_and_a_miscalibrated_one_does_not():
    """Labels drawn from the model's own probabilities: every error is small; sharpening the
    same probabilities makes the model overconfident and every error grows."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(10_000, 10)).astype(np.float32) * 2
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    labels = (probs.cumsum(1) > rng.random((10_000, 1))).argmax(1)
    sharp = np.asarray(jax.nn.softmax(jnp.asarray(logits) * 3))
    for fn in (cm.equal_mass_ece, cm.debiased_l2_ce, cm.classwise_ece,
               lambda p, y: cm.ece_sweep(p, y)[0], lambda p, y: cm.smooth_ece(p, y)[0]):
        calibrated, overconfident = float(fn(probs, labels)), float(fn(sharp, labels))
        assert calibrated < 0.02 and overconfident > max(0.05, 5 * calibrated), (
            calibrated, overconfident)


def test_smooth_reliability_matches_relplot(case):
    """The curve of the reliability figure, at the case's own SmoothECE bandwidth, is relplot's
    kernel smoother of hits on confidences."""
    pytest.importorskip("relplot")
    from relplot.estimators import KernelSmoother
    from relplot.kernels import ReflectedGaussianKernel

    probs, labels = case
    f, y = _top1(probs, labels)
    _, sigma = jax.jit(cm.smooth_ece)(probs, labels)
    got = jax.jit(cm.smooth_reliability)(probs, labels, sigma)
    t = np.linspace(0, 1, cm.SMOOTH_CURVE_POINTS).reshape(-1, 1)
    want = KernelSmoother(ReflectedGaussianKernel(float(sigma))).fit(f.reshape(-1, 1), y).predict(t)
    # A float32 ratio of two sums over up to 10,000 images: 2e-6 is its resolution here.
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_a_bootstrap_passes_its_constants_to_every_resample():
    probs, labels = _random_case(4, n=500)
    sigma = jnp.float32(0.05)
    key = jax.random.PRNGKey(0)
    given = cm.bootstrap_ci(cm.smooth_reliability, key, probs, labels, constants=(sigma,),
                            n_resamples=20)
    closed = cm.bootstrap_ci(lambda p, y: cm.smooth_reliability(p, y, sigma), key, probs,
                             labels, n_resamples=20)
    for a, b in zip(given, closed):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)  # sigma folded in
    wider = cm.smooth_reliability(probs, labels, jnp.float32(0.3))
    assert np.max(np.abs(np.asarray(given.point) - np.asarray(wider))) > 1e-3


@pytest.mark.slow
def test_equal_width_bins_of_values_on_and_beside_every_edge_are_searchsorted_bins():
    """The bins of classwise ECE: floor(p * n_bins), corrected, is searchsorted, for every
    float32 on and beside every edge (floor alone misses both ways, e.g. at 4/7 and 3/7)."""
    bin_fn = jax.jit(cm.calibration_errors.equal_width_bin, static_argnames="n_bins")
    for n_bins in range(1, 60):
        edges = cm.bin_edges(n_bins)
        near = np.concatenate([edges, np.nextafter(edges, np.float32(-1)),
                               np.nextafter(edges, np.float32(2))]).astype(np.float32)
        near = near[(near >= 0) & (near <= 1)]
        np.testing.assert_array_equal(np.asarray(bin_fn(near, n_bins=n_bins)),
                                      np.searchsorted(edges, near, side="right") - 1,
                                      err_msg=f"{n_bins} bins")


def _calibrated_and_not(n, seed=0):
    """(probs, labels) of 2n examples stacked as (2, n, C): labels drawn from the model's own
    probabilities (a small SmoothECE bandwidth), then the same probabilities sharpened."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 10)).astype(np.float32) * 2
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    labels = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    return np.stack([probs, np.asarray(jax.nn.softmax(jnp.asarray(logits) * 3))]), np.stack(
        [labels, labels])


def _resamples(probs_2xNxC, labels_2xN, per_set, seed=0):
    """A bootstrap's batch: `per_set` resamples of each of the two sets, as (B, N, C), (B, N)."""
    n = labels_2xN.shape[1]
    idx = np.random.default_rng(seed).integers(0, n, (2, per_set, n))
    return (np.concatenate([probs_2xNxC[s][idx[s]] for s in range(2)]),
            np.concatenate([labels_2xN[s][idx[s]] for s in range(2)]))


def test_smooth_ece_of_a_batch_is_to_the_bit_what_vmap_of_the_plain_cond_gives(monkeypatch):
    """A bootstrap vmaps SmoothECE: its batching rule (each grid only when a member of the
    batch needs it) gives the very bits of vmap's own rule (both grids, selected), written
    out as relplot searches."""
    from fmnist_jax.metrics import calibration_errors as ce

    probs, labels = _resamples(*_calibrated_and_not(10_000), per_set=3)
    got = jax.jit(jax.vmap(cm.smooth_ece))(probs, labels)

    monkeypatch.setattr(ce, "_smooth_at", ce._smooth_at_one)  # vmap's own rule: a select
    want = jax.jit(jax.vmap(cm.smooth_ece))(probs, labels)
    sigma = np.asarray(got[1])
    # A calibrated member tries a bandwidth below 0.01 (the narrow grid), an overconfident one
    # never does: some steps need one grid, some both.
    assert np.min(sigma[:3]) < 0.0156 and np.min(sigma[3:]) > 0.02
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ece_sweep_of_a_batch_is_to_the_bit_the_one_bin_count_at_a_time_sweep():
    """The sweep tests its first bin counts at once, then goes on one at a time: the same
    bins and bits as testing one at a time from the start, for short sweeps and for one that
    runs past the first step to every example its own bin."""
    from fmnist_jax.metrics import calibration_errors as ce

    probs, labels = _resamples(*_calibrated_and_not(1000), per_set=3)
    monotone_labels = np.where(probs.max(2) > np.median(probs.max(2)), probs.argmax(2),
                               (probs.argmax(2) + 1) % 10)  # hits a step in confidence
    probs, labels = np.concatenate([probs, probs[:1]]), np.concatenate([labels,
                                                                        monotone_labels[:1]])

    def one_at_a_time(probs_NxC, labels_N):
        n = labels_N.shape[0]
        confidence_N, hits_N = ce._sorted_top1(probs_NxC, labels_N)
        hits_before_N1 = jnp.concatenate([jnp.zeros(1, jnp.int32),
                                          jnp.cumsum(hits_N.astype(jnp.int32))])
        k_N1 = jnp.arange(n + 1)

        def monotone(b):
            starts_N1 = jnp.minimum(k_N1 * (n // b) + jnp.minimum(k_N1, n % b), n)
            size_N = starts_N1[1:] - starts_N1[:-1]
            hits_per_bin_N = hits_before_N1[starts_N1[1:]] - hits_before_N1[starts_N1[:-1]]
            ok_Nm1 = hits_per_bin_N[1:] * size_N[:-1] >= hits_per_bin_N[:-1] * size_N[1:]
            return jnp.all(ok_Nm1 | (jnp.arange(1, n) >= b))

        b = jax.lax.while_loop(lambda b: (b < n) & monotone(b + 1), lambda b: b + 1, 1)
        _, _, gap_N = ce._equal_mass_sums(confidence_N, hits_N, b, n)
        return jnp.sum(jnp.abs(gap_N)) / n, b

    got = jax.jit(jax.vmap(cm.ece_sweep))(probs, labels)
    want = jax.jit(jax.vmap(one_at_a_time))(probs, labels)
    assert int(got[1][-1]) == 1000 and np.all(np.asarray(got[1][:-1]) < 128)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
