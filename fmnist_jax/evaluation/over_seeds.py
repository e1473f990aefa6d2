"""Figures over the seeds of a run of several seeds, read from each seed's report.json (and
the validation accuracy that chose its model, from its best.json): the mean of each with its
Student-t 95% interval (`summarize`), and two such runs compared seed by seed (`compare`), the
paired difference telling whether a recipe beats another beyond the spread of the seeds.
Host-side and small: it reads the records, never the data or a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fmnist_jax import metrics
from fmnist_jax.errors import FmnistError
from fmnist_jax.run import checkpoints, folder, results

# A seed's record: its report.json, and under KEPT what chose its model (best.json's
# validation accuracy) and the seed of the validation split it was chosen on.
KEPT = "kept"

# name -> (what it is, how to read it from a seed's record). Validation is there only for runs
# with a validation split, flip TTA only when the report was made with `--tta flip`; the
# fractions in IN_PERCENT are shown in percent.
METRICS: dict[str, tuple[str, Callable[[dict], Any]]] = {
    "val_accuracy": ("validation accuracy of the kept model (what chose it; the test set "
                     "chooses nothing)", lambda r: r[KEPT]["val_accuracy"]),
    "accuracy": ("test accuracy", lambda r: r["accuracy"]),
    "macro_f1": ("test macro F1", lambda r: r["macro_f1"]),
    "ece_before": ("test ECE (15 bins), before calibration",
                   lambda r: r["before_temperature"]["ece"]),
    "ece_after": ("test ECE (15 bins), after calibration",
                  lambda r: r["after_temperature"]["ece"]),
    "nll_after": ("test NLL, after calibration", lambda r: r["after_temperature"]["nll"]),
    "flip_tta": ("test accuracy with flip TTA (apart: twice the inference cost)",
                 lambda r: r.get("flip_tta", {}).get("accuracy")),
}
IN_PERCENT = {"val_accuracy", "accuracy", "macro_f1", "ece_before", "ece_after", "flip_tta"}
# What a run without a validation split (--val-fraction 0) has not: it keeps its last epoch and
# calibrates nothing (T = 1), so its "after" figures would only repeat its "before" ones.
NEEDS_VALIDATION = ("val_accuracy", "ece_after", "nll_after")
# The figures every evaluation writes to report.json (flip TTA and the others are optional).
REQUIRED = ("accuracy", "macro_f1", "before_temperature.ece", "after_temperature.ece",
            "after_temperature.nll")


def seed_reports(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """seed -> that seed's record (its report.json, and KEPT: {"val_accuracy", "split_seed"}),
    for the folder of a run of several seeds. FmnistError for any other folder, a sweep, or
    a seed not yet evaluated."""
    run_dir = Path(run_dir)
    member_dirs = folder.seed_run_dirs(run_dir)
    if member_dirs is None:
        raise FmnistError(f"{run_dir} is no run of several seeds (it has no {folder.SEEDS_FILE}"
                          f"): give the folder a `--seeds K` training wrote")
    cfg = folder.stored_config(run_dir)
    if cfg.sweep:
        raise FmnistError(f"{run_dir} is a sweep: its points are compared in its "
                          f"{folder.SWEEP_FILE}; give the folder of a `--seeds K` run")
    reports = {}
    for member, member_dir in zip(cfg.members(), member_dirs):
        folder.load_config(member_dir)  # a seed's folder deleted or damaged: no evaluation helps
        again = f"evaluate the run again (python scripts/evaluate.py {run_dir})"
        report = results.load_report(member_dir, again)
        if report is None:
            raise FmnistError(f"{member_dir} has no {folder.REPORT_JSON_FILE}: evaluate the run "
                              f"first (python scripts/evaluate.py {run_dir})")
        _check_report(member_dir / folder.REPORT_JSON_FILE, report, again)
        best = checkpoints.load_best(member_dir) or {}
        reports[member.seed] = {**report, KEPT: {"val_accuracy": best.get("val_accuracy"),
                                                 "split_seed": member.split_seed}}
    return reports


def _check_report(path: Path, report: Any, fix: str) -> None:
    """FmnistError unless `report` is an object holding a number at each of REQUIRED:
    without them the figures over the seeds would drop that metric silently."""
    if not isinstance(report, dict):
        raise FmnistError(f"{path} is malformed (not a JSON object): {fix}")
    for key in REQUIRED:
        value: Any = report
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if type(value) not in (int, float):
            raise FmnistError(f"{path} is malformed (no number {key}): {fix}")


def _validated(reports: dict[int, dict[str, Any]]) -> bool:
    """Whether every seed held out a validation split (reports older than `n_validation`
    were all made with one)."""
    return all(report.get("n_validation", 1) for report in reports.values())


def _values(reports: dict[int, dict[str, Any]], name: str) -> dict[int, float] | None:
    """seed -> the metric `name` of each report; None when a report lacks it."""
    values = {}
    for seed, report in reports.items():
        try:
            value = METRICS[name][1](report)
        except (KeyError, TypeError):
            return None
        if value is None:
            return None
        values[seed] = float(value)
    return values


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """Each metric every seed's report holds: its value per seed, and the mean over the seeds
    with its std and Student-t 95% interval."""
    reports = seed_reports(run_dir)
    if len(reports) < 2:
        raise FmnistError(f"{run_dir} holds {len(reports)} seed: an interval needs 2 or more")
    summary: dict[str, Any] = {"run": str(run_dir), "seeds": sorted(reports), "metrics": {}}
    for name, (about, _) in METRICS.items():
        if name in NEEDS_VALIDATION and not _validated(reports):
            continue
        values = _values(reports, name)
        if values is not None:
            summary["metrics"][name] = {"about": about, "per_seed": values,
                                        **metrics.mean_and_interval(list(values.values()))}
    return summary


def compare(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    """Run B against run A, paired by seed: for each metric both hold, B - A for each seed
    the two share, and the mean difference with its Student-t 95% interval (a paired t
    interval: the seed's own luck cancels out). Both must have been tested on the same
    images. Validation accuracy is compared only where each shared seed held out the same
    split in both runs (`--val-seed`); otherwise a note says why it is left out."""
    reports_a, reports_b = seed_reports(run_a), seed_reports(run_b)
    seeds = sorted(set(reports_a) & set(reports_b))
    if len(seeds) < 2:
        raise FmnistError(f"{run_a} (seeds {_seed_list(reports_a)}) and {run_b} (seeds "
                          f"{_seed_list(reports_b)}) share {len(seeds)} seed: a paired interval "
                          f"needs 2 or more; train both with the same --seed and --seeds")
    _check_same_test_set(run_a, run_b)
    comparison: dict[str, Any] = {"a": str(run_a), "b": str(run_b), "seeds": seeds,
                                  "metrics": {}, "notes": []}
    same_splits = all(reports_a[s][KEPT]["split_seed"] == reports_b[s][KEPT]["split_seed"]
                      for s in seeds)
    unvalidated = " and ".join(name for name, reports in (("A", reports_a), ("B", reports_b))
                               if not _validated({s: reports[s] for s in seeds}))
    for name, (about, _) in METRICS.items():
        if unvalidated and name in NEEDS_VALIDATION:
            comparison["notes"].append(f"{about}: not compared, {unvalidated} held out no "
                                       f"validation split (--val-fraction 0)")
            continue
        if name == "val_accuracy" and not same_splits:
            comparison["notes"].append(f"{about}: not compared, the runs held out different "
                                       f"validation splits (--val-seed)")
            continue
        values_a = _values({s: reports_a[s] for s in seeds}, name)
        values_b = _values({s: reports_b[s] for s in seeds}, name)
        if values_a is None or values_b is None:
            continue
        diffs = [values_b[s] - values_a[s] for s in seeds]
        comparison["metrics"][name] = {
            "about": about, "a": values_a, "b": values_b,
            "mean_a": sum(values_a.values()) / len(seeds),
            "mean_b": sum(values_b.values()) / len(seeds),
            "difference": metrics.mean_and_interval(diffs)}
    return comparison


def _seed_list(reports: dict[int, Any]) -> str:
    return ", ".join(str(seed) for seed in sorted(reports))


def _check_same_test_set(run_a: str | Path, run_b: str | Path) -> None:
    """A paired difference means something only on the same test images: compare the
    fingerprints the first seed of each run recorded."""
    fingerprints = [folder.recorded_test_sha256(folder.seed_run_dirs(run_dir)[0])
                    for run_dir in (run_a, run_b)]
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        raise FmnistError(f"{run_a} and {run_b} were tested on different images (the "
                          f"test_sha256 of their data.json differ): compare runs of the same "
                          f"data")


def _figure(name: str, value: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{value * 100:{sign}.2f}" if name in IN_PERCENT else f"{value:{sign}.4f}"


def _unit(name: str) -> str:
    return " (%)" if name in IN_PERCENT else ""


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """`summarize`'s result as text: one line per metric, then the values per seed."""
    seeds = summary["seeds"]
    lines = [f"over {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean, 95% CI "
             f"(Student t), then each seed"]
    for name, figures in summary["metrics"].items():
        low, high = figures["interval"]
        per_seed = ", ".join(_figure(name, figures["per_seed"][s]) for s in seeds)
        lines.append(f"  {figures['about']}{_unit(name)}: {_figure(name, figures['mean'])} "
                     f"[{_figure(name, low)}, {_figure(name, high)}]; {per_seed}")
    return lines


def comparison_lines(comparison: dict[str, Any]) -> list[str]:
    """`compare`'s result as text: for each metric, A's and B's means, B - A with its
    paired interval, then B - A for each seed."""
    seeds = comparison["seeds"]
    lines = [f"A: {comparison['a']}", f"B: {comparison['b']}",
             f"paired by seed over {len(seeds)} seeds ({', '.join(map(str, seeds))}): "
             f"mean of A, mean of B, B - A with its 95% CI (paired Student t), then B - A "
             f"for each seed"]
    for name, figures in comparison["metrics"].items():
        diff = figures["difference"]
        low, high = diff["interval"]
        per_seed = ", ".join(_figure(name, figures["b"][s] - figures["a"][s], signed=True)
                             for s in seeds)
        verdict = ("B higher" if low > 0 else "B lower" if high < 0
                   else "no difference beyond the seeds' spread")
        lines.append(f"  {figures['about']}{_unit(name)}: A {_figure(name, figures['mean_a'])}, "
                     f"B {_figure(name, figures['mean_b'])}, B - A "
                     f"{_figure(name, diff['mean'], True)} [{_figure(name, low, True)}, "
                     f"{_figure(name, high, True)}] ({verdict}); {per_seed}")
    return lines + [f"  {note}" for note in comparison["notes"]]


def write_summary(run_dir: str | Path, log_fn: Callable[[str], Any] = print) -> dict[str, Any]:
    """Summarize the seeds of `run_dir`, write seeds_report.json there and log its lines."""
    summary = summarize(run_dir)
    results.save_seeds_report(Path(run_dir), summary)
    for line in summary_lines(summary):
        log_fn(line)
    log_fn(f"wrote {Path(run_dir) / folder.SEEDS_REPORT_FILE}")
    return summary
