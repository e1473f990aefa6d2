"""fmnist_jax.metrics against sklearn and torchmetrics, on random data and on edge cases."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import metrics
from fmnist_jax.errors import FmnistError

C = 10
TOL = 1e-6
SEEDS = (0, 1, 2)

# The metrics are tested jitted, as they are used, with their static arguments; this also
# keeps the tests fast (one compilation per input shape instead of one per op and shape).
accuracy_jit = jax.jit(metrics.accuracy)
confusion_matrix_jit = jax.jit(metrics.confusion_matrix, static_argnames="num_classes")
support_jit = jax.jit(metrics.support, static_argnames="num_classes")
prf_jit = jax.jit(metrics.precision_recall_f1, static_argnames=("num_classes", "average"))
roc_auc_jit = jax.jit(metrics.roc_auc_ovr, static_argnames="average")
nll_jit = jax.jit(metrics.nll)
brier_jit = jax.jit(metrics.brier_score)
ece_jit = jax.jit(metrics.expected_calibration_error, static_argnames="n_bins")


@functools.partial(jax.jit, static_argnames="n_bins")
def ece_mce_jit(probs_NxC, labels_N, n_bins):
    return {"l1": metrics.expected_calibration_error(probs_NxC, labels_N, n_bins=n_bins),
            "max": metrics.max_calibration_error(probs_NxC, labels_N, n_bins=n_bins)}


reliability_jit = jax.jit(metrics.reliability_diagram, static_argnames="n_bins")


@pytest.fixture
def skm():
    pytest.importorskip("sklearn")
    import sklearn.metrics
    return sklearn.metrics


@pytest.fixture
def tm():
    torch = pytest.importorskip("torch")
    torchmetrics = pytest.importorskip("torchmetrics")
    return torch, torchmetrics.classification


def _softmax64(logits_NxC):
    z = np.asarray(logits_NxC, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def random_case(seed, n=300):
    """Logits with some signal, their float32 softmax, labels and argmax predictions."""
    rng = np.random.default_rng(seed)
    labels_N = rng.integers(0, C, n)
    logits_NxC = (rng.normal(size=(n, C)) + 2.0 * np.eye(C)[labels_N]).astype(np.float32)
    probs_NxC = _softmax64(logits_NxC).astype(np.float32)
    return logits_NxC, probs_NxC, labels_N, probs_NxC.argmax(axis=1)


def edge_cases():
    """(name, preds_N, labels_N): classes never predicted, absent, absent from both, N=1."""
    _, _, labels_N, preds_N = random_case(7, n=120)
    never_predicted = np.where(preds_N == 3, 4, preds_N)
    absent_label = (np.where(labels_N == 3, 5, labels_N), np.where(preds_N == 5, 3, preds_N))
    absent_both = (np.where(labels_N == 3, 5, labels_N), np.where(preds_N == 3, 5, preds_N))
    return [("never_predicted", never_predicted, labels_N),
            ("absent_label", absent_label[1], absent_label[0]),
            ("absent_both", absent_both[1], absent_both[0]),
            ("single_right", np.array([2]), np.array([2])),
            ("single_wrong", np.array([2]), np.array([6]))]


def _case_id(value):
    return value if isinstance(value, str) else None


ALL_CASES = [(f"seed{s}", random_case(s)[3], random_case(s)[2]) for s in SEEDS] + edge_cases()
CASE_IDS = [c[0] for c in ALL_CASES]


def test_accuracy_equals_sklearn_for_logits_and_probs(skm):
    for seed in SEEDS:
        logits_NxC, probs_NxC, labels_N, preds_N = random_case(seed)
        expected = skm.accuracy_score(labels_N, preds_N)
        assert abs(float(accuracy_jit(logits_NxC, labels_N)) - expected) < TOL
        assert abs(float(accuracy_jit(probs_NxC, labels_N)) - expected) < TOL
    assert abs(float(metrics.accuracy(logits_NxC, labels_N)) - expected) < TOL  # eager too


@pytest.mark.parametrize("name,preds_N,labels_N", ALL_CASES, ids=CASE_IDS)
def test_confusion_matrix_and_support_equal_sklearn(skm, name, preds_N, labels_N):
    cm = confusion_matrix_jit(jnp.asarray(preds_N), jnp.asarray(labels_N), num_classes=C)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(labels_N, preds_N, labels=range(C)))
    np.testing.assert_array_equal(support_jit(jnp.asarray(labels_N), num_classes=C),
                                  np.bincount(labels_N, minlength=C))


@pytest.mark.parametrize("name,preds_N,labels_N", ALL_CASES, ids=CASE_IDS)
def test_precision_recall_f1_equal_sklearn_and_torchmetrics(skm, tm, name, preds_N, labels_N):
    torch, tmc = tm
    preds_t, labels_t = torch.as_tensor(preds_N), torch.as_tensor(labels_N)
    for average in (None, "macro", "weighted"):
        got = prf_jit(jnp.asarray(preds_N), jnp.asarray(labels_N), num_classes=C,
                      average=average)
        # sklearn's default labels (the classes seen) is the torchmetrics convention
        sk_labels = range(C) if average is None else None
        sk = skm.precision_recall_fscore_support(labels_N, preds_N, labels=sk_labels,
                                                 average=average, zero_division=0)[:3]
        tm_vals = [cls(num_classes=C, average=average)(preds_t, labels_t).numpy()
                   for cls in (tmc.MulticlassPrecision, tmc.MulticlassRecall,
                               tmc.MulticlassF1Score)]
        for ours, ref_sk, ref_tm in zip(got, sk, tm_vals):
            np.testing.assert_allclose(ours, ref_sk, rtol=0, atol=TOL, err_msg=str(average))
            np.testing.assert_allclose(ours, ref_tm, rtol=0, atol=TOL, err_msg=str(average))


@pytest.mark.parametrize("name,preds_N,labels_N", ALL_CASES, ids=CASE_IDS)
def test_macro_versus_sklearn_with_all_labels(skm, name, preds_N, labels_N):
    """sklearn with labels=range(C) agrees unless a class is absent from labels and preds."""
    got = prf_jit(jnp.asarray(preds_N), jnp.asarray(labels_N), num_classes=C, average="macro")
    sk = skm.precision_recall_fscore_support(labels_N, preds_N, labels=range(C),
                                             average="macro", zero_division=0)[:3]
    unseen = len(set(range(C)) - set(preds_N) - set(labels_N))
    for ours, ref in zip(got, sk):
        if unseen == 0:
            assert abs(float(ours) - ref) < TOL
        else:  # sklearn averages in a 0 for each unseen class
            seen = C - unseen
            assert abs(float(ours) * seen / C - ref) < TOL


def test_precision_recall_f1_rejects_unknown_average():
    with pytest.raises(FmnistError, match="average"):
        metrics.precision_recall_f1(jnp.zeros(3, int), jnp.zeros(3, int), C, "micro")


def _auc_cases():
    """(name, scores, labels): random probs; heavily tied probs (multiples of 1/4 summing
    to 1); a class absent from the labels; a single sample."""
    cases = []
    for seed in SEEDS:
        _, probs_NxC, labels_N, _ = random_case(seed)
        cases.append((f"seed{seed}", probs_NxC, labels_N))
        rng = np.random.default_rng(seed)
        tied_NxC = (rng.multinomial(4, np.full(C, 1 / C), size=300) / 4).astype(np.float32)
        cases.append((f"ties{seed}", tied_NxC, rng.integers(0, C, 300)))
    _, probs_NxC, labels_N, _ = random_case(5)
    cases.append(("absent", probs_NxC, np.where(labels_N == 3, 4, labels_N)))
    cases.append(("single", probs_NxC[:1], labels_N[:1]))
    return cases


@pytest.mark.parametrize("name,scores_NxC,labels_N", _auc_cases(), ids=_case_id)
def test_roc_auc_ovr_equals_sklearn(skm, name, scores_NxC, labels_N):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about an absent class, then gives NaN
        for average in (None, "macro"):
            ref = skm.roc_auc_score(labels_N, scores_NxC.astype(np.float64), multi_class="ovr",
                                    average=average, labels=range(C))
            got = roc_auc_jit(jnp.asarray(scores_NxC), jnp.asarray(labels_N), average=average)
            np.testing.assert_allclose(got, ref, rtol=0, atol=TOL, err_msg=str(average))
    per_class = np.asarray(roc_auc_jit(jnp.asarray(scores_NxC), jnp.asarray(labels_N)))
    assert np.array_equal(np.isnan(per_class), ~np.isin(np.arange(C), labels_N)) or (
        name == "single" and np.isnan(per_class).all())


def test_roc_auc_is_exact_for_perfect_reversed_and_constant_scores():
    labels_N = jnp.asarray(np.arange(300) % C)
    onehot_NxC = jax.nn.one_hot(labels_N, C)
    np.testing.assert_array_equal(roc_auc_jit(onehot_NxC, labels_N), np.ones(C))
    np.testing.assert_array_equal(roc_auc_jit(-onehot_NxC, labels_N), np.zeros(C))
    np.testing.assert_array_equal(roc_auc_jit(jnp.zeros((300, C)), labels_N), np.full(C, 0.5))


def test_roc_auc_refuses_more_examples_than_its_exact_sums_hold():
    with pytest.raises(FmnistError, match="at most"):
        jax.eval_shape(metrics.roc_auc_ovr, jax.ShapeDtypeStruct((100_000, C), jnp.float32),
                       jax.ShapeDtypeStruct((100_000,), jnp.int32))


def test_nll_equals_sklearn_log_loss(skm):
    for seed in SEEDS:
        logits_NxC, _, labels_N, _ = random_case(seed)
        ref = skm.log_loss(labels_N, _softmax64(logits_NxC), labels=range(C))
        got = float(nll_jit(jnp.asarray(logits_NxC), jnp.asarray(labels_N)))
        assert abs(got - ref) < TOL * max(1.0, ref)
    logits_NxC, _, labels_N, _ = random_case(0)
    got = float(nll_jit(jnp.asarray(logits_NxC[:1]), jnp.asarray(labels_N[:1])))
    assert abs(got - skm.log_loss(labels_N[:1], _softmax64(logits_NxC[:1]), labels=range(C))) < TOL


def test_brier_score_is_sum_over_classes_mean_over_examples(skm):
    for seed in SEEDS:
        _, probs_NxC, labels_N, _ = random_case(seed)
        ref = np.mean(np.sum((probs_NxC.astype(np.float64) - np.eye(C)[labels_N]) ** 2, axis=1))
        got = float(brier_jit(jnp.asarray(probs_NxC), jnp.asarray(labels_N)))
        assert abs(got - ref) < TOL
        try:  # sklearn >= 1.7 scores multiclass with the same convention
            with warnings.catch_warnings():  # float32 rows sum to 1 only within 1e-7
                warnings.simplefilter("ignore")
                sk = skm.brier_score_loss(labels_N, probs_NxC.astype(np.float64),
                                          labels=range(C))
        except (TypeError, ValueError):
            continue
        assert abs(got - sk) < TOL


def test_bin_edges_equal_torch_linspace(tm):
    torch, _ = tm
    for n_bins in range(1, 200):
        np.testing.assert_array_equal(metrics.bin_edges(n_bins),
                                      torch.linspace(0, 1, n_bins + 1).numpy(), str(n_bins))


def _edge_probs(seed, n=300):
    """Rows whose top-1 confidence is exactly a torch bin edge (15 bins), the float32 nearest
    k/15 (one ulp off some torch edges), one ulp below an edge, or exactly 1.0; then random
    confidences up to n rows."""
    edges = metrics.bin_edges(15)[2:]  # >= 2/15 > 1/C, so the chosen column stays the argmax
    nearest = (np.arange(2, 16) / 15).astype(np.float32)
    below = np.nextafter(edges, np.float32(0))
    rng = np.random.default_rng(seed)
    conf_N = np.concatenate([edges, nearest, below, np.ones(3, np.float32)])
    conf_N = np.concatenate([conf_N, rng.uniform(0.15, 1, n - len(conf_N)).astype(np.float32)])
    top_N = rng.integers(0, C, conf_N.shape[0])
    probs_NxC = np.repeat(((1 - conf_N) / (C - 1))[:, None], C, axis=1).astype(np.float32)
    probs_NxC[np.arange(conf_N.shape[0]), top_N] = conf_N
    labels_N = np.where(rng.random(conf_N.shape[0]) < 0.7, top_N, (top_N + 1) % C)
    return probs_NxC, labels_N


def _ce_cases():
    cases = [(f"seed{s}", *random_case(s)[1:3]) for s in SEEDS]
    cases += [(f"edges{s}", *_edge_probs(s)) for s in SEEDS]
    _, probs_NxC, labels_N, _ = random_case(3)
    return cases + [("single", probs_NxC[:1], labels_N[:1]),
                    ("one_hot", np.eye(C, dtype=np.float32)[labels_N], labels_N)]


@pytest.mark.parametrize("n_bins", (15, 7))
@pytest.mark.parametrize("name,probs_NxC,labels_N", _ce_cases(),
                         ids=_case_id)
def test_calibration_errors_equal_torchmetrics(tm, name, probs_NxC, labels_N, n_bins):
    torch, tmc = tm
    probs_t, labels_t = torch.as_tensor(probs_NxC), torch.as_tensor(labels_N)
    got = ece_mce_jit(jnp.asarray(probs_NxC), jnp.asarray(labels_N), n_bins=n_bins)
    for norm in ("l1", "max"):
        ref = tmc.MulticlassCalibrationError(num_classes=C, n_bins=n_bins, norm=norm)(
            probs_t, labels_t).item()
        assert abs(float(got[norm]) - ref) < TOL, (norm, float(got[norm]), ref)


@pytest.mark.parametrize("seed", SEEDS)
def test_reliability_bins_follow_torch_bucketize(tm, seed):
    torch, _ = tm
    probs_NxC, labels_N = _edge_probs(seed)
    rel = reliability_jit(jnp.asarray(probs_NxC), jnp.asarray(labels_N), n_bins=15)
    conf_N = probs_NxC.max(axis=1)
    bin_N = (torch.bucketize(torch.as_tensor(conf_N), torch.linspace(0, 1, 16), right=True)
             - 1).numpy()
    np.testing.assert_array_equal(rel.count, np.bincount(bin_N, minlength=16))
    hits_N = probs_NxC.argmax(axis=1) == labels_N
    for b in range(16):
        in_b = bin_N == b
        want_conf = conf_N[in_b].astype(np.float64).mean() if in_b.any() else 0.0
        want_acc = hits_N[in_b].mean() if in_b.any() else 0.0
        assert abs(float(rel.confidence[b]) - want_conf) < TOL
        assert abs(float(rel.accuracy[b]) - want_acc) < TOL
    assert int(rel.count[15]) == np.sum(conf_N == 1.0) > 0  # 1.0 has its own last bin
    ece = np.sum(np.asarray(rel.count) * np.abs(rel.accuracy - rel.confidence)) / len(labels_N)
    assert abs(ece - float(ece_jit(jnp.asarray(probs_NxC), jnp.asarray(labels_N)))) < TOL


def _recall_per_class(preds_N, labels_N):
    return metrics.precision_recall_f1(preds_N, labels_N, C).recall


@pytest.fixture(scope="module")
def big_case():
    """10,000 examples: the size the speed promise is about. Tests share its compilations."""
    logits_NxC, _, labels_N, preds_N = map(jnp.asarray, random_case(1, n=10000))
    return logits_NxC, labels_N, preds_N


@pytest.mark.slow
def test_bootstrap_ci_is_deterministic_and_brackets_the_estimate(big_case):
    logits_NxC, labels_N, preds_N = big_case
    key = jax.random.key(0)
    ci = metrics.bootstrap_ci(metrics.accuracy, key, logits_NxC, labels_N)
    again = metrics.bootstrap_ci(metrics.accuracy, key, logits_NxC, labels_N)
    assert tuple(map(float, ci)) == tuple(map(float, again))
    other = metrics.bootstrap_ci(metrics.accuracy, jax.random.key(1), logits_NxC, labels_N)
    assert (float(other.low), float(other.high)) != (float(ci.low), float(ci.high))
    assert abs(float(ci.point) - float(metrics.accuracy(logits_NxC, labels_N))) < TOL
    assert float(ci.low) < float(ci.point) < float(ci.high)


def test_bootstrap_ci_of_per_class_values(big_case):
    _, labels_N, preds_N = big_case
    per_class = metrics.bootstrap_ci(_recall_per_class, jax.random.key(0), preds_N, labels_N,
                                     n_resamples=200)
    assert per_class.low.shape == per_class.high.shape == (C,)
    assert bool(jnp.all(per_class.low <= per_class.point))
    assert bool(jnp.all(per_class.point <= per_class.high))


@pytest.mark.slow
def test_bootstrap_ci_narrows_with_more_data_and_ignores_batching(big_case):
    logits_NxC, labels_N, _ = big_case
    key = jax.random.key(2)
    # 400 and 4,000 examples: ten times the data, as 1,000 and 10,000 would be, at less than
    # half their resampling time (1,000 resamples of every example's logits).
    small = metrics.bootstrap_ci(metrics.accuracy, key, logits_NxC[:400], labels_N[:400])
    large = metrics.bootstrap_ci(metrics.accuracy, key, logits_NxC[:4000], labels_N[:4000])
    width_small, width_large = (float(ci.high - ci.low) for ci in (small, large))
    assert width_large < 0.5 * width_small  # about 1 / sqrt(10)
    for ci, n in ((small, 400), (large, 4000)):  # a proportion's: +-1.96 sqrt(p(1-p)/N)
        p = float(ci.point)
        assert abs(float(ci.high - ci.low) / (2 * 1.96 * np.sqrt(p * (1 - p) / n)) - 1) < 0.2
    rebatched = metrics.bootstrap_ci(metrics.accuracy, key, logits_NxC[:400], labels_N[:400],
                                     batch_size=40)  # the draws depend on the key only
    assert tuple(map(float, rebatched)) == tuple(map(float, small))


def _top1_ece(probs_NxC, labels_N):
    return metrics.expected_calibration_error(probs_NxC, labels_N)


def test_basic_bootstrap_ci_reflects_the_percentiles_about_the_estimate():
    """A calibrated model's 15-bin ECE is biased upwards: its percentile interval leans above
    the estimate (centred above it); the basic interval (2 point - q) is centred below it."""
    rng = np.random.default_rng(4)
    probs_NxC = jax.nn.softmax(jnp.asarray(rng.normal(size=(2000, C)) * 2, jnp.float32))
    labels_N = jnp.asarray((np.asarray(probs_NxC).cumsum(1) > rng.random((2000, 1))).argmax(1))
    key = jax.random.key(0)
    pct = metrics.bootstrap_ci(_top1_ece, key, probs_NxC, labels_N, n_resamples=200)
    basic = metrics.bootstrap_ci(_top1_ece, key, probs_NxC, labels_N, n_resamples=200,
                                 method="basic")
    point = float(pct.point)
    assert float(basic.point) == point < (float(pct.low) + float(pct.high)) / 2
    assert float(basic.low) == pytest.approx(2 * float(pct.point) - float(pct.high), abs=1e-7)
    assert float(basic.high) == pytest.approx(2 * float(pct.point) - float(pct.low), abs=1e-7)
    assert (float(basic.low) + float(basic.high)) / 2 < point
    with pytest.raises(FmnistError, match="bootstrap method"):
        metrics.bootstrap_ci(_top1_ece, key, probs_NxC, labels_N, method="bca")


def _number_or_word(word):
    try:
        return float(word)
    except ValueError:
        return word


@pytest.mark.parametrize("name,preds_N,labels_N", ALL_CASES, ids=CASE_IDS)
def test_classification_report_equals_sklearn(skm, name, preds_N, labels_N):
    names = [f"class {c}" for c in range(C - 1)] + ["Ankle boot"]
    ref_text = skm.classification_report(labels_N, preds_N, labels=range(C), target_names=names,
                                         zero_division=0)
    ref_dict = skm.classification_report(labels_N, preds_N, labels=range(C), target_names=names,
                                         zero_division=0, output_dict=True)
    text = metrics.classification_report_text(preds_N, labels_N, names)
    got = metrics.classification_report_dict(preds_N, labels_N, names)
    # every word and number, in order (sklearn prints supports as floats, "1.0", when no
    # prediction is right); the layout too where sklearn's supports are ints
    assert [_number_or_word(w) for w in text.split()] == [
        _number_or_word(w) for w in ref_text.split()]
    if ".0\n" not in ref_text:
        assert text == ref_text
    assert got.keys() == ref_dict.keys()
    for row, ref_row in ref_dict.items():
        if row == "accuracy":
            assert abs(got[row] - ref_row) < TOL
            continue
        for k, v in ref_row.items():
            assert abs(got[row][k] - v) < TOL, (row, k)


def test_classification_report_rejects_out_of_range_labels():
    with pytest.raises(FmnistError, match="class names"):
        metrics.classification_report_dict(np.array([0, 1]), np.array([0, 2]), ["a", "b"])
