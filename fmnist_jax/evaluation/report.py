"""Evaluate a run folder: metrics with confidence intervals, calibration maps, PNGs.

`evaluate_run(run_dir, ...)` computes the logits once per split, fits every calibration map
(temperature, vector, Dirichlet) on the run's validation split (never the test set), and writes
into the run folder (through `run.results`) the report as text (sklearn-style classification
report and the summary) and as JSON, the chosen map (calibration.json), and three plots:
confusion matrix, reliability diagram (before and after temperature scaling), training curves.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax import data, metrics, streams
from fmnist_jax.evaluation import plots
from fmnist_jax.run import checkpoints, folder, results
from fmnist_jax.run.history import load_history
from fmnist_jax.evaluation.calibration import (CV_FOLDS, apply_calibration,
                                               fit_and_score, identity_map)
from fmnist_jax.run.results import CALIBRATION_KINDS
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.steps import inference_state, predict_logits


def _macro_f1(probs_NxC, labels_N):
    return metrics.precision_recall_f1(jnp.argmax(probs_NxC, -1), labels_N, average="macro").f1


def _calibration_errors(probs_NxC, labels_N) -> dict[str, jax.Array]:
    """Every calibration error of the report, one pytree so one bootstrap resamples them all;
    the examples come sorted by confidence (`metrics.sort_by_confidence`)."""
    sweep, sweep_bins = metrics.ece_sweep(probs_NxC, labels_N, presorted=True)
    smooth, sigma = metrics.smooth_ece(probs_NxC, labels_N)
    return {
        "ece": metrics.expected_calibration_error(probs_NxC, labels_N),
        "ece_equal_mass": metrics.equal_mass_ece(probs_NxC, labels_N, presorted=True),
        "ece_sweep": sweep, "ece_sweep_bins": sweep_bins,
        "debiased_l2_ce": metrics.debiased_l2_ce(probs_NxC, labels_N, presorted=True),
        "classwise_ece": metrics.classwise_ece(probs_NxC, labels_N),
        "smooth_ece": smooth, "smooth_ece_sigma": sigma,
    }


CALIBRATION_INTERVALS = ("ece", "ece_equal_mass", "ece_sweep", "debiased_l2_ce",
                         "classwise_ece", "smooth_ece")
# The bootstrap interval of each: basic (2 point - q) for the plug-in errors, which are biased
# upwards, so that their resamples sit above the estimate; percentile for the debiased
# estimator, whose resamples carry no such bias (a basic interval would correct it twice).
INTERVAL_METHODS = {name: "percentile" if name == "debiased_l2_ce" else "basic"
                    for name in CALIBRATION_INTERVALS}


@functools.partial(jax.jit, static_argnames="n_resamples")
def _calibration_bootstraps(probs_NxC, labels_N, key, n_resamples) -> tuple:
    """The two bootstraps of `_calibration_metrics` (the errors and the smooth curve): one
    program, compiled once for the probabilities before and after the map."""
    # Sorted once: every resample keeps the order, and the equal-mass errors skip their sort.
    errors = metrics.bootstrap_ci(_calibration_errors, key,
                                  *metrics.sort_by_confidence(probs_NxC, labels_N),
                                  n_resamples=n_resamples, ordered=True)
    # The curve whose gap to the diagonal SmoothECE measures, with a pointwise percentile
    # band of the resampled curves at the same bandwidth, as relplot draws it (and from as
    # many resamples as relplot's default: a band to look at, not a number to report).
    curve = metrics.bootstrap_ci(metrics.smooth_reliability, jax.random.fold_in(key, 1),
                                 probs_NxC, labels_N, n_resamples=min(n_resamples, 200),
                                 constants=(errors.point["smooth_ece_sigma"],))
    return errors, curve


def _calibration_metrics(logits_NxC, labels_N, key, n_resamples) -> dict[str, Any]:
    # The softmax and the point figures stay outside the program, computed as every other
    # caller computes them: fused into it, XLA rounds some of them an ulp apart.
    probs_NxC = jax.nn.softmax(logits_NxC)
    errors, curve = _calibration_bootstraps(probs_NxC, labels_N, key, n_resamples)
    out: dict[str, Any] = {
        "nll": float(metrics.nll(logits_NxC, labels_N)),
        "brier": float(metrics.brier_score(probs_NxC, labels_N)),
        "mce": float(metrics.max_calibration_error(probs_NxC, labels_N)),
        "ece_sweep_bins": int(errors.point["ece_sweep_bins"]),
        "smooth_ece_sigma": float(errors.point["smooth_ece_sigma"]),
    }
    for name in CALIBRATION_INTERVALS:  # an error is >= 0, and so is its interval
        point, low, high = (float(bound[name]) for bound in errors)
        if INTERVAL_METHODS[name] == "basic":
            low, high = 2 * point - high, 2 * point - low
        out[name] = point
        out[name + "_ci95"] = [max(0.0, low), max(0.0, high)]
    confidence_N = jnp.max(probs_NxC, axis=-1)
    out["smooth_reliability"] = {
        "confidence": np.linspace(0.0, 1.0, metrics.SMOOTH_CURVE_POINTS).tolist(),
        "seen": [float(jnp.min(confidence_N)), float(jnp.max(confidence_N))],
        "accuracy": np.asarray(curve.point).tolist(),
        "ci95_low": np.asarray(curve.low).tolist(), "ci95_high": np.asarray(curve.high).tolist()}
    return out


_point_errors = jax.jit(lambda probs_NxC, labels_N: _calibration_errors(
    *metrics.sort_by_confidence(probs_NxC, labels_N)))


# Jitted: run op by op, its sorts and scans per class compile about 50 programs.
_auc_per_class = jax.jit(metrics.roc_auc_ovr)


def compare_maps(logits_NxC, labels_N, val_logits_NxC, val_labels_N) -> dict[str, Any]:
    """Every calibration map fit on the validation split, then scored on the test split.

    Per map (and "none", the raw logits): its k-fold cross-validated NLL on the validation
    split (the number to choose a map by, without the test set), and on the test split its
    NLL, Brier score, point calibration errors, accuracy and how many test predictions it
    changed (temperature never changes one). "recommended" is the map of lowest
    cross-validated NLL."""
    preds_N = jnp.argmax(logits_NxC, -1)
    maps, rows = {}, {}
    for kind in ("none",) + CALIBRATION_KINDS:
        if kind == "none":
            cal_map, cv_nll = identity_map(), float(metrics.nll(val_logits_NxC, val_labels_N))
        else:
            cal_map, cv_nll = fit_and_score(kind, val_logits_NxC, val_labels_N, k=CV_FOLDS)
            maps[kind] = cal_map
        mapped_NxC = apply_calibration(cal_map, logits_NxC)
        probs_NxC = jax.nn.softmax(mapped_NxC)
        errors = _point_errors(probs_NxC, labels_N)
        rows[kind] = {"cv_nll_validation": cv_nll,
                      "nll": float(metrics.nll(mapped_NxC, labels_N)),
                      "brier": float(metrics.brier_score(probs_NxC, labels_N)),
                      **{name: float(errors[name]) for name in CALIBRATION_INTERVALS},
                      "accuracy": float(metrics.accuracy(mapped_NxC, labels_N)),
                      "predictions_changed": int(jnp.sum(jnp.argmax(mapped_NxC, -1) != preds_N))}
    recommended = min(CALIBRATION_KINDS, key=lambda kind: rows[kind]["cv_nll_validation"])
    return {"maps": maps, "table": rows, "recommended": recommended, "cv_folds": CV_FOLDS}


def compute_report(logits_NxC, labels_N, val_logits_NxC=None, val_labels_N=None, *, key,
                   n_resamples: int = 1000, calibration: str = "temperature") -> dict[str, Any]:
    """Every number of the report, from test logits and (for the maps) validation logits.

    "before_temperature" and "after_temperature" keep their names from when temperature was
    the only map: "after" is after the chosen map (`calibration`), named in
    report["calibration"]["chosen"]."""
    if calibration not in CALIBRATION_KINDS:  # before anything compiles
        raise FmnistError(f"unknown calibration map {calibration!r}: choose one of "
                          f"{', '.join(CALIBRATION_KINDS)}")
    logits_NxC, labels_N = jnp.asarray(logits_NxC), jnp.asarray(labels_N)
    if val_logits_NxC is None:
        compared, chosen = None, identity_map()
    else:
        compared = compare_maps(logits_NxC, labels_N, jnp.asarray(val_logits_NxC),
                                jnp.asarray(val_labels_N))
        chosen = compared["maps"][calibration]
    temperature = 1.0 if compared is None else compared["maps"]["temperature"]["temperature"]
    probs_NxC = jax.nn.softmax(logits_NxC)
    scaled_NxC = apply_calibration(chosen, logits_NxC)
    preds_N = jnp.argmax(logits_NxC, -1)
    acc_key, f1_key, cal_key = jax.random.split(key, 3)
    acc = metrics.bootstrap_ci(metrics.accuracy, acc_key, logits_NxC, labels_N,
                               n_resamples=n_resamples)
    f1 = metrics.bootstrap_ci(_macro_f1, f1_key, probs_NxC, labels_N, n_resamples=n_resamples)
    auc_C = _auc_per_class(probs_NxC, labels_N)
    return {
        "n_test": int(labels_N.shape[0]),
        "n_validation": 0 if val_labels_N is None else int(len(val_labels_N)),
        "accuracy": float(acc.point), "accuracy_ci95": [float(acc.low), float(acc.high)],
        "macro_f1": float(f1.point), "macro_f1_ci95": [float(f1.low), float(f1.high)],
        "auc_macro": float(jnp.mean(auc_C)),
        "auc_per_class": [float(a) for a in auc_C],
        "classification_report": metrics.classification_report_dict(
            preds_N, labels_N, data.CLASS_NAMES),
        "confusion_matrix": np.asarray(metrics.confusion_matrix(preds_N, labels_N)).tolist(),
        "temperature": temperature,
        "calibration": {"chosen": calibration if compared else None, "map": chosen,
                        **({} if compared is None else {
                            "recommended": compared["recommended"],
                            "cv_folds": compared["cv_folds"],
                            "maps": compared["table"]})},
        "before_temperature": _calibration_metrics(logits_NxC, labels_N, cal_key, n_resamples),
        "after_temperature": _calibration_metrics(scaled_NxC, labels_N, cal_key, n_resamples),
        "bootstrap_resamples": n_resamples,
        "calibration_interval": INTERVAL_METHODS,
    }


def _model_words(best: dict[str, Any] | None) -> str:
    """Which epoch's parameters the report is about."""
    if best is None:
        return "parameters of the last epoch"
    trained = f"{best['epochs_trained']} trained" + (", stopped early" if best.get(
        "stopped_early") else "")
    if best.get("chosen_by") == "val_accuracy":
        return (f"parameters of epoch {best['epoch']}, the best validation accuracy "
                f"({100 * best['val_accuracy']:.2f}%; {trained})")
    return f"parameters of epoch {best['epoch']}, the last ({trained})"


def format_report(report: dict[str, Any], preds_N, labels_N, run_dir,
                  best: dict[str, Any] | None = None) -> str:
    def pct(x):
        return f"{100 * x:.2f}%"

    def ci(name):
        low, high = report[name + "_ci95"]
        return f"[{pct(low)}, {pct(high)}]"

    b, a = report["before_temperature"], report["after_temperature"]
    chosen = report["calibration"]["chosen"]
    t_note = (f"{map_words(report['calibration']['map'])}, fit on {report['n_validation']} "
              f"validation images" if chosen else "no validation split (val_fraction 0): T = 1")
    lines = [
        f"run: {run_dir}   test images: {report['n_test']}",
        _model_words(best),
        "",
        metrics.classification_report_text(preds_N, labels_N, data.CLASS_NAMES, digits=4),
        f"accuracy       {pct(report['accuracy'])}   95% CI {ci('accuracy')}",
        f"macro F1       {pct(report['macro_f1'])}   95% CI {ci('macro_f1')}",
        f"AUC-ROC (OvR)  {report['auc_macro']:.4f} (macro)",
        f"(bootstrap percentile intervals, {report['bootstrap_resamples']} resamples of the test set)",
        "",
        f"calibration    before      after     ({t_note})",
        f"NLL            {b['nll']:8.4f}   {a['nll']:8.4f}",
        f"Brier          {b['brier']:8.4f}   {a['brier']:8.4f}",
        f"MCE            {pct(b['mce']):>8}   {pct(a['mce']):>8}",
    ]
    for name, label in CALIBRATION_ROWS:
        lines += [f"{label:<15}{pct(b[name]):>8}   {pct(a[name]):>8}",
                  f"  95% CI       {ci_pair(b[name + '_ci95'])}   {ci_pair(a[name + '_ci95'])}"]
    lines += [f"(ECE_sweep bins: {b['ece_sweep_bins']} before, {a['ece_sweep_bins']} after; "
              f"SmoothECE bandwidth: {b['smooth_ece_sigma']:.4f} before, "
              f"{a['smooth_ece_sigma']:.4f} after)",
              "(calibration errors: basic bootstrap intervals, 2 x estimate - percentiles, "
              "which correct for their upward bias and may lie below the estimate; debiased "
              "l2-CE: percentile, being debiased already)"]
    if "maps" in report["calibration"]:
        lines += [""] + _comparison_lines(report["calibration"], report["n_validation"])
    if "flip_tta" in report:
        tta = report["flip_tta"]
        lines += ["", f"flip test-time augmentation (apart: twice the inference cost): accuracy "
                      f"{pct(tta['accuracy'])} (without: {pct(tta['accuracy_without'])}), NLL "
                      f"{tta['nll']:.4f}"]
    return "\n".join(lines) + "\n"


def map_words(cal_map: dict[str, Any]) -> str:
    """A map in a few words: "T = 0.9376", "vector scaling", "Dirichlet (ODIR lambda 0.1)"."""
    if cal_map["kind"] == "temperature":
        return f"T = {cal_map['temperature']:.4f}"
    if cal_map["kind"] == "vector":
        return "vector scaling"
    lam = cal_map.get("odir_lambda")
    return "Dirichlet" + ("" if lam is None else f" (ODIR lambda = mu = {lam:g})")


CALIBRATION_ROWS = (("ece", "ECE (15 bins)"), ("ece_equal_mass", "ECE equal-mass"),
                    ("ece_sweep", "ECE_sweep"), ("debiased_l2_ce", "debiased l2-CE"),
                    ("classwise_ece", "classwise ECE"), ("smooth_ece", "SmoothECE"))


def ci_pair(bounds) -> str:
    return f"[{100 * bounds[0]:.2f}, {100 * bounds[1]:.2f}]%"


_SHORT = {"ece": "ECE", "ece_equal_mass": "ECE-em", "ece_sweep": "ECE_sw",
          "debiased_l2_ce": "dl2-CE", "classwise_ece": "cw-ECE", "smooth_ece": "SmECE"}


def _comparison_lines(calibration: dict[str, Any], n_validation: int) -> list[str]:
    """The maps side by side: CV NLL on validation, point values on the test split."""
    lines = [f"calibration maps, each fit on the {n_validation} validation images; CV NLL is "
             f"{calibration['cv_folds']}-fold cross-validated on validation, the rest on test "
             f"(ECE-em: equal-mass, ECE_sw: sweep, dl2: debiased l2, cw: classwise, "
             f"SmECE: SmoothECE)",
             f"{'map':<12}{'CV NLL':>8}{'NLL':>8}{'Brier':>8}"
             + "".join(f"{_SHORT[name]:>8}" for name, _ in CALIBRATION_ROWS)
             + f"{'accuracy':>10}{'changed':>9}"]
    for kind, row in calibration["maps"].items():
        lines.append(f"{kind:<12}{row['cv_nll_validation']:8.4f}{row['nll']:8.4f}"
                     f"{row['brier']:8.4f}"
                     + "".join(f"{100 * row[name]:7.2f}%" for name, _ in CALIBRATION_ROWS)
                     + f"{100 * row['accuracy']:9.2f}%{row['predictions_changed']:9d}")
    lines.append(f"chosen (--calibration): {calibration['chosen']}; lowest CV NLL on "
                 f"validation, the map to recommend: {calibration['recommended']}")
    return lines


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """Everything the evaluation reads from a run folder, read (and checked) before any data
    loads and before anything is written."""

    config: TrainConfig
    variables: dict  # {"params": ...} and "batch_stats" for BatchNorm models
    normalization: data.Normalization
    history: list[dict[str, Any]]
    best: dict[str, Any] | None = None  # which epoch (checkpoints.load_best); None: unknown


def load_run(run_dir: str | Path) -> LoadedRun:
    """The run's config, variables, normalization and history; FmnistError if any is
    missing or damaged. It only reads: a read-only run folder loads (the writer checks its
    paths, `results.check_report_paths`)."""
    cfg = folder.load_config(run_dir)
    folder.check_finished(run_dir)  # an unfinished run is continued, not trained again
    folder.check_data_file(run_dir)
    return LoadedRun(config=cfg, normalization=folder.load_normalization(run_dir),
                     history=load_history(run_dir), best=checkpoints.load_best(run_dir),
                     variables=checkpoints.load_variables(run_dir, cfg))


def evaluate_run(run_dir: str | Path, *, train: data.Split, test: data.Split,
                 n_resamples: int = 1000, log_fn: Callable[[str], Any] = print,
                 run: LoadedRun | None = None, calibration: str = "temperature",
                 tta: str = "none") -> dict:
    """Evaluate the run in `run_dir` on `test` (and its validation split, held out of `train`
    as the run did), write the report files there and return the report. `tta` "flip" adds
    the accuracy with flip test-time augmentation, apart (`flip_tta`).

    Nothing is written unless every input is sound: a damaged run folder or a model whose
    logits are not finite leaves the earlier report and calibration as they were."""
    run_dir = Path(run_dir)
    results.check_report_paths(run_dir)
    run = run or load_run(run_dir)
    cfg, norm = run.config, run.normalization
    folder.check_data(run_dir, train, test)
    _, val = data.split_train_val(train, cfg.val_fraction, cfg.split_seed)  # as it held out
    state = inference_state(get_model(cfg.model), run.variables)

    def logits_of(split, name):
        logits_NxC = predict_logits(state, jnp.asarray(split.images_NxHxWx1),
                                    batch_size=cfg.eval_batch_size, norm=norm)
        if not bool(jnp.all(jnp.isfinite(logits_NxC))):
            raise FmnistError(f"the model of {run_dir} gives NaN or infinite logits on the "
                              f"{name} images: its weights are broken; train again (the "
                              f"earlier report, if any, is kept)")
        return logits_NxC

    test_logits_NxC = logits_of(test, "test")
    val_logits_NxC = None if val is None else logits_of(val, "validation")
    key = streams.stream_key(cfg.seed, streams.BOOTSTRAP)
    report = compute_report(test_logits_NxC, test.labels_N, val_logits_NxC,
                            None if val is None else val.labels_N,
                            key=key, n_resamples=n_resamples, calibration=calibration)
    preds_N = np.asarray(jnp.argmax(test_logits_NxC, -1))
    if tta == "flip":
        flipped = data.Split(test.images_NxHxWx1[:, :, ::-1, :], test.labels_N)
        report["flip_tta"] = flip_tta(test_logits_NxC, logits_of(flipped, "flipped test"),
                                      test.labels_N)
    if run.best is not None:
        report["epoch"] = run.best["epoch"]
        report["epochs_trained"] = run.best["epochs_trained"]
    text = format_report(report, preds_N, test.labels_N, run_dir, run.best)
    results.check_report_paths(run_dir)  # again: the evaluation took a while
    if val is not None:
        results.save_calibration(run_dir, report["calibration"]["map"], report["n_validation"])
    _write_plots(run_dir, report, test_logits_NxC, test.labels_N, run.history)
    results.save_report(run_dir, text, report)  # report.json last: the evaluation is whole
    log_fn(text.rstrip())
    log_fn(f"wrote {folder.REPORT_TEXT_FILE}, {folder.REPORT_JSON_FILE}, "
           f"{', '.join(folder.PLOT_FILES.values())} to {run_dir}")
    return report


def flip_tta(logits_NxC, flipped_logits_NxC, labels_N) -> dict[str, Any]:
    """Flip test-time augmentation: each image's class probabilities averaged with those of
    its mirror image. Reported apart from the model's own figures: it doubles the inference
    cost, and the headline accuracy is without it."""
    probs_NxC = (jax.nn.softmax(logits_NxC) + jax.nn.softmax(flipped_logits_NxC)) / 2
    labels_N = jnp.asarray(labels_N)
    hits_N = jnp.argmax(probs_NxC, -1) == labels_N
    nll = -jnp.mean(jnp.log(jnp.take_along_axis(probs_NxC, labels_N[:, None], -1)))
    return {"accuracy": float(jnp.mean(hits_N)), "nll": float(nll),
            "accuracy_without": float(metrics.accuracy(logits_NxC, labels_N)),
            "note": "probabilities of each image and its mirror image averaged; twice the "
                    "inference cost; not the model's headline figure"}


def _write_plots(run_dir: Path, report, logits_NxC, labels_N, history) -> None:
    plots.plot_confusion_matrix(np.array(report["confusion_matrix"]), data.CLASS_NAMES,
                                results.plot_path(run_dir, "confusion_matrix"))
    cal_map = report["calibration"]["map"]  # the chosen map, fit on validation
    after_words = {"temperature": f"T = {cal_map.get('temperature', 1.0):.3f}",
                   "vector": "vector scaling",
                   "dirichlet": "Dirichlet map"}[cal_map["kind"]]
    before = metrics.reliability_diagram(jax.nn.softmax(logits_NxC), labels_N)
    after = metrics.reliability_diagram(jax.nn.softmax(apply_calibration(cal_map, logits_NxC)),
                                        labels_N)
    plots.plot_reliability([(before, report["before_temperature"], "before: raw softmax"),
                            (after, report["after_temperature"], f"after: {after_words}")],
                           results.plot_path(run_dir, "reliability"))
    if history:
        plots.plot_training_curves(history, results.plot_path(run_dir, "curves"))
