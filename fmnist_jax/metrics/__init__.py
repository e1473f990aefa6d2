"""Evaluation metrics as pure, jittable JAX functions of probabilities or logits and int labels.

Each metric equals a named reference (sklearn or torchmetrics) so numbers in reports can be
checked against tools everyone knows; the tests compare them within 1e-6. Conventions:

- Precision, recall, F1 use zero_division=0: a 0/0 ratio is 0.
- `average="macro"` averages only over classes that occur in the labels or the predictions,
  as torchmetrics' MulticlassPrecision/Recall/F1Score and sklearn's
  `precision_recall_fscore_support(..., labels=None)` (the classes seen). sklearn with
  `labels=range(C)` also averages in a class absent from both as 0, and gives a lower macro
  value; the two differ only then. `classification_report_*` follows sklearn's report with
  labels=range(C) instead: its "macro avg" row is the plain mean of all the class rows.
- ECE/MCE bin the top-1 confidence exactly as torchmetrics' MulticlassCalibrationError
  (edges, edge rule and the extra bin for confidence 1.0: see `reliability_diagram`).
- AUC-ROC is one-vs-rest on the scores, ties counted half, as sklearn's `roc_auc_score`.
- The calibration errors of later work (equal-mass ECE, ECE_sweep, a debiased l2 error,
  classwise ECE, SmoothECE) live in `calibration_errors` and are re-exported here.

Functions taking `num_classes`/`average`/`n_bins` need them static under `jax.jit`. Host-side
helpers (`classification_report_*`) return Python values. Internals trust their inputs
(labels in [0, C), probabilities in [0, 1]); the public boundary checks only what is cheap.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmnist_jax.errors import FmnistError
from fmnist_jax.metrics.calibration_errors import (  # noqa: F401 (re-exported)
    SMOOTH_CURVE_POINTS, bin_edges, classwise_ece, debiased_l2_ce, ece_sweep, equal_mass_ece,
    smooth_ece, smooth_reliability, sort_by_confidence)
from fmnist_jax.models import NUM_CLASSES

AVERAGES = (None, "macro", "weighted")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (zero_division=0), without NaNs in between."""
    num, den = jnp.asarray(num, jnp.float32), jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def accuracy(probs_or_logits_NxC: jax.Array, labels_N: jax.Array) -> jax.Array:
    """Top-1 accuracy. Softmax keeps the argmax, so probabilities and logits give the same."""
    return jnp.mean(jnp.argmax(probs_or_logits_NxC, axis=-1) == labels_N, dtype=jnp.float32)


def confusion_matrix(preds_N: jax.Array, labels_N: jax.Array,
                     num_classes: int = NUM_CLASSES) -> jax.Array:
    """(C, C) int32 counts; row = true label, column = prediction (as sklearn's)."""
    return jnp.zeros((num_classes, num_classes), jnp.int32).at[labels_N, preds_N].add(1)


def support(labels_N: jax.Array, num_classes: int = NUM_CLASSES) -> jax.Array:
    """(C,) int32: how many examples carry each true label."""
    return jnp.bincount(labels_N, length=num_classes).astype(jnp.int32)


class PRF(NamedTuple):
    """Precision, recall, F1: each (C,) for average=None, else a scalar."""

    precision: jax.Array
    recall: jax.Array
    f1: jax.Array


def precision_recall_f1(preds_N: jax.Array, labels_N: jax.Array,
                        num_classes: int = NUM_CLASSES, average: str | None = None) -> PRF:
    """Precision, recall and F1 with zero_division=0, per class or averaged.

    average=None: per class, equal to sklearn's precision_recall_fscore_support(labels=range(C),
    zero_division=0) and torchmetrics' Multiclass*(average=None).
    "weighted": weighted by support, equal to both.
    "macro": the plain mean over the classes that occur in the labels or in the predictions
    (tp + fp + fn > 0), as torchmetrics and sklearn's default labels=None. It differs from
    sklearn with labels=range(C) only when a class is absent from both: sklearn then averages
    in its 0 as well. F1 is the per-class F1 averaged (not the F1 of the averaged P and R).
    """
    if average not in AVERAGES:
        raise FmnistError(f"average must be one of {AVERAGES}, got {average!r}")
    cm_CxC = confusion_matrix(preds_N, labels_N, num_classes)
    tp_C = jnp.diagonal(cm_CxC)
    predicted_C, actual_C = cm_CxC.sum(axis=0), cm_CxC.sum(axis=1)
    per_class = PRF(precision=_safe_div(tp_C, predicted_C), recall=_safe_div(tp_C, actual_C),
                    f1=_safe_div(2 * tp_C, predicted_C + actual_C))  # 2tp / (2tp + fp + fn)
    if average is None:
        return per_class
    weights_C = actual_C if average == "weighted" else (predicted_C + actual_C > 0)
    weights_C = weights_C.astype(jnp.float32)
    return PRF(*(_safe_div(jnp.sum(weights_C * v_C), jnp.sum(weights_C)) for v_C in per_class))


_MAX_AUC_N = 92681  # 2 * n_pos * n_neg <= N**2 / 2 must fit in uint32


def _binary_auc(scores_N: jax.Array, positive_N: jax.Array) -> jax.Array:
    """AUC as the Mann-Whitney U / (n_pos * n_neg), a tie between classes counting 1/2.

    In score order, a positive's share of U is the negatives before its tie group plus half
    the negatives inside it, so twice it is (negatives before the group's first index) +
    (negatives up to its last index). Sums are exact integers; the only rounding is the
    final division. NaN when a class has no positives or no negatives.
    """
    n = scores_N.shape[0]
    order_N = jnp.argsort(scores_N)
    sorted_N, positive_N = scores_N[order_N], positive_N[order_N]
    negatives_before_N1 = jnp.concatenate(
        [jnp.zeros(1, jnp.int32), jnp.cumsum(~positive_N, dtype=jnp.int32)])
    i_N = jnp.arange(n)
    differs_Nm1 = sorted_N[1:] != sorted_N[:-1]
    first_N = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones(1, bool), differs_Nm1]),
                                       i_N, 0))  # index where each tie group starts
    last_N = jax.lax.cummin(jnp.where(jnp.concatenate([differs_Nm1, jnp.ones(1, bool)]),
                                      i_N, n - 1), reverse=True)  # ... and ends
    twice_u_N = negatives_before_N1[first_N] + negatives_before_N1[last_N + 1]
    twice_u = jnp.sum(jnp.where(positive_N, twice_u_N, 0).astype(jnp.uint32))
    n_pos = jnp.sum(positive_N, dtype=jnp.int32)
    return twice_u.astype(jnp.float32) / (2.0 * n_pos.astype(jnp.float32) * (n - n_pos))


def roc_auc_ovr(scores_NxC: jax.Array, labels_N: jax.Array,
                average: str | None = None) -> jax.Array:
    """One-vs-rest AUC-ROC of each column of scores against "label == that class".

    average=None: (C,), equal to sklearn's roc_auc_score(labels, probs, multi_class="ovr",
    average=None, labels=range(C)); "macro": their plain mean. A class absent from the labels
    has no AUC: it is NaN, and so is the macro mean (sklearn gives NaN too, with a warning;
    without labels=range(C) sklearn refuses such data). Any scores work (only their order
    matters); sklearn requires probabilities. N must be at most 92,681 (exact uint32 sums).
    """
    if average not in (None, "macro"):
        raise FmnistError(f"average must be None or 'macro', got {average!r}")
    if labels_N.shape[0] > _MAX_AUC_N:
        raise FmnistError(f"roc_auc_ovr takes at most {_MAX_AUC_N} examples, "
                          f"got {labels_N.shape[0]}; evaluate on a subset or in parts")
    positive_NxC = jax.nn.one_hot(labels_N, scores_NxC.shape[1], dtype=jnp.bool_)
    auc_C = jax.vmap(_binary_auc, in_axes=(1, 1))(scores_NxC, positive_NxC)
    return auc_C if average is None else jnp.mean(auc_C)


def nll(logits_NxC: jax.Array, labels_N: jax.Array) -> jax.Array:
    """Mean cross-entropy of softmax(logits), in nats: sklearn's log_loss of the softmax
    probabilities (computed from logits, so a confident mistake is not clipped at 1e-7)."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_NxC, labels_N))


def brier_score(probs_NxC: jax.Array, labels_N: jax.Array) -> jax.Array:
    """Multiclass Brier score, Brier's (1950) original: mean over examples of the sum over
    classes of (p - onehot)^2, in [0, 2]. Equal to sklearn >= 1.7's multiclass
    brier_score_loss; some texts divide by C or score only the true class instead."""
    onehot_NxC = jax.nn.one_hot(labels_N, probs_NxC.shape[1], dtype=probs_NxC.dtype)
    return jnp.mean(jnp.sum((probs_NxC - onehot_NxC) ** 2, axis=1))


class Reliability(NamedTuple):
    """Per-bin statistics, n_bins + 1 bins: bin b holds lower_B[b] <= confidence < lower_B[b+1];
    the last bin holds only confidence 1.0 (torchmetrics' rule). Empty bins are all 0."""

    confidence: jax.Array  # (n_bins + 1,) mean top-1 confidence
    accuracy: jax.Array  # (n_bins + 1,) fraction correct
    count: jax.Array  # (n_bins + 1,) int32 examples
    lower: jax.Array  # (n_bins + 1,) each bin's lower edge; the last is 1.0


def reliability_diagram(probs_NxC: jax.Array, labels_N: jax.Array,
                        n_bins: int = 15) -> Reliability:
    """Top-1 confidence vs accuracy per equal-width bin, binned as torchmetrics'
    MulticlassCalibrationError: `torch.bucketize(conf, edges, right=True) - 1`, i.e. a
    confidence exactly on an edge goes to the bin above it and 1.0 into an extra last bin.
    Plot `accuracy` against `confidence` where `count > 0`. ECE = sum(count * |acc - conf|) / N.
    """
    lower_B = jnp.asarray(bin_edges(n_bins))
    confidence_N = jnp.max(probs_NxC, axis=-1).astype(jnp.float32)  # torchmetrics' .float()
    hits_N = (jnp.argmax(probs_NxC, axis=-1) == labels_N).astype(confidence_N.dtype)
    bin_N = jnp.searchsorted(lower_B, confidence_N, side="right") - 1

    def per_bin(values_N):
        return jnp.zeros(n_bins + 1, values_N.dtype).at[bin_N].add(values_N)

    count_B = per_bin(jnp.ones_like(labels_N, jnp.int32))
    return Reliability(confidence=_safe_div(per_bin(confidence_N), count_B),
                       accuracy=_safe_div(per_bin(hits_N), count_B), count=count_B,
                       lower=lower_B)


def expected_calibration_error(probs_NxC: jax.Array, labels_N: jax.Array, *,
                               n_bins: int = 15) -> jax.Array:
    """ECE: the count-weighted mean |accuracy - confidence| over the bins of
    `reliability_diagram`; torchmetrics' MulticlassCalibrationError(norm="l1").
    Takes probabilities (torchmetrics silently softmaxes anything outside [0, 1])."""
    rel = reliability_diagram(probs_NxC, labels_N, n_bins)
    return jnp.sum(rel.count * jnp.abs(rel.accuracy - rel.confidence)) / labels_N.shape[0]


def max_calibration_error(probs_NxC: jax.Array, labels_N: jax.Array, *,
                          n_bins: int = 15) -> jax.Array:
    """MCE: the largest |accuracy - confidence| over the non-empty bins of
    `reliability_diagram`; torchmetrics' MulticlassCalibrationError(norm="max")."""
    rel = reliability_diagram(probs_NxC, labels_N, n_bins)
    return jnp.max(jnp.abs(rel.accuracy - rel.confidence))  # empty bins contribute 0


class Interval(NamedTuple):
    """A point estimate and its bootstrap interval (same pytree shape each)."""

    point: Any
    low: Any
    high: Any


BOOTSTRAP_METHODS = ("percentile", "basic")


@functools.partial(jax.jit, static_argnames=("metric_fn", "n_resamples", "level", "batch_size",
                                             "method", "ordered"))
def bootstrap_ci(metric_fn: Callable[..., Any], key: jax.Array, *arrays: jax.Array,
                 n_resamples: int = 1000, level: float = 0.95,
                 batch_size: int = 50, method: str = "percentile",
                 constants: tuple = (), ordered: bool = False) -> Interval:
    """Bootstrap interval of `metric_fn(*arrays, *constants)`, resampling the examples (axis
    0) of `arrays`; `constants` (e.g. a bandwidth) are passed to every resample unchanged.
    ordered=True hands each resample's examples to `metric_fn` in ascending index order (the
    same draws, counted and laid out again in O(N)), so arrays sorted along axis 0 stay
    sorted and a metric that sorts by a key (equal-mass bins) can skip its sort.

    Resample r draws N indices with replacement using `split(key, n_resamples)[r]`: the
    result depends on `key` and `n_resamples` only. `batch_size` resamples at a time are
    vmapped (`lax.map`), which bounds memory (a (50, N, C) gather) and is no slower on CPU
    than vmapping all of them. q_lo, q_hi are numpy's linear-interpolation percentiles of
    the resampled values at (1 - level) / 2 and (1 + level) / 2, and the interval is
    method="percentile": [q_lo, q_hi]; method="basic" (the pivotal interval, Davison &
    Hinkley 1997, ch. 5): [2 point - q_hi, 2 point - q_lo], which moves the interval
    against the estimator's bias as the resamples show it (their shift from the point
    estimate stands in for the point estimate's shift from the truth): use it for a biased
    estimator such as a binned ECE, whose resamples all sit above it.
    `metric_fn` is static: pass the same function object to reuse the compiled code (a new
    lambda recompiles). A metric that is NaN on some resample makes its bounds NaN.

    Cost: an accuracy is cheap to resample; sort-based metrics are much dearer:
    `roc_auc_ovr` sorts every class of every resample, which is why the report gives AUC
    without an interval.
    """
    if method not in BOOTSTRAP_METHODS:
        raise FmnistError(f"bootstrap method must be one of {BOOTSTRAP_METHODS}, "
                          f"got {method!r}")
    n = arrays[0].shape[0]

    def one_fn(resample_key):
        idx_N = jax.random.randint(resample_key, (n,), 0, n)
        if ordered:
            counts_N = jnp.zeros(n, jnp.int32).at[idx_N].add(1)
            idx_N = jnp.repeat(jnp.arange(n), counts_N, total_repeat_length=n)
        return metric_fn(*(a[idx_N] for a in arrays), *constants)

    stats = jax.lax.map(one_fn, jax.random.split(key, n_resamples), batch_size=batch_size)
    q = 50.0 * jnp.array([1.0 - level, 1.0 + level])
    bounds = jax.tree_util.tree_map(lambda s: jnp.percentile(s, q, axis=0), stats)
    point = metric_fn(*arrays, *constants)
    if method == "basic":
        return Interval(point=point,
                        low=jax.tree_util.tree_map(lambda p, b: 2 * p - b[1], point, bounds),
                        high=jax.tree_util.tree_map(lambda p, b: 2 * p - b[0], point, bounds))
    return Interval(point=point, low=jax.tree_util.tree_map(lambda b: b[0], bounds),
                    high=jax.tree_util.tree_map(lambda b: b[1], bounds))


def classification_report_dict(preds_N: Any, labels_N: Any,
                               class_names: Sequence[str]) -> dict[str, Any]:
    """sklearn's classification_report(labels=range(C), target_names=class_names,
    zero_division=0, output_dict=True): {name: {"precision", "recall", "f1-score",
    "support"}, "accuracy": float, "macro avg": {...}, "weighted avg": {...}}.

    Host-side, in float64 from the exact confusion matrix. "macro avg" is the plain mean of
    the class rows shown, absent classes included (unlike `precision_recall_f1` "macro").
    """
    num_classes = len(class_names)
    preds_N, labels_N = np.asarray(preds_N), np.asarray(labels_N)
    if preds_N.shape != labels_N.shape or labels_N.size == 0 or not (
            0 <= min(preds_N.min(), labels_N.min()) <= max(preds_N.max(), labels_N.max())
            < num_classes):
        raise FmnistError(f"need equally many predictions and labels, all in "
                          f"0..{num_classes - 1} for {num_classes} class names")
    cm_CxC = np.asarray(confusion_matrix(preds_N, labels_N, num_classes), np.float64)
    tp_C, predicted_C, actual_C = np.diagonal(cm_CxC), cm_CxC.sum(0), cm_CxC.sum(1)

    def ratio(num_C, den_C):
        return np.divide(num_C, den_C, out=np.zeros_like(num_C), where=den_C > 0)

    columns = {"precision": ratio(tp_C, predicted_C), "recall": ratio(tp_C, actual_C),
               "f1-score": ratio(2 * tp_C, predicted_C + actual_C)}
    total = int(actual_C.sum())
    report: dict[str, Any] = {
        name: {**{k: float(v_C[c]) for k, v_C in columns.items()}, "support": int(actual_C[c])}
        for c, name in enumerate(class_names)}
    report["accuracy"] = float(tp_C.sum() / total)
    for row, weights_C in (("macro avg", None), ("weighted avg", actual_C)):
        report[row] = {k: float(np.average(v_C, weights=weights_C)) for k, v_C in columns.items()}
        report[row]["support"] = total
    return report


def classification_report_text(preds_N: Any, labels_N: Any, class_names: Sequence[str],
                               digits: int = 2) -> str:
    """`classification_report_dict` laid out as sklearn's text classification_report."""
    report = classification_report_dict(preds_N, labels_N, class_names)
    width = max(len("weighted avg"), *(len(name) for name in class_names))

    def line(name, cells):
        return f"{name:>{width}} " + "".join(f" {cell:>9}" for cell in cells) + "\n"

    def numbers(row):
        return [f"{row[k]:.{digits}f}" for k in ("precision", "recall", "f1-score")] + [
            str(row["support"])]

    text = line("", ["precision", "recall", "f1-score", "support"]) + "\n"
    text += "".join(line(name, numbers(report[name])) for name in class_names) + "\n"
    total = report["macro avg"]["support"]
    text += line("accuracy", ["", "", f"{report['accuracy']:.{digits}f}", str(total)])
    return text + line("macro avg", numbers(report["macro avg"])) + line(
        "weighted avg", numbers(report["weighted avg"]))


def mean_and_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample std (ddof=1) and the Student-t `confidence` interval of the mean of
    independent measurements (for example one test accuracy per seed): mean +- t * std /
    sqrt(n), with t the (1 + confidence) / 2 quantile of Student's t with n - 1 degrees of
    freedom. Host-side; needs n >= 2."""
    from scipy import stats  # scipy ships with jax; imported only here

    values_N = np.asarray(values, np.float64)
    n = len(values_N)
    if n < 2:
        raise ValueError(f"an interval needs at least 2 values, got {n}")
    mean, std = float(values_N.mean()), float(values_N.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "confidence": confidence,
            "interval": [mean - half, mean + half]}
