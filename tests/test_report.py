import json

import numpy as np
import pytest

from fmnist_jax.run import checkpoints, folder, results
from fmnist_jax.run.presets import get_config
from fmnist_jax.evaluation.report import evaluate_run
from fmnist_jax.run.loop import train_and_evaluate
from tests.helpers import make_split, one_error_line


pytestmark = pytest.mark.slow  # trains, then compiles a dozen metrics: about 20 s


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train, test = make_split(600, seed=0), make_split(300, seed=1)
    cfg = get_config(epochs=2, batch_size=32, eval_batch_size=128, val_fraction=0.2)
    _, history = train_and_evaluate(cfg, run_dir, train=train, test=test,
                                    log_fn=lambda s: None, progress=False)
    report = evaluate_run(run_dir, train=train, test=test, n_resamples=200,
                          log_fn=lambda s: None, tta="flip")
    return run_dir, report, history, test


def test_flip_tta_is_reported_apart(evaluated_run):
    run_dir, report, _, test = evaluated_run
    tta = report["flip_tta"]
    assert tta["accuracy_without"] == report["accuracy"]
    assert 0 <= tta["accuracy"] <= 1 and tta["nll"] > 0
    assert "flip test-time augmentation (apart" in (run_dir / "report.txt").read_text()


def test_flip_tta_averages_each_image_with_its_mirror():
    from fmnist_jax.evaluation.report import flip_tta

    rng = np.random.default_rng(0)
    logits, flipped = rng.normal(size=(2, 50, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 50)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    probs = (softmax(logits) + softmax(flipped)) / 2
    got = flip_tta(logits, flipped, labels)
    assert got["accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == labels))
    assert got["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(50), labels])), rel=1e-5)
    assert got["accuracy_without"] == pytest.approx(np.mean(logits.argmax(-1) == labels))


def test_report_agrees_with_training_and_writes_its_files(evaluated_run):
    run_dir, report, history, test = evaluated_run
    # The report is about the best epoch's parameters (by validation accuracy): best.json.
    assert report["epoch"] == checkpoints.load_best(run_dir)["epoch"]
    assert report["accuracy"] == pytest.approx(history[report["epoch"] - 1]["test_accuracy"],
                                               abs=1e-9)
    low, high = report["accuracy_ci95"]
    assert low <= report["accuracy"] <= high
    assert report["n_validation"] == 120 and report["n_test"] == 300
    assert {"val_loss", "val_accuracy"} <= set(history[0])  # evaluated every epoch
    assert np.sum(report["confusion_matrix"]) == 300
    for name in (folder.REPORT_TEXT_FILE, folder.REPORT_JSON_FILE, *folder.PLOT_FILES.values(),
                 folder.CALIBRATION_FILE):
        assert (run_dir / name).stat().st_size > 0, name
    assert json.loads((run_dir / folder.REPORT_JSON_FILE).read_text())["temperature"] == report["temperature"]
    # The default map is temperature: calibration.json holds the report's T.
    assert results.load_calibration(run_dir) == {"kind": "temperature",
                                                 "temperature": report["temperature"]}
    assert report["temperature"] > 0 and report["calibration"]["chosen"] == "temperature"
    text = (run_dir / folder.REPORT_TEXT_FILE).read_text()
    assert "Ankle boot" in text and "macro avg" in text and "ECE" in text


def test_temperature_is_fit_on_validation_and_lowers_its_nll(evaluated_run):
    run_dir, report, _, _ = evaluated_run
    # Fitting T never raises the NLL of the split it was fit on; on the test split it
    # usually helps too, but that is what the report measures, not a law.
    assert report["after_temperature"]["nll"] <= report["before_temperature"]["nll"] + 0.05


def test_evaluate_script_on_a_folder_without_a_run(tmp_path, run_main):
    assert "not a run folder" in one_error_line(run_main("evaluate.py", tmp_path))


def test_report_gives_every_calibration_error_with_an_interval(evaluated_run):
    from fmnist_jax.evaluation.report import CALIBRATION_INTERVALS

    run_dir, report, _, _ = evaluated_run
    assert report["calibration_interval"] == {**dict.fromkeys(CALIBRATION_INTERVALS, "basic"),
                                              "debiased_l2_ce": "percentile"}
    for side in ("before_temperature", "after_temperature"):
        numbers = report[side]
        for name in CALIBRATION_INTERVALS:
            low, high = numbers[name + "_ci95"]
            assert 0 <= low <= high and 0 <= numbers[name] <= 1, (side, name)
        assert 1 <= numbers["ece_sweep_bins"] <= report["n_test"]
        assert 0 < numbers["smooth_ece_sigma"] <= 1
    text = (run_dir / folder.REPORT_TEXT_FILE).read_text()
    for row in ("ECE equal-mass", "ECE_sweep", "debiased l2-CE", "classwise ECE", "SmoothECE",
                "basic bootstrap"):
        assert row in text, row
    saved = json.loads((run_dir / folder.REPORT_JSON_FILE).read_text())
    assert saved["after_temperature"]["smooth_ece"] == report["after_temperature"]["smooth_ece"]


def test_the_reliability_figure_has_the_smooth_curve_and_its_band(evaluated_run):
    """report.json keeps the curve the figure draws: relplot's smoother of the test set at
    the SmoothECE bandwidth, inside its own band where the images are."""
    import jax
    import jax.numpy as jnp

    from fmnist_jax import metrics
    from fmnist_jax.evaluation.report import load_run
    from fmnist_jax.models import get_model
    from fmnist_jax.steps import inference_state, predict_logits

    run_dir, report, _, test = evaluated_run
    run = load_run(run_dir)
    logits_NxC = predict_logits(inference_state(get_model(run.config.model), run.variables),
                                jnp.asarray(test.images_NxHxWx1), batch_size=128,
                                norm=run.normalization)
    section = report["before_temperature"]
    curve = section["smooth_reliability"]
    want = metrics.smooth_reliability(jax.nn.softmax(logits_NxC), jnp.asarray(test.labels_N),
                                      jnp.float32(section["smooth_ece_sigma"]))
    np.testing.assert_allclose(curve["accuracy"], np.asarray(want), atol=1e-6)
    t, low, high = (np.asarray(curve[k]) for k in ("confidence", "ci95_low", "ci95_high"))
    assert len(t) == metrics.SMOOTH_CURVE_POINTS and np.all(low <= high + 1e-7)
    seen = (t >= curve["seen"][0]) & (t <= curve["seen"][1])
    inside = (low - 1e-6 <= want) & (want <= high + 1e-6)
    assert np.mean(inside[seen]) > 0.9
    assert curve["seen"][0] >= 0.1 - 1e-6  # the top-1 confidence of 10 classes


def test_calibration_intervals_correct_the_bias_of_a_calibrated_model():
    """Labels drawn from the model's own probabilities: the 15-bin ECE is pure upward bias.
    A percentile interval would lean above the estimate; the basic interval leans below."""
    import jax
    import jax.numpy as jnp

    from fmnist_jax.evaluation.report import compute_report

    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(300, 10)) * 2, jnp.float32)  # shapes as the run's
    probs = np.asarray(jax.nn.softmax(logits))
    labels = (probs.cumsum(1) > rng.random((300, 1))).argmax(1)
    report = compute_report(logits, labels, key=jax.random.key(0), n_resamples=200)
    before = report["before_temperature"]
    for name in ("ece", "ece_equal_mass"):
        low, high = before[name + "_ci95"]
        assert (low + high) / 2 < before[name], name


def test_the_report_compares_every_map_fit_on_validation(evaluated_run):
    """Each map's CV NLL on validation and its test numbers; "after" is the chosen map
    (temperature by default), whose test NLL equals its row of the comparison."""
    run_dir, report, _, _ = evaluated_run
    calibration = report["calibration"]
    table = calibration["maps"]
    assert set(table) == {"none", "temperature", "vector", "dirichlet"}
    for kind, row in table.items():
        assert row["cv_nll_validation"] >= 0 and 0 <= row["accuracy"] <= 1, kind
        assert {"nll", "brier", "ece", "smooth_ece", "predictions_changed"} <= set(row)
    assert table["temperature"]["predictions_changed"] == 0  # T never changes an argmax
    assert table["none"]["accuracy"] == pytest.approx(report["accuracy"], abs=1e-9)
    assert report["after_temperature"]["nll"] == pytest.approx(table["temperature"]["nll"],
                                                               rel=1e-5)
    assert calibration["recommended"] == min(
        ("temperature", "vector", "dirichlet"), key=lambda k: table[k]["cv_nll_validation"])
    text = (run_dir / folder.REPORT_TEXT_FILE).read_text()
    assert "CV NLL" in text and "the map to recommend: " + calibration["recommended"] in text


def test_the_calibration_bootstraps_in_one_program_give_the_bits_of_each_on_its_own():
    """Both bootstraps of the calibration figures run as one program: the figures to the bit
    of calling `bootstrap_ci` for each on its own, with the same key."""
    import jax
    import jax.numpy as jnp

    from fmnist_jax import metrics
    from fmnist_jax.evaluation.report import (CALIBRATION_INTERVALS, INTERVAL_METHODS,
                                              _calibration_errors, _calibration_metrics)

    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(300, 10)) * 2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 300))
    key = jax.random.key(3)
    got = _calibration_metrics(logits, labels, key, 100)
    probs = jax.nn.softmax(logits)
    errors = metrics.bootstrap_ci(_calibration_errors, key,
                                  *metrics.sort_by_confidence(probs, labels), n_resamples=100,
                                  ordered=True)
    curve = metrics.bootstrap_ci(metrics.smooth_reliability, jax.random.fold_in(key, 1),
                                 probs, labels, n_resamples=100,
                                 constants=(errors.point["smooth_ece_sigma"],))
    for name in CALIBRATION_INTERVALS:
        point, low, high = (float(bound[name]) for bound in errors)
        if INTERVAL_METHODS[name] == "basic":
            low, high = 2 * point - high, 2 * point - low
        assert (got[name], got[name + "_ci95"]) == (point, [max(0.0, low), max(0.0, high)])
    assert got["smooth_ece_sigma"] == float(errors.point["smooth_ece_sigma"])
    smooth = got["smooth_reliability"]
    assert (smooth["accuracy"], smooth["ci95_low"], smooth["ci95_high"]) == tuple(
        np.asarray(bound).tolist() for bound in curve)


def test_report_json_is_written_last_and_names_its_map(evaluated_run, monkeypatch):
    """A report stopped before its figures are written has no report.json: the run counts as
    not reported (`results.has_reports`), so a resume or evaluate.py writes it whole."""
    from fmnist_jax.evaluation import report as report_module

    run_dir, _, _, test = evaluated_run
    assert results.has_reports(run_dir) and results.has_reports(run_dir, "temperature")
    assert not results.has_reports(run_dir, "vector")
    (run_dir / "report.json").unlink()

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "_write_plots", stopped)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run_dir, train=make_split(600, seed=0), test=test, n_resamples=20,
                     log_fn=lambda s: None)
    assert (run_dir / "calibration.json").is_file() and not results.has_reports(run_dir)
