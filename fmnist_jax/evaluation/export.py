"""A run's model out of the training code: the checks every format shares, the StableHLO
format (`jax.export`), and the JSON written beside each exported file.

The StableHLO file is the whole inference as one serialized function: uint8 images
(N, 28, 28, 1), N symbolic, in; the run's normalization, its model and its calibration map
inside (`calibration.apply_calibration`, as predict applies it); the calibrated probabilities
out (and the raw logits with `logits=True`). The parameters are
constants of the function, so the file is all a user needs, with jax alone:

    import jax, numpy as np
    exported = jax.export.deserialize(open("model.stablehlo", "rb").read())
    probs_NxC = exported.call(images_NxHxWx1_uint8)

Every format's bytes depend only on the run folder (and the versions that wrote them): no
time, path or random name goes into a file, so exporting again gives the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmnist_jax.data import CLASS_NAMES
from fmnist_jax.errors import FmnistError
from fmnist_jax.evaluation.calibration import identity_map
from fmnist_jax.evaluation.predict import (Predictor, calibrated_probs, load_predictor,
                                           temperature_of)
from fmnist_jax.files import first_line, write_atomically
from fmnist_jax.layers import portable_formulations
from fmnist_jax.models import get_model
from fmnist_jax.run import folder
from fmnist_jax.steps import inference_state, predict_logits_step

FORMATS = ("stablehlo", "onnx", "torch")
SUFFIXES = {"stablehlo": ".stablehlo", "onnx": ".onnx", "torch": ".pt"}
META_SUFFIX = ".json"  # the JSON beside FILE is FILE + ".json"
# Where jax can run the StableHLO file: lowered for each (the portable formulations make
# one function for all).
PLATFORMS = ("cpu", "cuda")
INPUT_SPEC = {"name": "images", "dtype": "uint8", "shape": ["N", 28, 28, 1],
              "meaning": "Fashion-MNIST pixels 0..255, light garment on black"}


def meta_path(out: str | Path) -> Path:
    return Path(str(out) + META_SUFFIX)


def check_request(run_dir: str | Path, fmt: str, out: str | Path | None, *,
                  overwrite: bool) -> Path:
    """The cheap checks, before any weight is read: a finished run folder of one model, and
    an output path that is free (or `overwrite`). Returns the output path (default:
    RUN/model.SUFFIX)."""
    if fmt not in FORMATS:
        raise FmnistError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "stablehlo":
        require_flatbuffers()
    folder.load_config(run_dir)  # not a run: one line; a --seeds folder: names a member
    folder.check_finished(run_dir)
    path = Path(out) if out else Path(run_dir) / f"model{SUFFIXES[fmt]}"
    if path.is_dir():
        raise FmnistError(f"--out {path} is a folder: pass a file name, e.g. "
                          f"{path / ('model' + SUFFIXES[fmt])}")
    if meta_path(path).is_dir():  # --overwrite replaces files, never a folder
        raise FmnistError(f"--out {path}: {meta_path(path)}, where its JSON goes, is a "
                          f"folder: move it away or pass another --out")
    for existing in (path, meta_path(path)):
        if (existing.exists() or existing.is_symlink()) and not overwrite:
            raise FmnistError(f"--out {existing} already exists: pass another --out, delete "
                              f"it, or pass --overwrite")
    if not path.parent.is_dir():
        raise FmnistError(f"--out {path}: the folder {path.parent} does not exist: make it "
                          f"first")
    if not os.access(path.parent, os.W_OK):
        raise FmnistError(f"--out {path} cannot be written (the folder {path.parent} is not "
                          f"writable): pass another --out")
    return path


def require_flatbuffers() -> None:
    """FmnistError naming the package unless flatbuffers imports: jax's export serialization
    needs it, yet jax does not depend on it (TensorFlow and onnxruntime bring it)."""
    try:
        import flatbuffers  # noqa: F401
    except ImportError as e:
        raise FmnistError("StableHLO files need the flatbuffers package, which jax's export "
                          "serialization imports: pip install flatbuffers") from e


def params_sha256(variables: dict) -> str:
    """sha256 of the model's variables: every array's path, dtype, shape and bytes, in the
    tree's (sorted) order. The same weights give the same sum in any format's JSON."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in ("fmnist_jax", "jax", "jaxlib", "flax"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def metadata_of(predictor: Predictor, fmt: str, file_bytes: bytes, **extra: Any) -> dict:
    """The JSON beside an exported file: what it holds and how it was made."""
    return {
        "format": fmt,
        "model": predictor.config.model,
        "epoch": predictor.epoch,
        "class_names": list(CLASS_NAMES),
        "temperature": predictor.temperature,  # None unless the map is a temperature
        "calibration": predictor.calibration,
        "calibrated": predictor.calibrated,
        "normalization": {"mean": predictor.normalization.mean,
                          "std": predictor.normalization.std,
                          "formula": "(pixels / 255 - mean) / std"},
        "params_sha256": params_sha256(predictor.variables),
        "file_sha256": hashlib.sha256(file_bytes).hexdigest(),
        "versions": versions(),
        **extra,
    }


def write_export(path: Path, file_bytes: bytes, meta: dict) -> None:
    """The exported file and the JSON beside it, each written whole or not at all. The file
    is written under a staged name and renamed over `path` only once its JSON is written: a
    full disk leaves the old pair as it was. FmnistError naming the file on failure."""
    staged = path.with_name(f".{path.name}.staged-{os.getpid()}")
    target = path
    try:
        write_atomically(staged, file_bytes)
        target = meta_path(path)
        write_atomically(target, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        target = path
        os.replace(staged, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        raise FmnistError(f"cannot write {target} ({e.strerror or first_line(e)}): free some "
                          f"space or check the folder's permissions, then export again") from e


# ---------------------------------------------------------------------------------------
# StableHLO


def inference_fn(predictor: Predictor, *, logits: bool = False) -> Callable:
    """uint8 images (N, 28, 28, 1) -> probabilities (N, 10) [, logits (N, 10)]: the
    function predict computes, with the weights, normalization and map as constants."""
    state = inference_state(get_model(predictor.config.model), predictor.variables)
    norm, cal_map = predictor.normalization, predictor.calibration

    def infer(images_NxHxWx1):
        logits_NxC = predict_logits_step(state, images_NxHxWx1, norm)
        probs_NxC = calibrated_probs(cal_map, logits_NxC)
        return (probs_NxC, logits_NxC) if logits else probs_NxC

    return infer


def export_stablehlo(predictor: Predictor, *, logits: bool = False) -> bytes:
    """The serialized `jax.export` of `inference_fn`, for a symbolic batch size."""
    (n,) = jax.export.symbolic_shape("N")
    spec = jax.ShapeDtypeStruct((n, 28, 28, 1), jnp.uint8)
    # No source locations in the module: they would put this checkout's paths, and the
    # caller's line, into the file, and its bytes would differ from export to export.
    limit = jax.config.jax_traceback_in_locations_limit
    jax.config.update("jax_traceback_in_locations_limit", 0)
    try:
        with portable_formulations():
            exported = jax.export.export(jax.jit(inference_fn(predictor, logits=logits)),
                                         platforms=PLATFORMS)(spec)
    finally:
        jax.config.update("jax_traceback_in_locations_limit", limit)
    return bytes(exported.serialize())


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, *,
               overwrite: bool = False, logits: bool = False,
               exporters: dict[str, Callable] | None = None) -> Path:
    """Export the model of `run_dir` as `fmt` to `out` (default RUN/model.SUFFIX) with its
    JSON beside it; returns the path written. `exporters` maps the formats not made here
    (onnx, torch) to functions (predictor, logits) -> (bytes, extra JSON fields), with
    their own checks as `check(model, logits)` attributes, run before any weight is read."""
    path = check_request(run_dir, fmt, out, overwrite=overwrite)
    make = dict(exporters or {})
    make["stablehlo"] = lambda p, logits: (export_stablehlo(p, logits=logits), {
        "outputs": ["probabilities", "logits"] if logits else ["probabilities"],
        "input": INPUT_SPEC, "platforms": list(PLATFORMS),
        "load": "jax.export.deserialize(bytes).call(images)"})
    check = getattr(make[fmt], "check", None)
    if check is not None:
        check(folder.load_config(run_dir).model, logits)
    predictor = load_predictor(run_dir)
    file_bytes, extra = make[fmt](predictor, logits)
    write_export(path, file_bytes, metadata_of(predictor, fmt, file_bytes, **extra))
    return path


# ---------------------------------------------------------------------------------------
# predict with a StableHLO file


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """A StableHLO file and the JSON beside it, as predict uses them."""

    path: Path
    exported: Any  # jax.export.Exported
    meta: dict

    # What predict's output names, as a run folder's Predictor has it.
    model_name = property(lambda self: str(self.meta.get("model")))
    epoch = property(lambda self: self.meta.get("epoch"))
    calibrated = property(lambda self: bool(self.meta.get("calibrated")))

    @property
    def calibration(self) -> dict:
        """The map inside the file; an older JSON names only its temperature."""
        if "calibration" in self.meta:
            return self.meta["calibration"]
        return {**identity_map(), "temperature": float(self.meta.get("temperature", 1.0))}

    temperature = property(lambda self: temperature_of(self.calibration))

    def probs(self, images_NxHxWx1: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Probabilities (N, 10), batch by batch; N padded to a power of two (up to
        `batch_size`, then to whole batches) so that few batch sizes compile."""
        n = len(images_NxHxWx1)
        size = min(batch_size, 1 << max(n - 1, 0).bit_length())
        padded_PxHxWx1 = np.pad(images_NxHxWx1, ((0, -n % size), (0, 0), (0, 0), (0, 0)))
        parts = []
        for start in range(0, len(padded_PxHxWx1), size):
            out = self.exported.call(jnp.asarray(padded_PxHxWx1[start:start + size]))
            parts.append(np.asarray(out[0] if isinstance(out, (tuple, list)) else out))
        return np.concatenate(parts)[:n]


def load_exported(path: str | Path) -> ExportedModel:
    """A StableHLO file written by `export_stablehlo`, with its JSON; FmnistError naming
    what is wrong otherwise."""
    path = Path(path)
    meta_file = meta_path(path)
    if path.suffix != SUFFIXES["stablehlo"] and not meta_file.exists():
        # An image given first (the run folder forgotten), not an export renamed by --out.
        raise FmnistError(f"{path} is not a run folder or a {SUFFIXES['stablehlo']} file: pass "
                          f"the run folder (or an exported {SUFFIXES['stablehlo']} file) first, "
                          f"then the images")
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError as e:
        raise FmnistError(f"{path} has no {meta_file.name} beside it (the JSON export.py "
                          f"writes with it): export the run again") from e
    except (OSError, ValueError) as e:
        raise FmnistError(f"{meta_file} cannot be read ({type(e).__name__}): export the run "
                          f"again") from e
    if not isinstance(meta, dict) or meta.get("format") != "stablehlo":
        raise FmnistError(f"{path}: {meta_file.name} is not the JSON of a StableHLO export: "
                          f"pass a run folder or a .stablehlo file from scripts/export.py")
    require_flatbuffers()
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # jax raises several types for bytes that are no export
        raise FmnistError(f"{path} is not a StableHLO file jax {jax.__version__} can read "
                          f"({type(e).__name__}): export the run again") from e
    return ExportedModel(path=path, exported=exported, meta=meta)
