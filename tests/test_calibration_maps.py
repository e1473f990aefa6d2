"""Calibration maps beyond one temperature: fitting (vector scaling, Dirichlet with ODIR),
the one `apply_calibration`, calibration.json, and predict and every export applying the map."""

import importlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmnist_jax import metrics
from fmnist_jax.errors import FmnistError
from fmnist_jax.evaluation import calibration, export, export_onnx, predict
from fmnist_jax.run import folder, results
from tests.helpers import make_split, one_error_line
from tests.test_calibration import make_logits
from tests.test_export import random_predictor

C = 10


def miscalibrated(seed=0, n=1200):
    """Over-confident logits whose classes are also mis-scaled and shifted, so that each map
    (not only a temperature) has something to correct."""
    logits_NxC, labels_N = make_logits(seed, 3.0, n)
    rng = np.random.default_rng(seed + 100)
    scale_C, shift_C = rng.uniform(0.5, 1.5, C), rng.normal(0, 1.0, C)
    return (logits_NxC * scale_C + shift_C).astype(np.float32), labels_N


def random_map(kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "temperature":
        return {"kind": kind, "temperature": 1.7}
    if kind == "vector":
        return {"kind": kind, "w": rng.uniform(0.3, 2.0, C).tolist(),
                "b": rng.normal(0, 1, C).tolist()}
    return {"kind": kind, "W": (np.eye(C) * 1.5 + rng.normal(0, 0.3, (C, C))).tolist(),
            "b": rng.normal(0, 1, C).tolist()}


# --- fitting -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["temperature", *(pytest.param(kind, marks=pytest.mark.slow)
                                                   for kind in ("vector", "dirichlet"))])
def test_each_map_lowers_the_validation_nll_and_fits_to_the_same_bytes(kind):
    logits_NxC, labels_N = miscalibrated()
    cal_map, cv_nll = calibration.fit_and_score(kind, logits_NxC, labels_N)
    assert cal_map["kind"] == kind
    before = float(metrics.nll(jnp.asarray(logits_NxC), labels_N))
    after = float(metrics.nll(calibration.apply_calibration(cal_map, logits_NxC), labels_N))
    assert after < before - 0.05 and cv_nll < before, (before, after, cv_nll)
    again = calibration.fit_and_score(kind, logits_NxC, labels_N)
    assert json.dumps(again) == json.dumps((cal_map, cv_nll))  # deterministic to the byte


@pytest.mark.slow
def test_vector_map_beats_temperature_where_classes_are_mis_scaled():
    logits_NxC, labels_N = miscalibrated(1)
    nll_of = {kind: float(metrics.nll(calibration.apply_calibration(
        calibration.fit_calibration(kind, logits_NxC, labels_N), logits_NxC), labels_N))
        for kind in ("temperature", "vector")}
    assert nll_of["vector"] < nll_of["temperature"] - 0.01


@pytest.mark.parametrize("temperature", [0.5, 2.0, 1.7])
def test_vector_scaling_with_inverse_temperature_is_temperature_scaling(temperature):
    logits_NxC, _ = make_logits(0, 2.0, 50)
    vector = {"kind": "vector", "w": [1 / temperature] * C, "b": [0.0] * C}
    scaled = calibration.apply_calibration({"kind": "temperature",
                                            "temperature": temperature}, logits_NxC)
    mapped = calibration.apply_calibration(vector, logits_NxC)
    if temperature in (0.5, 2.0):  # 1 / T exact in binary: the same floats
        np.testing.assert_array_equal(mapped, scaled)
    np.testing.assert_allclose(jax.nn.softmax(mapped), jax.nn.softmax(scaled), rtol=1e-6,
                               atol=1e-7)


def test_identity_maps_change_no_probability():
    logits_NxC, _ = make_logits(2, 2.0, 50)
    want_NxC = jax.nn.softmax(logits_NxC)
    for kind in results.CALIBRATION_KINDS:
        got_NxC = jax.nn.softmax(calibration.apply_calibration(
            calibration.identity_map(kind), logits_NxC))
        np.testing.assert_allclose(got_NxC, want_NxC, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_dirichlet_with_huge_regularisation_is_diagonal_without_intercept():
    logits_NxC, labels_N = miscalibrated(3)
    ones_1xN = jnp.ones((1, len(labels_N)), jnp.float32)
    params = {}
    for lam in (1e-3, 1e6):
        fitted = calibration._fit_params("dirichlet", jnp.asarray(logits_NxC), labels_N,
                                         ones_1xN, jnp.float32([lam]), jnp.float32([lam]),
                                         calibration.LBFGS_STEPS)
        params[lam] = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), fitted)
    off_diagonal = ~np.eye(C, dtype=bool)
    assert np.abs(params[1e-3]["W"][off_diagonal]).max() > 0.05  # free: it uses them
    assert np.abs(params[1e6]["W"][off_diagonal]).max() < 1e-3
    assert np.abs(params[1e6]["b"]).max() < 1e-3
    # What is left scales each class's log-probability, unregularised: temperature-like.
    assert (np.diag(params[1e6]["W"]) > 0).all()


def test_fit_and_score_refuses_bad_requests():
    logits_NxC, labels_N = make_logits(0, 1.0, 20)
    with pytest.raises(FmnistError, match="unknown calibration map 'platt'"):
        calibration.fit_and_score("platt", logits_NxC, labels_N)
    with pytest.raises(FmnistError, match="at least 5 samples"):
        calibration.fit_and_score("vector", logits_NxC[:3], labels_N[:3])


# --- calibration.json ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["temperature", "vector", "dirichlet"])
def test_a_saved_map_loads_as_it_was(tmp_path, kind):
    cal_map = random_map(kind)
    results.save_calibration(tmp_path, {**cal_map, "odir_lambda": 0.1}, n_validation=600)
    saved = json.loads((tmp_path / folder.CALIBRATION_FILE).read_text())
    assert saved["fit_on"] == "validation" and saved["n_validation"] == 600
    assert results.load_calibration(tmp_path) == cal_map


def test_an_old_temperature_only_file_is_a_temperature_map(tmp_path):
    (tmp_path / folder.CALIBRATION_FILE).write_text('{"temperature": 1.5}\n')
    assert results.load_calibration(tmp_path) == {"kind": "temperature", "temperature": 1.5}
    assert results.load_calibration(tmp_path / "nowhere") is None


@pytest.mark.parametrize("fields, words", [
    ({"kind": "platt", "a": 1}, "kind 'platt' is none of"),
    ({"kind": "vector", "w": [1.0] * C}, "a vector map needs b"),
    ({"kind": "vector", "w": [1.0] * 9, "b": [0.0] * C}, "shape (10,)"),
    ({"kind": "dirichlet", "W": [[1.0] * C] * C, "b": ["x"] * C}, "a dirichlet map needs b"),
    ({"kind": "dirichlet", "W": [[1.0] * C] * 9, "b": [0.0] * C}, "shape (10, 10)"),
    ({"kind": "temperature", "temperature": float("nan")}, "finite"),
    ({"kind": "temperature", "temperature": 0.0}, "not a positive number"),
    ([1, 2], "kind None is none of"),
])
def test_a_malformed_file_is_one_fmnist_error_naming_it(tmp_path, fields, words):
    path = tmp_path / folder.CALIBRATION_FILE
    path.write_text(json.dumps(fields))
    with pytest.raises(FmnistError) as error:
        results.load_calibration(tmp_path)
    message = str(error.value)
    assert str(path) in message and words in message and "calibrate again" in message
    assert "\n" not in message


# --- predict and every export apply the map -----------------------------------------------

@pytest.fixture(scope="module")
def images_9():
    return np.random.default_rng(4).integers(0, 256, (9, 28, 28, 1)).astype(np.uint8)


@pytest.mark.parametrize("kind", ["vector", pytest.param("dirichlet", marks=pytest.mark.slow)])
def test_predict_and_every_export_apply_the_map(kind, images_9):
    ort = pytest.importorskip("onnxruntime")
    base = random_predictor("lenet5")
    predictor = predict.Predictor(config=base.config, variables=base.variables,
                                  normalization=base.normalization,
                                  calibration=random_map(kind), calibrated=True, epoch=3)
    assert kind.split("r")[0] in predict.calibration_words(predictor).lower()
    _, logits_NxC = export.inference_fn(predictor, logits=True)(images_9)
    want_NxC = np.asarray(jax.nn.softmax(calibration.apply_calibration(predictor.calibration,
                                                                       logits_NxC)))
    assert np.abs(want_NxC - jax.nn.softmax(logits_NxC)).max() > 1e-2  # the map shows
    np.testing.assert_allclose(predict.predict_probs(predictor, images_9), want_NxC,
                               atol=1e-5, rtol=0)
    exported = jax.export.deserialize(bytearray(export.export_stablehlo(predictor)))
    np.testing.assert_allclose(np.asarray(exported.call(images_9)), want_NxC, atol=1e-5,
                               rtol=0)
    onnx_bytes, _ = export_onnx.export_onnx(predictor)
    probs_NxC = ort.InferenceSession(onnx_bytes).run(None, {"images": images_9})[0]
    np.testing.assert_allclose(probs_NxC, want_NxC, atol=1e-5, rtol=0)
    meta = export.metadata_of(predictor, "onnx", onnx_bytes)
    assert meta["calibration"] == predictor.calibration and meta["temperature"] is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vector", "dirichlet"])
def test_torch_export_carries_the_map_that_predict_applies(kind, tiny_run, tmp_path, images_9,
                                                           run_main):
    torch = pytest.importorskip("torch")
    from benchmarks.check_export import torch_calibrated

    run_dir = shutil.copytree(tiny_run[0], tmp_path / "run")
    results.save_calibration(run_dir, random_map(kind), n_validation=100)
    out = tmp_path / "m.pt"
    assert run_main("export.py", run_dir, "--format", "torch", "--out", out).returncode == 0
    meta = json.loads(export.meta_path(out).read_text())
    assert meta["calibration"] == results.load_calibration(run_dir)
    from fmnist_jax.baseline.export_torch import TORCH_MAPS
    assert TORCH_MAPS[kind] in meta["load"]
    module, name = meta["torch_class"].rsplit(".", 1)
    model = getattr(importlib.import_module(module), name)()
    model.load_state_dict(torch.load(out, weights_only=True))
    norm = meta["normalization"]
    x = (torch.from_numpy(images_9).float() / 255 - norm["mean"]) / norm["std"]
    with torch.no_grad():
        probs_NxC = torch.softmax(torch_calibrated(model(x.permute(0, 3, 1, 2)),
                                                   meta["calibration"]), 1).numpy()
    want_NxC = predict.predict_probs(predict.load_predictor(run_dir), images_9)
    np.testing.assert_allclose(probs_NxC, want_NxC, atol=1e-5, rtol=0)
    # predict's first line names the map's kind
    np.save(tmp_path / "images.npy", images_9)
    first = run_main("predict.py", run_dir, tmp_path / "images.npy").stdout.splitlines()[0]
    assert ("vector scaling" if kind == "vector" else "Dirichlet map") in first


# --- the flag ------------------------------------------------------------------------------

def test_a_bad_calibration_flag_is_one_line(run_main, tmp_path):
    for script in ("evaluate.py", "train.py"):
        args = [tmp_path] if script == "evaluate.py" else []
        line = one_error_line(run_main(script, *args, "--calibration", "platt"))
        assert "--calibration: invalid choice: 'platt'" in line


@pytest.mark.slow
def test_the_calibration_flag_reaches_calibration_json(tmp_path, run_main, monkeypatch):
    from fmnist_jax import cli
    from fmnist_jax.run.presets import get_config
    from tests.helpers import train_quietly

    splits = make_split(400, seed=0), make_split(200, seed=1)
    cfg = get_config(epochs=1, batch_size=32, eval_batch_size=100, val_fraction=0.25, seed=4)
    train_quietly(cfg, tmp_path / "run", splits)
    monkeypatch.setattr(cli, "load_data", lambda args: splits)
    result = run_main("evaluate.py", tmp_path / "run", "--calibration", "vector",
                      "--resamples", "20")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / folder.CALIBRATION_FILE).read_text())
    assert saved["kind"] == "vector" and saved["n_validation"] == 100
    report = json.loads((tmp_path / "run" / folder.REPORT_JSON_FILE).read_text())
    assert report["calibration"]["chosen"] == "vector"
    assert report["calibration"]["map"] == results.load_calibration(tmp_path / "run")
    assert "calibrated (vector scaling)" in predict.calibration_words(
        predict.load_predictor(tmp_path / "run"))


@pytest.mark.parametrize("flags, message", [
    (["--val-fraction", "0"], "--calibration vector is fit on the validation split, and this "
                              "run holds none: pass --val-fraction > 0, or drop --calibration"),
    (["--no-report"], "--calibration vector is the report's map, and --no-report writes no "
                      "report"),
])
def test_a_map_train_would_never_fit_is_refused_before_the_run(flags, message, run_main,
                                                                tmp_path):
    result = run_main("train.py", "--calibration", "vector", *flags, "--workdir",
                      tmp_path / "run", "--data-dir", tmp_path / "none")
    assert message in one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_map_for_a_run_without_a_validation_split(tiny_run, run_main,
                                                                      tmp_path):
    def files():
        return {path: path.stat().st_mtime_ns for path in tiny_run[0].rglob("*")}
    before = files()
    result = run_main("evaluate.py", tiny_run[0], "--calibration", "dirichlet", "--data-dir",
                      tmp_path / "none")
    assert (f"--calibration dirichlet is fit on the validation split, and {tiny_run[0]} holds "
            f"none (val_fraction 0)") in one_error_line(result)
    assert files() == before  # refused before the data load: nothing written


def test_the_report_command_printed_for_several_processes_keeps_the_map():
    from fmnist_jax import cli

    assert cli.report_command("runs/r", "temperature") == "python scripts/evaluate.py runs/r"
    assert cli.report_command("runs/r", "dirichlet") == ("python scripts/evaluate.py runs/r "
                                                         "--calibration dirichlet")
