"""Prediction on image files (FR4): loading any picture or .npy, probabilities, the CLI."""

import io
import json
import os
import shutil
import struct
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from fmnist_jax import FmnistError
from fmnist_jax.run import checkpoints, folder, results
from fmnist_jax.data import CLASS_NAMES
from fmnist_jax.models import get_model
from fmnist_jax.evaluation.predict import (load_image, load_images, load_predictor, predict_probs,
                                top_k)
from fmnist_jax.cli import predict_main
from fmnist_jax.steps import inference_state, predict_logits
from tests.helpers import make_split


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """A real run folder (conftest's tiny run). No validation split, so there is no
    calibration.json and the run is uncalibrated whatever train.py learns."""
    return tiny_run[0]


@pytest.fixture(scope="module")
def images_3xHxWx1():
    return make_split(3, seed=7).images_NxHxWx1


def _save(path, array, mode=None, **kwargs):
    Image.fromarray(array, mode).save(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def logits_3xC(run_dir, images_3xHxWx1):
    """The logits through steps.predict_logits directly, as an independent reference."""
    cfg = folder.load_config(run_dir)
    state = inference_state(get_model(cfg.model), checkpoints.load_variables(run_dir, cfg))
    return np.asarray(predict_logits(state, images_3xHxWx1, batch_size=3,
                                     norm=folder.load_normalization(run_dir)))


# --- loading pictures -------------------------------------------------------------------

@pytest.mark.parametrize("name,mode,shape", [
    ("rgb.png", "RGB", (40, 90, 3)),
    ("rgba.png", "RGBA", (90, 40, 4)),
    ("grey.png", "L", (28, 28)),
    ("rgb.jpg", "RGB", (300, 200, 3)),
    ("grey.jpg", "L", (17, 50)),
    ("rgb.bmp", "RGB", (64, 64, 3)),
    ("grey.bmp", "L", (8, 120)),  # the thinnest accepted
    ("rgb.gif", "RGB", (30, 40, 3)),
    ("grey.tiff", "L", (33, 28)),
    ("rgb.webp", "RGB", (40, 40, 3)),
    ("rgb.ppm", "RGB", (28, 50, 3)),
    ("grey.pgm", "L", (28, 28)),
])
def test_any_picture_loads_to_one_28x28_grey_uint8_image(tmp_path, name, mode, shape):
    array = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    images = load_images(_save(tmp_path / name, array, mode))
    assert images.shape == (1, 28, 28, 1) and images.dtype == np.uint8
    assert load_image(tmp_path / name).shape == (28, 28, 1)


def test_a_28x28_grey_png_round_trips_exactly(tmp_path, images_3xHxWx1):
    path = _save(tmp_path / "x.png", images_3xHxWx1[0, :, :, 0])
    np.testing.assert_array_equal(load_image(path), images_3xHxWx1[0])


def test_non_square_pictures_are_padded_with_the_border_colour(tmp_path):
    grey_HxW = np.full((56, 28), 40, np.uint8)  # tall: a 28-wide strip is padded each side
    grey_HxW[10:46, 8:20] = 230
    image = load_image(_save(tmp_path / "tall.png", grey_HxW))[:, :, 0]
    assert (image[:, :5] == 40).all() and (image[:, -5:] == 40).all()  # padding = background
    assert image[14, 14] > 200  # the garment, halved in size, is still there


def test_dark_on_light_inverts(tmp_path, images_3xHxWx1):
    photo = _save(tmp_path / "photo.png", np.random.default_rng(1).integers(
        0, 256, (30, 45, 3)).astype(np.uint8))
    np.testing.assert_array_equal(load_images(photo, dark_on_light=True),
                                  255 - load_images(photo))
    np.save(tmp_path / "x.npy", images_3xHxWx1)
    np.testing.assert_array_equal(load_images(tmp_path / "x.npy", dark_on_light=True),
                                  255 - images_3xHxWx1)


def test_transparency_becomes_the_background_in_both_conventions(tmp_path):
    rgba = np.zeros((28, 28, 4), np.uint8)  # transparent, with an opaque grey square
    rgba[8:20, 8:20] = (128, 128, 128, 255)
    path = _save(tmp_path / "cutout.png", rgba, "RGBA")
    light_on_dark = load_image(path)[:, :, 0]
    dark_on_light = load_image(path, dark_on_light=True)[:, :, 0]
    assert light_on_dark[0, 0] == 0 and dark_on_light[0, 0] == 0  # black background both ways
    assert light_on_dark[14, 14] == 128 and dark_on_light[14, 14] == 127


# --- loading .npy -------------------------------------------------------------------------

def test_npy_shapes_and_dtypes(tmp_path, images_3xHxWx1):
    x = images_3xHxWx1
    cases = {
        "one_hw.npy": (x[0, :, :, 0], x[:1]),
        "one_hw1.npy": (x[0], x[:1]),
        "batch_nhw.npy": (x[..., 0], x),
        "batch_nhw1.npy": (x, x),
        "int64.npy": (x.astype(np.int64), x),
        "float01.npy": (x.astype(np.float32) / 255.0, x),
    }
    for name, (array, expected) in cases.items():
        np.save(tmp_path / name, array)
        images = load_images(tmp_path / name)
        assert images.dtype == np.uint8, name
        np.testing.assert_array_equal(images, expected, err_msg=name)


@pytest.mark.parametrize("array,message", [
    (np.zeros((3, 28, 27), np.uint8), r"shape \(3, 28, 27\) .* is not a 28x28 image"),
    (np.zeros((28, 28, 3), np.uint8), r"shape \(28, 28, 3\)"),
    (np.zeros((0, 28, 28), np.uint8), "holds no images"),
    (np.full((28, 28), 300), "outside 0..255"),
    (np.full((28, 28), 2.0), r"outside \[0, 1\]"),
    (np.full((28, 28), np.nan), "NaN"),
    (np.zeros((28, 28), bool), "dtype bool is neither integer nor float"),
])
def test_unsupported_npy_is_refused_naming_file_shape_and_dtype(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(FmnistError, match=message) as error:
        load_images(tmp_path / "bad.npy")
    assert str(error.value).startswith(str(tmp_path / "bad.npy"))
    assert "(N, 28, 28, 1)" in str(error.value)  # says what is accepted


def test_bad_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (100, 100, 3)).astype(
        np.uint8)).save(buffer, "PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:1000])
    (tmp_path / "pickle.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "objects.npy", np.array([{}], dtype=object), allow_pickle=True)
    for name, message in [("missing.png", "no such file"), ("empty.png", "empty"),
                          ("text.png", "not an image"), ("truncated.png", "damaged"),
                          ("pickle.npy", "not a NumPy .npy file"),
                          ("objects.npy", "holds Python objects"), (".", "is a folder")]:
        with pytest.raises(FmnistError, match=message) as error:
            load_images(tmp_path / name)
        assert str(error.value).startswith(str(tmp_path / name)), name


def _huge_png_header(width: int, height: int) -> bytes:
    """The first bytes of a 16-bit grey PNG of width x height: enough for PIL to read its
    size, far too little to decode (a real one would take gigabytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0,
                                                                0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)))


def test_hostile_files_are_refused_before_any_decoding(tmp_path):
    # A header claiming a billion images in a file of a few bytes.
    with open(tmp_path / "claims_1e9.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (10**9, 28, 28)})
        f.write(b"\0" * 100)
    (tmp_path / "huge.png").write_bytes(_huge_png_header(13000, 13000))
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block until a writer comes
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "old.pcx")
    for name, message in [("claims_1e9.npy", r"claims shape \(1000000000, 28, 28\)"),
                          ("huge.png", "larger than 64 megapixels"),
                          ("pipe.png", "not a regular file"),
                          ("old.pcx", "not an image file in a supported format")]:
        with pytest.raises(FmnistError, match=message) as error:
            load_images(tmp_path / name)
        assert str(error.value).startswith(str(tmp_path / name)), name


def test_cli_refuses_a_hostile_npy_and_still_predicts_the_others(tmp_path, run_dir, capsys,
                                                                 images_3xHxWx1):
    with open(tmp_path / "claims_1e9.npy", "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (10**9, 28, 28)})
    np.save(tmp_path / "three.npy", images_3xHxWx1)
    with pytest.raises(SystemExit) as exit_:
        predict_main([str(run_dir), str(tmp_path / "claims_1e9.npy"), str(tmp_path / "three.npy")])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {tmp_path / 'claims_1e9.npy'}: ")
    assert len(captured.err.splitlines()) == 1
    assert captured.out.count(str(tmp_path / "three.npy")) == 3


@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (7, 200), (300, 3)])
def test_a_picture_too_small_to_show_a_garment_is_refused(tmp_path, shape):
    path = _save(tmp_path / "tiny.png", np.full(shape, 200, np.uint8))
    height, width = shape
    with pytest.raises(FmnistError) as error:
        load_images(path)
    assert str(error.value) == (f"{path}: the picture is {width}x{height} pixels, too small to "
                                f"show a garment: pass one at least 8x8 (the model sees 28x28; "
                                f"enlarging a smaller one adds no detail)")
    assert load_images(_save(tmp_path / "small.png", np.full((8, 8), 200, np.uint8))).shape == (
        1, 28, 28, 1)


def test_cli_refuses_a_1x1_picture_and_still_predicts_the_others(tmp_path, run_dir, capsys,
                                                                 images_3xHxWx1):
    tiny = _save(tmp_path / "pixel.png", np.zeros((1, 1), np.uint8))
    good = _save(tmp_path / "good.png", images_3xHxWx1[0, :, :, 0])
    with pytest.raises(SystemExit) as exit_:
        predict_main([str(run_dir), str(tiny), str(good)])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == (f"error: {tiny}: the picture is 1x1 pixels, too small to show a "
                            f"garment: pass one at least 8x8 (the model sees 28x28; enlarging "
                            f"a smaller one adds no detail)\n")
    assert str(tiny) not in captured.out and captured.out.count(str(good)) == 1


def test_load_image_refuses_a_batch(tmp_path, images_3xHxWx1):
    np.save(tmp_path / "three.npy", images_3xHxWx1)
    with pytest.raises(FmnistError, match="holds 3 images"):
        load_image(tmp_path / "three.npy")


# --- predicting ---------------------------------------------------------------------------

def test_probabilities_sum_to_one_and_rank_as_the_logits(tmp_path, run_dir, images_3xHxWx1,
                                                         logits_3xC):
    predictor = load_predictor(run_dir)
    assert not predictor.calibrated and predictor.temperature == 1.0
    np.save(tmp_path / "three.npy", images_3xHxWx1)
    probs_NxC = predict_probs(predictor, load_images(tmp_path / "three.npy"))
    assert probs_NxC.shape == (3, len(CLASS_NAMES)) and probs_NxC.dtype == np.float32
    np.testing.assert_allclose(probs_NxC.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs_NxC, jax.nn.softmax(logits_3xC), rtol=1e-5, atol=1e-7)
    ranked = top_k(probs_NxC, 3)
    assert [row[0][0] for row in ranked] == [CLASS_NAMES[c] for c in logits_3xC.argmax(1)]
    for row, probs_C in zip(ranked, probs_NxC):
        assert [p for _, p in row] == sorted(np.sort(probs_C)[-3:].tolist(), reverse=True)
    # A PNG of the same pixels predicts the same as the array (4 images: no new compilation).
    png = _save(tmp_path / "first.png", images_3xHxWx1[0, :, :, 0])
    probs_4xC = predict_probs(predictor, np.concatenate([load_images(png), images_3xHxWx1]))
    np.testing.assert_allclose(probs_4xC[0], probs_NxC[0], rtol=1e-5, atol=1e-7)


def test_top_k_must_be_1_to_10():
    probs_1xC = np.full((1, 10), 0.1, np.float32)
    assert [name for name, _ in top_k(probs_1xC, 10)[0]] == list(CLASS_NAMES)  # ties: class order
    for k in (0, 11):
        with pytest.raises(FmnistError, match="top-k must be between 1 and 10"):
            top_k(probs_1xC, k)


def test_temperature_softens_the_probabilities_but_keeps_the_ranking(tmp_path, run_dir,
                                                                     images_3xHxWx1, logits_3xC):
    calibrated_dir = shutil.copytree(run_dir, tmp_path / "calibrated")
    results.save_calibration(calibrated_dir, {"kind": "temperature", "temperature": 2.0},
                             n_validation=100)
    plain, calibrated = load_predictor(run_dir), load_predictor(calibrated_dir)
    assert calibrated.calibrated and calibrated.temperature == 2.0
    probs_1 = predict_probs(plain, images_3xHxWx1)
    probs_2 = predict_probs(calibrated, images_3xHxWx1)
    np.testing.assert_allclose(probs_2, jax.nn.softmax(logits_3xC / 2.0),
                               rtol=1e-5, atol=1e-7)
    assert np.abs(probs_2 - probs_1).max() > 1e-3
    assert (probs_2.max(axis=1) <= probs_1.max(axis=1) + 1e-7).all()  # T > 1 is softer
    np.testing.assert_array_equal(np.argsort(-probs_1, axis=1, kind="stable"),
                                  np.argsort(-probs_2, axis=1, kind="stable"))


def test_a_bad_temperature_is_refused(tmp_path, run_dir):
    bad_dir = shutil.copytree(run_dir, tmp_path / "bad")
    (bad_dir / folder.CALIBRATION_FILE).write_text('{"temperature": -1}')
    with pytest.raises(FmnistError, match="not a positive number"):
        load_predictor(bad_dir)
    (bad_dir / folder.CALIBRATION_FILE).write_text('{"temp')
    with pytest.raises(FmnistError, match="calibration.json is malformed"):
        load_predictor(bad_dir)
    (bad_dir / folder.CALIBRATION_FILE).write_bytes(b'\xff\xfe\x00garbage')
    with pytest.raises(FmnistError, match=r"calibration.json is malformed \(not UTF-8 text"):
        load_predictor(bad_dir)


# --- the CLI ------------------------------------------------------------------------------

def _mixed_batch(tmp_path, images_3xHxWx1):
    """One good PNG, a text file named .png, an empty file and a missing path."""
    good = _save(tmp_path / "good.png", images_3xHxWx1[0, :, :, 0])
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    return [str(good), str(tmp_path / "text.png"), str(tmp_path / "empty.png"),
            str(tmp_path / "missing.png")]


def test_cli_reports_each_bad_file_and_still_predicts_the_good_one(tmp_path, run_dir,
                                                                    images_3xHxWx1, run_main):
    files = _mixed_batch(tmp_path, images_3xHxWx1)
    result = run_main("predict.py", run_dir, *files, "--top-k", "2")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "Traceback" not in result.stderr
    for line, bad in zip(errors, files[1:]):
        assert line.startswith(f"error: {bad}: ")
    lines = result.stdout.splitlines()
    assert "uncalibrated" in lines[0]
    assert lines[1] == files[0] and len(lines) == 4  # header, file, two classes
    expected = top_k(predict_probs(load_predictor(run_dir), images_3xHxWx1[:1]), 2)[0]
    for line, (name, prob) in zip(lines[2:], expected):
        assert line.strip().startswith(name)
        assert float(line.split()[-1]) == pytest.approx(prob, abs=1e-4)


def test_cli_json_is_one_parsable_document(tmp_path, run_dir, images_3xHxWx1, capsys):
    files = _mixed_batch(tmp_path, images_3xHxWx1)
    np.save(tmp_path / "three.npy", images_3xHxWx1)
    with pytest.raises(SystemExit) as exit_:
        predict_main([str(run_dir), *files, str(tmp_path / "three.npy"), "--json"])
    assert exit_.value.code == 1
    document = json.loads(capsys.readouterr().out)
    assert document["temperature"] == 1.0 and document["calibrated"] is False
    results = document["results"]
    assert [(r["file"], r["index"]) for r in results] == [
        (files[0], 0), *((str(tmp_path / "three.npy"), i) for i in range(3))]
    for r in results:
        assert len(r["predictions"]) == 3
        assert {p["class"] for p in r["predictions"]} <= set(CLASS_NAMES)
    assert results[0]["predictions"] == results[1]["predictions"]  # same pixels
    assert [e["file"] for e in document["errors"]] == files[1:]


def _one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        predict_main(argv)
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    return captured.err


def test_cli_run_folder_without_a_model_is_one_line(tmp_path, run_dir, capsys):
    broken = shutil.copytree(run_dir, tmp_path / "broken")
    (broken / folder.BEST_FILE).unlink()  # interrupted after its last checkpoint: resumable
    png = _save(tmp_path / "x.png", np.zeros((28, 28), np.uint8))
    assert _one_error_line(capsys, [str(broken), str(png)]) == (
        f"error: {broken} holds an unfinished run (checkpoints up to epoch 2): continue it "
        f"with `python scripts/train.py --resume {broken}`\n")
    assert "not a run folder" in _one_error_line(capsys, [str(tmp_path / "nowhere"), str(png)])
    assert "not a run folder" in _one_error_line(capsys, ["/nowhere-at-all", str(png)])


def test_cli_checkpoint_of_another_model_is_one_line(tmp_path, run_dir, capsys):
    other = shutil.copytree(run_dir, tmp_path / "other")
    config = json.loads((other / folder.CONFIG_FILE).read_text())
    (other / folder.CONFIG_FILE).write_text(json.dumps({**config, "model": "cnn"}))
    png = _save(tmp_path / "x.png", np.zeros((28, 28), np.uint8))
    assert "another model than 'cnn'" in _one_error_line(capsys, [str(other), str(png)])


@pytest.mark.parametrize("flags,message", [
    (["--top-k", "0"], "--top-k must be between 1 and 10"),
    (["--top-k", "three"], "invalid int value"),
    (["--colour"], "unrecognized arguments"),
])
def test_cli_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    assert message in _one_error_line(capsys, [str(tmp_path), "x.png", *flags])


def test_cli_needs_a_file(tmp_path, capsys):
    assert "required: FILE" in _one_error_line(capsys, [str(tmp_path)])
