"""scripts/export.py: every format against predict, reproducible bytes, the one-line errors,
and predict reading a StableHLO file."""

import errno
import importlib
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from fmnist_jax.cli import export_main, predict_main
from fmnist_jax.data import Normalization
from fmnist_jax.errors import FmnistError
from fmnist_jax.evaluation import export, export_onnx, predict
from fmnist_jax.models import MODELS, get_model
from fmnist_jax.run import folder
from fmnist_jax.run.presets import get_config
from fmnist_jax.steps import init_variables
from tests.helpers import REPO, one_error_line


@pytest.fixture(scope="module")
def images_37():
    return np.random.default_rng(0).integers(0, 256, (37, 28, 28, 1)).astype(np.uint8)


def run_export(capsys, *argv) -> tuple[int, str]:
    """export_main in this process: (exit status, its stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def random_predictor(model: str) -> predict.Predictor:
    """A Predictor of `model` with random weights, BatchNorm statistics and a temperature
    other than 1: every part of the exported function shows in its outputs."""
    variables = jax.tree_util.tree_map(np.asarray, init_variables(get_model(model),
                                                                  jax.random.key(1)))
    rng = np.random.default_rng(2)
    for stats in variables.get("batch_stats", {}).values():
        stats["mean"] = rng.normal(0, 0.5, stats["mean"].shape).astype(np.float32)
        stats["var"] = rng.uniform(0.5, 2.0, stats["var"].shape).astype(np.float32)
    return predict.Predictor(config=get_config(model=model), variables=variables,
                             normalization=Normalization(0.29, 0.35),
                             calibration={"kind": "temperature", "temperature": 1.7},
                             calibrated=True, epoch=3)


def test_every_model_has_an_onnx_graph():
    assert set(export_onnx.BUILDERS) == set(MODELS)


# Fast: LeNet-5 (the default); the other models' graphs (the MLP's with BatchNorm's
# statistics) are slow, CI runs them.
@pytest.mark.parametrize("model", [pytest.param(m, marks=() if m == "lenet5"
                                                else pytest.mark.slow) for m in sorted(MODELS)])
def test_stablehlo_and_onnx_equal_predict_for_every_model(model, images_37):
    ort = pytest.importorskip("onnxruntime")
    predictor = random_predictor(model)
    want_NxC = predict.predict_probs(predictor, images_37)
    exported = jax.export.deserialize(bytearray(export.export_stablehlo(predictor)))
    for n in (1, 37):
        np.testing.assert_allclose(np.asarray(exported.call(images_37[:n])), want_NxC[:n],
                                   atol=1e-5, rtol=0)
    onnx_bytes, meta = export_onnx.export_onnx(predictor, logits=True)
    session = ort.InferenceSession(onnx_bytes)
    probs_NxC, logits_NxC = session.run(None, {"images": images_37})
    np.testing.assert_allclose(probs_NxC, want_NxC, atol=1e-5, rtol=0)
    np.testing.assert_allclose(jax.nn.softmax(logits_NxC / 1.7), want_NxC, atol=1e-5, rtol=0)
    assert meta["opset"] == export_onnx.OPSET and meta["outputs"] == ["probabilities", "logits"]


@pytest.mark.slow
def test_stablehlo_of_a_run_is_reproducible_and_runs_with_jax_alone(tiny_run, tmp_path,
                                                                     images_37, capsys):
    run_dir = tiny_run[0]
    first, again = tmp_path / "a.stablehlo", tmp_path / "b.stablehlo"
    for out in (first, again):
        assert run_export(capsys, run_dir, "--format", "stablehlo", "--out", out,
                          "--logits")[0] == 0
    assert first.read_bytes() == again.read_bytes()
    assert (export.meta_path(first).read_bytes() == export.meta_path(again).read_bytes())
    # From another caller too: no source location (a path, a line) goes into the file.
    predictor = predict.load_predictor(run_dir)
    assert export.export_stablehlo(predictor, logits=True) == first.read_bytes()
    meta = json.loads(export.meta_path(first).read_text())
    assert meta["format"] == "stablehlo" and meta["model"] == "lenet5"
    assert meta["temperature"] == 1.0 and meta["calibrated"] is False  # no validation split
    assert len(meta["class_names"]) == 10 and meta["input"]["shape"] == ["N", 28, 28, 1]
    assert meta["params_sha256"] == export.params_sha256(predictor.variables)
    np.save(tmp_path / "images.npy", images_37)
    # A fresh process that imports only jax and numpy: the file is all it needs.
    loader = ("import sys, jax, numpy as np\n"
              f"exported = jax.export.deserialize(open({str(first)!r}, 'rb').read())\n"
              f"images = np.load({str(tmp_path / 'images.npy')!r})\n"
              "for n in (1, 37):\n"
              "    probs, logits = exported.call(images[:n])\n"
              f"    np.save({str(tmp_path)!r} + f'/probs{{n}}.npy', probs)\n"
              "assert not any(m.split('.')[0] in ('flax', 'fmnist_jax', 'orbax') "
              "for m in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    want_NxC = predict.predict_probs(predict.load_predictor(run_dir), images_37)
    for n in (1, 37):
        np.testing.assert_allclose(np.load(tmp_path / f"probs{n}.npy"), want_NxC[:n],
                                   atol=1e-5, rtol=0)


def test_torch_state_dict_gives_the_same_logits(tiny_run, tmp_path, images_37, capsys):
    torch = pytest.importorskip("torch")
    run_dir = tiny_run[0]
    outs = [tmp_path / "a.pt", tmp_path / "b" / "model.pt"]
    outs[1].parent.mkdir()
    for out in outs:
        assert run_export(capsys, run_dir, "--format", "torch", "--out", out)[0] == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    meta = json.loads(export.meta_path(outs[0]).read_text())
    module, name = meta["torch_class"].rsplit(".", 1)
    model = getattr(importlib.import_module(module), name)()
    model.load_state_dict(torch.load(outs[0], weights_only=True))
    norm = meta["normalization"]
    x = (torch.from_numpy(images_37).float() / 255 - norm["mean"]) / norm["std"]
    with torch.no_grad():
        logits_NxC = model(x.permute(0, 3, 1, 2)).numpy()
    predictor = predict.load_predictor(run_dir)
    want_NxC = np.asarray(export.inference_fn(predictor, logits=True)(images_37)[1])
    np.testing.assert_allclose(logits_NxC, want_NxC, atol=1e-5, rtol=0)


def test_onnx_of_a_run_is_reproducible(tiny_run, tmp_path, capsys):
    pytest.importorskip("onnx")
    for out in ("a.onnx", "b.onnx"):
        assert run_export(capsys, tiny_run[0], "--format", "onnx", "--out",
                          tmp_path / out)[0] == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_predict_reads_a_stablehlo_file_with_the_same_output(tiny_run, tmp_path, images_37,
                                                             capsys):
    run_dir = tiny_run[0]
    out = tmp_path / "m.stablehlo"
    assert run_export(capsys, run_dir, "--format", "stablehlo", "--out", out)[0] == 0
    np.save(tmp_path / "images.npy", images_37)
    documents = []
    for source in (run_dir, out):
        with pytest.raises(SystemExit) as exit_info:
            predict_main([str(source), str(tmp_path / "images.npy"), "--json", "--top-k", "10"])
        assert exit_info.value.code == 0
        documents.append(json.loads(capsys.readouterr().out))
    from_run, from_file = documents
    assert from_file.pop("run_dir") == str(out) and from_run.pop("run_dir") == str(run_dir)
    assert from_file.keys() == from_run.keys() and from_file["epoch"] == from_run["epoch"]
    for a, b in zip(from_run["results"], from_file["results"]):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in a["predictions"]],
                                   [p["probability"] for p in b["predictions"]], atol=1e-5)


# ---------------------------------------------------------------------------------------
# One line for each bad request, before any weight is read


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run[0], copy)
    return copy


def test_an_unfinished_run_is_refused(run_copy, run_main):
    (run_copy / "best.json").unlink()
    line = one_error_line(run_main("export.py", run_copy, "--format", "stablehlo"))
    assert line == (f"error: {run_copy} holds an unfinished run (checkpoints up to epoch 2): "
                    f"continue it with `python scripts/train.py --resume {run_copy}`")


def test_a_seed_of_an_unfinished_seeds_run_names_the_resume_of_the_whole_run(tmp_path,
                                                                            run_main):
    whole = tmp_path / "seeds"
    folder.claim(whole, get_config(seeds=2)).release()
    line = one_error_line(run_main("export.py", whole / "seed-1", "--format", "stablehlo"))
    assert line == (f"error: {whole / 'seed-1'} holds an unfinished run (no checkpoint yet): "
                    f"continue it with `python scripts/train.py --resume {whole}`")


def test_a_folder_where_the_json_goes_is_refused_before_anything_is_written(run_copy,
                                                                           run_main):
    (run_copy / "model.stablehlo.json").mkdir()
    line = one_error_line(run_main("export.py", run_copy, "--format", "stablehlo",
                                   "--overwrite"))
    assert line == (f"error: --out {run_copy / 'model.stablehlo'}: "
                    f"{run_copy / 'model.stablehlo.json'}, where its JSON goes, is a folder: "
                    f"move it away or pass another --out")
    assert not (run_copy / "model.stablehlo").exists()


def test_a_failed_write_keeps_the_old_export_whole(tmp_path, monkeypatch):
    out = tmp_path / "m.stablehlo"
    out.write_bytes(b"old")
    export.meta_path(out).write_text("old json")
    real_write = export.write_atomically

    def full_disk_for_the_json(path, data):
        if path == export.meta_path(out):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(export, "write_atomically", full_disk_for_the_json)
    with pytest.raises(FmnistError, match=rf"^cannot write {out}.json \(No space left on "
                                          rf"device\): free some space"):
        export.write_export(out, b"new", {"format": "stablehlo"})
    assert out.read_bytes() == b"old" and export.meta_path(out).read_text() == "old json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.stablehlo", "m.stablehlo.json"]


def test_torch_refuses_a_model_the_baseline_lacks(run_copy, run_main):
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**config, "model": "mlp"}))
    line = one_error_line(run_main("export.py", run_copy, "--format", "torch"))
    assert "cannot carry the 'mlp' model" in line and "stablehlo or onnx" in line
    assert not (run_copy / "model.pt").exists()


def test_an_existing_out_is_kept_without_overwrite(run_copy, run_main):
    out = run_copy / "model.stablehlo"
    out.write_bytes(b"mine")
    line = one_error_line(run_main("export.py", run_copy, "--format", "stablehlo"))
    assert "already exists" in line and "--overwrite" in line
    assert out.read_bytes() == b"mine"
    assert run_main("export.py", run_copy, "--format", "stablehlo",
                    "--overwrite").returncode == 0
    assert out.read_bytes() != b"mine"


def test_a_missing_onnx_names_the_extra(run_copy, run_main, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    line = one_error_line(run_main("export.py", run_copy, "--format", "onnx"))
    assert "pip install 'fmnist_jax[onnx]'" in line
    assert not (run_copy / "model.onnx").exists()


def test_a_missing_flatbuffers_is_named_by_export_and_predict(run_copy, tmp_path, run_main,
                                                              monkeypatch):
    """jax's export serialization imports flatbuffers without depending on it."""
    monkeypatch.setitem(sys.modules, "flatbuffers", None)
    line = one_error_line(run_main("export.py", run_copy, "--format", "stablehlo"))
    assert "need the flatbuffers package" in line and "pip install flatbuffers" in line
    assert not (run_copy / "model.stablehlo").exists()
    (tmp_path / "m.stablehlo").write_bytes(b"bytes")
    (tmp_path / "m.stablehlo.json").write_text(json.dumps({"format": "stablehlo"}))
    line = one_error_line(run_main("predict.py", tmp_path / "m.stablehlo",
                                   REPO / "pyproject.toml"))
    assert "pip install flatbuffers" in line


def test_predict_refuses_a_stablehlo_file_without_its_json(tmp_path, run_main):
    (tmp_path / "m.stablehlo").write_bytes(b"not one")
    line = one_error_line(run_main("predict.py", tmp_path / "m.stablehlo",
                                   REPO / "pyproject.toml"))
    assert "has no m.stablehlo.json beside it" in line


def test_predict_of_an_image_given_first_asks_for_the_run_folder(tmp_path, run_main):
    (tmp_path / "shirt.png").write_bytes(b"a picture")
    line = one_error_line(run_main("predict.py", tmp_path / "shirt.png", "images.npy"))
    assert line == (f"error: {tmp_path / 'shirt.png'} is not a run folder or a .stablehlo "
                    f"file: pass the run folder (or an exported .stablehlo file) first, then "
                    f"the images")


@pytest.mark.parametrize("flags, message", [
    (["--format", "torch", "--logits"], "--logits is for stablehlo and onnx"),
    (["--format", "stablehlo", "--out", "{run}"], "is a folder"),
    (["--format", "stablehlo", "--out", "{run}/nowhere/m.stablehlo"], "does not exist"),
])
def test_a_bad_export_request_is_one_line_and_writes_nothing(run_copy, run_main, flags, message):
    before = sorted(p.name for p in run_copy.iterdir())
    flags = [flag.replace("{run}", str(run_copy)) for flag in flags]
    assert message in one_error_line(run_main("export.py", run_copy, *flags))
    assert sorted(p.name for p in run_copy.iterdir()) == before
