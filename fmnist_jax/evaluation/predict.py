"""Predict the clothing class of image files with a trained run folder.

    predictor = load_predictor("runs/lenet5-seed0-...")
    images_NxHxWx1 = load_images("shirt.jpg", dark_on_light=True)  # a photo on white
    probs_NxC = predict_probs(predictor, images_NxHxWx1)
    top_k(probs_NxC, 3)  # [[("Shirt", 0.81), ("T-shirt/top", 0.11), ("Pullover", 0.05)]]

The model only ever saw Fashion-MNIST: a 28x28 grey garment, light on a black background,
filling the frame. `load_images` brings any picture to that form (grey, padded to a square
so the garment keeps its aspect ratio, resized to 28x28); `dark_on_light=True` inverts
ordinary photos and product shots, whose garment is darker than their white background.
The model still sees nothing like a photo in training, so expect lower confidence there.

Probabilities are the softmax of the run's calibration map applied to the logits (the map
in calibration.json, fit on its validation split by the evaluation: temperature, vector or
Dirichlet, see `calibration.apply_calibration`); without one they are the raw softmax, which
is usually overconfident. A temperature never changes the ranking of the classes; vector and
Dirichlet maps can.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist_jax.run import checkpoints, folder, results
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.data import CLASS_NAMES, Normalization
from fmnist_jax.evaluation.calibration import apply_calibration, identity_map
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.steps import inference_state, predict_logits

IMAGE_SIZE = 28
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file, whatever its name
# The picture formats predict opens (PIL format names; PPM covers PGM and PBM too). Any other
# format PIL knows is refused before its decoder runs: fewer decoders, fewer surprises.
PICTURE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# A picture larger than this is refused from its header, before decoding: 64 megapixels is
# more than any camera photo, and a 13000x13000 16-bit PNG would take gigabytes to decode.
MAX_PICTURE_PIXELS = 64_000_000
# A picture with a side under this is refused: enlarged to the 28x28 the model sees, it gains
# no detail, and a garment's shape (sleeves, straps, a heel) needs more pixels than that to
# be drawn at all; such files are icons, tracking pixels or mistakes.
MIN_PICTURE_SIDE = 8
NPY_ACCEPTED = ("uint8 (or integers in 0..255) or floats in [0, 1], of shape (28, 28), "
                "(28, 28, 1), (N, 28, 28) or (N, 28, 28, 1)")


# ---------------------------------------------------------------------------------------
# Images in


def load_image(path: str | Path, *, dark_on_light: bool = False) -> np.ndarray:
    """One image file as uint8 (28, 28, 1), light on dark like Fashion-MNIST.

    See `load_images`; a file holding several images (an .npy batch) is refused here.
    """
    images_NxHxWx1 = load_images(path, dark_on_light=dark_on_light)
    if len(images_NxHxWx1) != 1:
        raise FmnistError(f"{path}: holds {len(images_NxHxWx1)} images, not one: use "
                          f"load_images for a batch")
    return images_NxHxWx1[0]


def load_images(path: str | Path, *, dark_on_light: bool = False) -> np.ndarray:
    """The images of one file as uint8 (N, 28, 28, 1), in Fashion-MNIST's convention.

    A picture in one of PICTURE_FORMATS (PNG, JPEG, BMP, GIF, TIFF, WEBP, PPM/PGM; each
    side at least MIN_PICTURE_SIDE, up to MAX_PICTURE_PIXELS; colour, grey or with alpha) gives
    N = 1. A NumPy `.npy` file (recognised by its header, not its name) gives its N images;
    see NPY_ACCEPTED. `dark_on_light=True` inverts every image (255 - x), .npy included:
    pass it for photos of garments on a light background. Every problem with the file is an
    FmnistError that starts with the path and says what to do.
    """
    path = Path(path)
    head = _read_head(path)
    if head.startswith(NPY_MAGIC):
        images_NxHxWx1 = _npy_images(path)
        return 255 - images_NxHxWx1 if dark_on_light else images_NxHxWx1
    if path.suffix.lower() == ".npy":
        raise FmnistError(f"{path}: not a NumPy .npy file (no .npy header): save the array "
                          f"with numpy.save")
    return _picture(path, dark_on_light)[None]


def _read_head(path: Path) -> bytes:
    """The file's first bytes; the user errors a path can have, before any decoder sees it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        raise FmnistError(f"{path}: no such file: check the path") from e
    except OSError as e:
        raise FmnistError(f"{path}: cannot be read ({e.strerror}): check the path") from e
    if stat.S_ISDIR(mode):
        raise FmnistError(f"{path}: is a folder, not an image file: pass the files inside it")
    if not stat.S_ISREG(mode):  # a FIFO or a device: opening or reading it can block forever
        raise FmnistError(f"{path}: is not a regular file (a pipe, socket or device): save "
                          f"the image to a file and pass that")
    try:
        with path.open("rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise FmnistError(f"{path}: cannot be read ({e.strerror}): check its permissions") from e
    if not head:
        raise FmnistError(f"{path}: the file is empty (0 bytes): export or copy it again")
    return head


def _picture(path: Path, dark_on_light: bool) -> np.ndarray:
    """A picture file -> uint8 (28, 28, 1): grey, square-padded, resized, light on dark."""
    too_large = (f"{path}: the picture is larger than {MAX_PICTURE_PIXELS // 1_000_000} "
                 f"megapixels: resize it first (the model sees 28x28)")
    try:
        with warnings.catch_warnings():  # PIL warns on stderr above its own (higher) limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=PICTURE_FORMATS)
        with img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > MAX_PICTURE_PIXELS:
                raise FmnistError(f"{too_large} ({width}x{height})")
            if min(width, height) < MIN_PICTURE_SIDE:
                raise FmnistError(f"{path}: the picture is {width}x{height} pixels, too small "
                                  f"to show a garment: pass one at least {MIN_PICTURE_SIDE}x"
                                  f"{MIN_PICTURE_SIDE} (the model sees 28x28; enlarging a "
                                  f"smaller one adds no detail)")
            img.load()  # decode now: a truncated or damaged file fails here, not later
            img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
            grey_HxW = _grey(img, background=255 if dark_on_light else 0)
    except UnidentifiedImageError as e:
        raise FmnistError(f"{path}: not an image file in a supported format: pass a PNG, JPEG, BMP, GIF, "
                          f"TIFF, WEBP or PPM/PGM picture or a .npy array") from e
    except Image.DecompressionBombError as e:  # PIL's own limit, checked inside open
        raise FmnistError(too_large) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise FmnistError(f"{path}: the image is damaged or unsupported ({type(e).__name__}: "
                          f"{e}): open it in an image viewer and save it again as PNG") from e
    square_HxW = _pad_to_square(grey_HxW)
    small = Image.fromarray(square_HxW).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS,
                                               reducing_gap=3.0)
    image_HxW = np.asarray(small, dtype=np.uint8)
    if dark_on_light:
        image_HxW = 255 - image_HxW
    return image_HxW[:, :, None]


def _grey(img: Image.Image, background: int) -> np.ndarray:
    """uint8 (H, W) luma. Transparent parts are composited on `background`: the colour that
    ends up black after the optional inversion, as Fashion-MNIST's background is."""
    if img.mode.startswith("I"):
        # 16- or 32-bit grey (16-bit PNGs, TIFFs): PIL's convert("L") would clip at 255, so
        # scale instead; a 32-bit image with values up to 255 is taken as 8-bit already.
        values = np.asarray(img, dtype=np.float64)
        is_8_bit = img.mode == "I" and values.max(initial=0) <= 255
        scale = 1.0 if is_8_bit else 255.0 / 65535.0
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0  # float pictures are often 0..1
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (background, background, background, 255))
        img = Image.alpha_composite(flat, rgba)
    return np.asarray(img.convert("RGB").convert("L"), dtype=np.uint8)


def _pad_to_square(grey_HxW: np.ndarray) -> np.ndarray:
    """Pad the short side with the median colour of the border, centred, so that resizing to
    28x28 keeps the garment's aspect ratio and the padding blends with the background."""
    h, w = grey_HxW.shape
    if h == w:
        return grey_HxW
    border = np.concatenate([grey_HxW[0], grey_HxW[-1], grey_HxW[:, 0], grey_HxW[:, -1]])
    fill = int(np.rint(np.median(border)))
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square_HxW = np.full((side, side), fill, np.uint8)
    square_HxW[top:top + h, left:left + w] = grey_HxW
    return square_HxW


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an .npy file's header claims, checked against the file's size
    before any array is allocated: a 100-byte file claiming a billion images is refused here
    instead of asking for gigabytes of memory."""
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # 3.0 only differs for structured dtypes, which are refused anyway
                raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
            data_offset = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise FmnistError(f"{path}: the .npy header is damaged ({e}): save the array again "
                          f"with numpy.save") from e
    if dtype.hasobject:
        raise FmnistError(f"{path}: the .npy file holds Python objects: save a plain numeric "
                          f"array with numpy.save")
    needed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    present = os.path.getsize(path) - data_offset
    if needed > present:
        raise FmnistError(f"{path}: the .npy header claims shape {shape} of {dtype} "
                          f"({needed:,} bytes) but the file holds {present:,}: the file is "
                          f"truncated or damaged; save the array again with numpy.save")
    return shape, dtype


def _npy_images(path: Path) -> np.ndarray:
    """An .npy array -> uint8 (N, 28, 28, 1); anything else is refused, not guessed."""
    _npy_header(path)
    try:
        array = np.load(path, allow_pickle=False)  # never unpickle: a .npy may come from anyone
    except (ValueError, OSError, EOFError) as e:
        raise FmnistError(f"{path}: the .npy file is damaged or holds Python objects "
                          f"({e}): save a plain numeric array with numpy.save") from e

    def refuse(why: str) -> FmnistError:
        return FmnistError(f"{path}: array of shape {array.shape} and dtype {array.dtype} "
                           f"{why}: save {NPY_ACCEPTED}")

    s = IMAGE_SIZE
    if array.shape in ((s, s), (s, s, 1)):
        array_NxHxW = array.reshape(1, s, s)
    elif array.ndim == 3 and array.shape[1:] == (s, s):
        array_NxHxW = array
    elif array.ndim == 4 and array.shape[1:] == (s, s, 1):
        array_NxHxW = array[..., 0]
    else:
        raise refuse("is not a 28x28 image or a batch of them")
    if array_NxHxW.shape[0] == 0:
        raise refuse("holds no images")
    if array.dtype == np.uint8:
        images_NxHxW = array_NxHxW
    elif np.issubdtype(array.dtype, np.integer):
        if array_NxHxW.min() < 0 or array_NxHxW.max() > 255:
            raise refuse(f"has values {array_NxHxW.min()}..{array_NxHxW.max()}, outside 0..255")
        images_NxHxW = array_NxHxW.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array_NxHxW)):
            raise refuse("has NaN or infinite values")
        lo, hi = float(array_NxHxW.min()), float(array_NxHxW.max())
        if lo < 0.0 or hi > 1.0:
            raise refuse(f"has float values {lo:g}..{hi:g}, outside [0, 1] (divide by 255?)")
        images_NxHxW = np.rint(array_NxHxW.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise refuse("is neither integer nor float")
    return np.ascontiguousarray(images_NxHxW[..., None])


# ---------------------------------------------------------------------------------------
# The model


@dataclasses.dataclass(frozen=True)
class Predictor:
    """Everything a prediction needs from a run folder, loaded once."""

    config: TrainConfig
    variables: dict  # {"params": ...} and "batch_stats" for BatchNorm models
    normalization: Normalization  # the mean/std the model was trained with
    calibration: dict  # the map applied to the logits (identity_map() when not calibrated)
    calibrated: bool  # whether `calibration` came from the run's calibration.json
    epoch: int | None = None  # the epoch whose parameters these are (None: an older run)

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def temperature(self) -> float | None:
        """T of a temperature map; None for the other maps."""
        return temperature_of(self.calibration)


def temperature_of(cal_map: dict) -> float | None:
    return float(cal_map["temperature"]) if cal_map["kind"] == "temperature" else None


def load_predictor(run_dir: str | Path) -> Predictor:
    """The model of a run folder written by scripts/train.py; FmnistError if it is not one,
    has no parameters, or its parameters belong to another model than its config.json says."""
    cfg = folder.load_config(run_dir)
    folder.check_finished(run_dir)  # an unfinished run is continued, not trained again
    variables = checkpoints.load_variables(run_dir, cfg)
    norm = folder.load_normalization(run_dir)
    cal_map = results.load_calibration(run_dir)
    best = checkpoints.load_best(run_dir)
    return Predictor(config=cfg, variables=variables, normalization=norm,
                     calibration=identity_map() if cal_map is None else cal_map,
                     calibrated=cal_map is not None,
                     epoch=None if best is None else best["epoch"])


def calibrated_probs(cal_map: dict, logits_NxC: jax.Array) -> jax.Array:
    """softmax of the calibrated logits: what predict and every export compute."""
    return jax.nn.softmax(apply_calibration(cal_map, logits_NxC), axis=-1)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def predict_probs(predictor: Predictor, images_NxHxWx1: np.ndarray) -> np.ndarray:
    """Class probabilities float32 (N, 10): softmax(calibrated logits), batch by batch.

    N is padded to a power of two (up to the run's eval batch size, then to whole batches),
    so that calls with different numbers of images reuse a handful of compilations.
    """
    images_NxHxWx1 = np.asarray(images_NxHxWx1)
    if images_NxHxWx1.ndim != 4 or images_NxHxWx1.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise FmnistError(f"images have shape {images_NxHxWx1.shape}, not (N, 28, 28, 1): "
                          f"load them with load_images")
    if images_NxHxWx1.dtype != np.uint8:  # a float image in [0, 1] would be silently black
        raise FmnistError(f"images have dtype {images_NxHxWx1.dtype}, not uint8 (0..255): "
                          f"load them with load_images")
    n = len(images_NxHxWx1)
    if n == 0:
        return np.zeros((0, len(CLASS_NAMES)), np.float32)
    if not isinstance(predictor, Predictor):  # a StableHLO file (export.ExportedModel)
        return predictor.probs(images_NxHxWx1)
    batch_size = min(predictor.config.eval_batch_size, _next_power_of_two(n))
    padded = -n % batch_size
    images_PxHxWx1 = np.pad(images_NxHxWx1, ((0, padded), (0, 0), (0, 0), (0, 0)))
    state = inference_state(get_model(predictor.config.model), predictor.variables)
    logits_PxC = predict_logits(state, images_PxHxWx1, batch_size=batch_size,
                                norm=predictor.normalization)
    probs_PxC = calibrated_probs(predictor.calibration, logits_PxC)  # a few small ops
    return np.asarray(probs_PxC)[:n]


def top_k(probs_NxC: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """For each image, its k most probable (class name, probability), most probable first;
    equal probabilities keep the class order of CLASS_NAMES."""
    probs_NxC = np.asarray(probs_NxC)
    if not 1 <= k <= len(CLASS_NAMES):
        raise FmnistError(f"top-k must be between 1 and {len(CLASS_NAMES)}, got {k}")
    order_NxK = np.argsort(-probs_NxC, axis=-1, kind="stable")[:, :k]
    return [[(CLASS_NAMES[c], float(row[c])) for c in order] for row, order in
            zip(probs_NxC, order_NxK)]


# ---------------------------------------------------------------------------------------
# Results out


def calibration_words(predictor: Predictor) -> str:
    """The map in a few words, for predict's first line: its kind, and T for a temperature."""
    if not predictor.calibrated:
        return "uncalibrated (T=1: raw softmax, often overconfident)"
    kind = predictor.calibration["kind"]
    if kind == "temperature":
        return f"calibrated (temperature scaling, T={predictor.temperature:.4g})"
    return f"calibrated ({'vector scaling' if kind == 'vector' else 'Dirichlet map'})"


def format_text(run_dir, predictor: Predictor, results: list[dict[str, Any]]) -> str:
    """The predictions as text: a header line, then each image's name and its top classes.

    Each result: {"file", "index", "images_in_file", "predictions": [(class, prob), ...]}.
    """
    epoch = "" if predictor.epoch is None else f" (epoch {predictor.epoch})"
    lines = [f"model {predictor.model_name}{epoch} from {run_dir}, "
             f"{calibration_words(predictor)}"]
    width = max(len(name) for name in CLASS_NAMES)
    for result in results:
        many = result["images_in_file"] > 1
        lines.append(result["file"] + (f" [{result['index']}]" if many else ""))
        lines += [f"  {name:<{width}}  {prob:.4f}" for name, prob in result["predictions"]]
    return "\n".join(lines)


def format_json(run_dir, predictor: Predictor, results: list[dict[str, Any]],
                errors: list[dict[str, str]], dark_on_light: bool) -> str:
    """The predictions and the files that failed as one JSON document."""
    document = {
        "run_dir": str(run_dir),
        "model": predictor.model_name,
        "epoch": predictor.epoch,
        "temperature": predictor.temperature,
        "calibration": predictor.calibration,
        "calibrated": predictor.calibrated,
        "dark_on_light": dark_on_light,
        "results": [{"file": r["file"], "index": r["index"],
                     "predictions": [{"class": name, "probability": prob}
                                     for name, prob in r["predictions"]]} for r in results],
        "errors": errors,
    }
    return json.dumps(document, indent=2)
