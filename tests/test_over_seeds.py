"""Figures over the seeds of a run (seeds_report.json) and compare.py, on run folders whose
reports are written here: the statistics against a direct computation, the pairing by seed,
and every refusal as one line."""

import json
import math
import shutil

import numpy as np
import pytest
from scipy import stats

from fmnist_jax.evaluation import over_seeds
from fmnist_jax.run import folder
from fmnist_jax.run.presets import get_config
from tests.helpers import one_error_line

TEST_SHA = "a" * 64


def _report(accuracy: float, ece_after: float, flip: float | None = None) -> dict:
    """The fields of a report.json that the figures over seeds read."""
    report = {"accuracy": accuracy, "macro_f1": accuracy - 0.001,
              "before_temperature": {"ece": 2 * ece_after, "nll": 0.3},
              "after_temperature": {"ece": ece_after, "nll": 0.2 + ece_after}}
    if flip is not None:
        report["flip_tta"] = {"accuracy": flip, "accuracy_without": accuracy}
    return report


def _seeds_run(path, seed: int, reports: list[dict | None], test_sha: str = TEST_SHA,
               val_accuracies: list[float] | None = None, **config):
    """A run folder of len(reports) seeds from `seed`, each seed's report.json as given
    (None: not evaluated), its data.json with `test_sha`, and with `val_accuracies` its
    best.json with that validation accuracy."""
    folder.claim(path, get_config(seed=seed, seeds=len(reports), **config)).release()
    for k, (member_dir, report) in enumerate(zip(folder.seed_run_dirs(path), reports)):
        (member_dir / folder.DATA_FILE).write_text(json.dumps({"test_sha256": test_sha}))
        if report is not None:
            (member_dir / folder.REPORT_JSON_FILE).write_text(json.dumps(report))
        if val_accuracies is not None:
            (member_dir / folder.BEST_FILE).write_text(json.dumps(
                {"epoch": 9, "epochs_trained": 10, "chosen_by": "val_accuracy",
                 "val_accuracy": val_accuracies[k]}))
    return path


def _t_interval(values):
    values = np.asarray(values, np.float64)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def test_the_summary_is_each_seeds_figure_and_their_mean_with_its_t_interval(tmp_path):
    accuracies, eces, flips = [0.921, 0.925, 0.930], [0.006, 0.008, 0.005], [0.93, 0.931, 0.935]
    run = _seeds_run(tmp_path / "run", 3, [_report(a, e, f)
                                           for a, e, f in zip(accuracies, eces, flips)])
    summary = over_seeds.summarize(run)
    assert summary["seeds"] == [3, 4, 5]
    for name, values in (("accuracy", accuracies), ("ece_after", eces), ("flip_tta", flips)):
        figures = summary["metrics"][name]
        assert figures["per_seed"] == dict(zip([3, 4, 5], values))
        assert figures["mean"] == pytest.approx(np.mean(values))
        assert figures["interval"] == pytest.approx(_t_interval(values))
    # Written and printed by evaluate.py and train.py at the end of a run of several seeds.
    lines = []
    over_seeds.write_summary(run, log_fn=lines.append)
    assert json.loads((run / folder.SEEDS_REPORT_FILE).read_text()) == json.loads(
        json.dumps(summary))
    low, high = _t_interval(flips)
    assert (f"  test accuracy with flip TTA (apart: twice the inference cost) (%): "
            f"{np.mean(flips) * 100:.2f} [{low * 100:.2f}, {high * 100:.2f}]; 93.00, 93.10, "
            f"93.50") in lines


def test_flip_tta_is_summarized_only_when_every_seed_has_it(tmp_path):
    run = _seeds_run(tmp_path / "run", 0, [_report(0.92, 0.01, 0.93), _report(0.93, 0.01)])
    metrics = over_seeds.summarize(run)["metrics"]
    assert "flip_tta" not in metrics and "accuracy" in metrics


def test_compare_pairs_the_seeds_both_runs_hold(tmp_path):
    """A holds seeds 0-4, B seeds 2-6: the difference is over 2, 3, 4, seed by seed."""
    a_acc = [0.920, 0.921, 0.922, 0.926, 0.921]
    b_acc = [0.925, 0.927, 0.925, 0.940, 0.941]  # seeds 2..6
    run_a = _seeds_run(tmp_path / "a", 0, [_report(x, 0.01, x + 0.003) for x in a_acc])
    run_b = _seeds_run(tmp_path / "b", 2, [_report(x, 0.008) for x in b_acc])
    comparison = over_seeds.compare(run_a, run_b)
    assert comparison["seeds"] == [2, 3, 4]
    diffs = [0.925 - 0.922, 0.927 - 0.926, 0.925 - 0.921]
    accuracy = comparison["metrics"]["accuracy"]
    assert accuracy["mean_a"] == pytest.approx(np.mean(a_acc[2:]))
    assert accuracy["mean_b"] == pytest.approx(np.mean(b_acc[:3]))
    assert accuracy["difference"]["mean"] == pytest.approx(np.mean(diffs))
    assert accuracy["difference"]["interval"] == pytest.approx(_t_interval(diffs))
    # the paired t interval is scipy's paired t-test's: 0 inside it exactly when p > 0.05
    p = stats.ttest_rel([0.925, 0.927, 0.925], a_acc[2:]).pvalue
    low, high = accuracy["difference"]["interval"]
    assert (low < 0 < high) == (p > 0.05)
    assert "flip_tta" not in comparison["metrics"]  # B was evaluated without it


def test_validation_is_summarized_and_compared_only_on_the_same_splits(tmp_path):
    vals_a, vals_b = [0.915, 0.918, 0.911], [0.921, 0.919, 0.925]
    reports = [_report(0.92, 0.01)] * 3
    run_a = _seeds_run(tmp_path / "a", 0, reports, val_accuracies=vals_a)
    run_b = _seeds_run(tmp_path / "b", 0, reports, val_accuracies=vals_b)
    validation = over_seeds.summarize(run_a)["metrics"]["val_accuracy"]
    assert validation["per_seed"] == dict(zip([0, 1, 2], vals_a))
    assert validation["interval"] == pytest.approx(_t_interval(vals_a))
    difference = over_seeds.compare(run_a, run_b)["metrics"]["val_accuracy"]["difference"]
    assert difference["interval"] == pytest.approx(
        _t_interval(np.subtract(vals_b, vals_a)))
    # B's seeds all held out the split of seed 7: their validation images are others.
    run_c = _seeds_run(tmp_path / "c", 0, reports, val_accuracies=vals_b, val_seed=7)
    comparison = over_seeds.compare(run_a, run_c)
    assert "val_accuracy" not in comparison["metrics"] and "accuracy" in comparison["metrics"]
    assert over_seeds.comparison_lines(comparison)[-1] == (
        "  validation accuracy of the kept model (what chose it; the test set chooses nothing): "
        "not compared, the runs held out different validation splits (--val-seed)")
    # Without best.json (a run without a validation split has no figure to show) it is left out.
    assert "val_accuracy" not in over_seeds.summarize(
        _seeds_run(tmp_path / "d", 0, reports))["metrics"]
    # Trained on every image (--val-fraction 0): no validation, and nothing calibrated (T = 1).
    run_e = _seeds_run(tmp_path / "e", 0, [{**_report(0.92, 0.01), "n_validation": 0}] * 3,
                       val_fraction=0.0)
    assert set(over_seeds.summarize(run_e)["metrics"]) == {"accuracy", "macro_f1",
                                                           "ece_before"}
    comparison = over_seeds.compare(run_a, run_e)
    assert set(comparison["metrics"]) == {"accuracy", "macro_f1", "ece_before"}
    assert comparison["notes"] == [
        f"{over_seeds.METRICS[name][0]}: not compared, B held out no validation split "
        f"(--val-fraction 0)" for name in ("val_accuracy", "ece_after", "nll_after")]


def test_compare_script_says_which_run_is_higher_beyond_the_seeds_spread(tmp_path, run_main):
    run_a = _seeds_run(tmp_path / "a", 0, [_report(x, 0.01) for x in (0.920, 0.921, 0.922)])
    run_b = _seeds_run(tmp_path / "b", 0, [_report(x, 0.01) for x in (0.925, 0.927, 0.926)])
    result = run_main("compare.py", run_a, run_b)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines()
                if line.startswith("  test accuracy (%)"))
    assert line.startswith("  test accuracy (%): A 92.10, B 92.60, B - A +0.50 [")
    assert "(B higher); +0.50, +0.60, +0.40" in line
    assert "(no difference beyond the seeds' spread)" in run_main(
        "compare.py", run_a, run_a).stdout
    as_json = json.loads(run_main("compare.py", run_a, run_b, "--json").stdout)
    assert as_json["metrics"]["accuracy"]["difference"]["mean"] == pytest.approx(0.005)


@pytest.mark.parametrize("case,message", [
    ("no folder", "{a}/nothing is no folder: give two run folders of --seeds runs"),
    ("single run", "{single} is no run of several seeds (it has no seeds.json): give the "
                   "folder a `--seeds K` training wrote"),
    ("not evaluated", "{b}/seed-1 has no report.json: evaluate the run first (python "
                      "scripts/evaluate.py {b})"),
    ("one seed shared", "{a} (seeds 0, 1) and {b} (seeds 1, 2) share 1 seed: a paired "
                        "interval needs 2 or more; train both with the same --seed and --seeds"),
    ("other test set", "{a} and {b} were tested on different images (the test_sha256 of their "
                       "data.json differ): compare runs of the same data"),
    ("sweep", "{b} is a sweep: its points are compared in its sweep.json; give the folder of "
              "a `--seeds K` run"),
    ("report a list", "{b}/seed-1/report.json is malformed (not a JSON object): evaluate the "
                      "run again (python scripts/evaluate.py {b})"),
    ("report empty", "{b}/seed-1/report.json is malformed (no number accuracy): evaluate the "
                     "run again (python scripts/evaluate.py {b})"),
    ("report no ECE", "{b}/seed-1/report.json is malformed (no number after_temperature.ece): "
                      "evaluate the run again (python scripts/evaluate.py {b})"),
    ("report binary", "{b}/seed-1/report.json is malformed (not UTF-8 text: invalid start byte "
                      "at byte 0): evaluate the run again (python scripts/evaluate.py {b})"),
    ("seed deleted", "{b}/seed-1 is missing from the --seeds 2 run {b} (seeds.json lists it): "
                     "restore it from a copy of the run"),
])
def test_bad_compare_input_is_one_line(tmp_path, case, message, run_main):
    run_a = _seeds_run(tmp_path / "a", 0, [_report(0.92, 0.01), _report(0.93, 0.01)])
    single = tmp_path / "single"
    folder.claim(single, get_config()).release()
    b_args = {"not evaluated": dict(seed=0, reports=[_report(0.92, 0.01), None]),
              "one seed shared": dict(seed=1, reports=[_report(0.92, 0.01)] * 2),
              "other test set": dict(seed=0, reports=[_report(0.92, 0.01)] * 2,
                                     test_sha="b" * 64),
              "report a list": dict(seed=0, reports=[_report(0.92, 0.01), [1]]),
              "report empty": dict(seed=0, reports=[_report(0.92, 0.01), {}]),
              "report no ECE": dict(seed=0, reports=[_report(0.92, 0.01), {
                  **_report(0.92, 0.01), "after_temperature": {"nll": 0.2}}])}
    if case == "sweep":
        run_b = tmp_path / "b"
        folder.claim(run_b, get_config(optimizer="adamw", seeds=2,
                                       sweep="learning_rate=0.001,0.003")).release()
    else:
        run_b = _seeds_run(tmp_path / "b", **b_args.get(case, dict(
            seed=0, reports=[_report(0.92, 0.01)] * 2)))
    if case == "report binary":
        (run_b / "seed-1" / folder.REPORT_JSON_FILE).write_bytes(b"\xff\xfe\x00garbage")
    if case == "seed deleted":
        shutil.rmtree(run_b / "seed-1")
    first = {"no folder": tmp_path / "a" / "nothing", "single run": single}.get(case, run_a)
    result = run_main("compare.py", first, run_b)
    assert one_error_line(result) == "error: " + message.format(a=run_a, b=run_b, single=single)
