"""Each export format of finished run folders against predict, on the 10,000 test images:
`python -m benchmarks.check_export --runs RUN [RUN ...] --manual-dir DIR` prints a markdown
table: per run and format, the file's size, the largest difference of its probabilities from
predict's, and (StableHLO, in a fresh process that imports only jax and numpy) the time per
image at batch 1 and batch 1,000, beside predict's in this process. onnx needs onnxruntime,
torch needs torch (a run whose model the baseline lacks gets no torch row)."""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fmnist_jax.data import load_idx, resolve_manual_dir
from fmnist_jax.evaluation import export, predict

# Run in a fresh process: jax and numpy only, as a user of the file would.
LOADER = """
import json, sys, time, jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
images = np.load(sys.argv[2])
def per_image(n, repeats):
    exported.call(images[:n]).block_until_ready()  # compiles for this batch size
    start = time.perf_counter()
    for _ in range(repeats):
        exported.call(images[:n]).block_until_ready()
    return (time.perf_counter() - start) / repeats / n
times = {"batch_1": per_image(1, 200), "batch_1000": per_image(1000, 10)}
probs = np.concatenate([np.asarray(exported.call(images[i:i + 1000]))
                        for i in range(0, len(images), 1000)])
np.save(sys.argv[3], probs)
assert not any(m.split(".")[0] in ("flax", "fmnist_jax", "orbax") for m in sys.modules)
print(json.dumps(times))
"""


def test_images(manual_dir) -> np.ndarray:
    return load_idx(resolve_manual_dir(manual_dir))[1].images_NxHxWx1


def predict_times(predictor, images) -> dict[str, float]:
    """predict_probs's seconds per image at batch 1 and 1,000, compiled beforehand."""
    times = {}
    for name, n, repeats in (("batch_1", 1, 200), ("batch_1000", 1000, 10)):
        predict.predict_probs(predictor, images[:n])
        start = time.perf_counter()
        for _ in range(repeats):
            predict.predict_probs(predictor, images[:n])
        times[name] = (time.perf_counter() - start) / repeats / n
    return times


def torch_calibrated(z, cal_map: dict):
    """The JSON's calibration map applied in torch, as its "load" field spells it."""
    import torch

    params = {k: torch.tensor(v, dtype=torch.float32) for k, v in cal_map.items()
              if k in ("temperature", "w", "b", "W")}
    if cal_map["kind"] == "temperature":
        return z / params["temperature"]
    if cal_map["kind"] == "vector":
        return z * params["w"] + params["b"]
    return torch.log_softmax(z, dim=1) @ params["W"].T + params["b"]


def check_run(run_dir: Path, images: np.ndarray, tmp: Path) -> list[dict]:
    predictor = predict.load_predictor(run_dir)
    want_NxC = predict.predict_probs(predictor, images)
    model = predictor.config.model
    rows = [{"model": model, "format": "predict (run folder)", "T": predictor.temperature,
             **predict_times(predictor, images)}]

    def written(fmt, exporter=None):
        out = tmp / f"{model}{export.SUFFIXES[fmt]}"
        export.export_run(run_dir, fmt, out, overwrite=True,
                          exporters={fmt: exporter} if exporter else None)
        return out

    np.save(tmp / "images.npy", images)
    out = written("stablehlo")
    result = subprocess.run([sys.executable, "-c", LOADER, out, tmp / "images.npy",
                             tmp / "probs.npy"], capture_output=True, text=True, check=True)
    times = json.loads(result.stdout.strip().splitlines()[-1])
    rows.append({"model": model, "format": "stablehlo (jax only, fresh process)",
                 "bytes": out.stat().st_size,
                 "diff": float(np.abs(np.load(tmp / "probs.npy") - want_NxC).max()), **times})
    try:
        import onnxruntime
        from fmnist_jax.evaluation.export_onnx import export_onnx

        out = written("onnx", export_onnx)
        session = onnxruntime.InferenceSession(str(out))
        got = np.concatenate([session.run(None, {"images": images[i:i + 1000]})[0]
                              for i in range(0, len(images), 1000)])
        one = session.run(None, {"images": images[:1]})[0]
        diff = max(np.abs(got - want_NxC).max(), np.abs(one - want_NxC[:1]).max())
        rows.append({"model": model, "format": "onnx (onnxruntime)",
                     "bytes": out.stat().st_size, "diff": float(diff)})
    except ImportError:
        pass
    from fmnist_jax.baseline import TORCH_MODELS

    if model in TORCH_MODELS:
        import torch

        from fmnist_jax.baseline.export_torch import export_torch
        from fmnist_jax.baseline.torch_models import make_torch_model

        out = written("torch", export_torch)
        net = make_torch_model(model)
        net.load_state_dict(torch.load(out, weights_only=True))
        meta = json.loads(export.meta_path(out).read_text())
        norm = meta["normalization"]
        x = ((torch.from_numpy(images.copy()).float() / 255 - norm["mean"]) / norm["std"])
        with torch.no_grad():
            probs = torch.softmax(torch_calibrated(net(x.permute(0, 3, 1, 2)),
                                                   meta["calibration"]), 1).numpy()
        rows.append({"model": model, "format": "torch (state_dict)",
                     "bytes": out.stat().st_size,
                     "diff": float(np.abs(probs - want_NxC).max())})
    return rows


def markdown(rows: list[dict]) -> str:
    def us(row, key):
        return f"{row[key] * 1e6:.1f}" if key in row else ""

    lines = ["| model | format | T | file size | max abs diff of probabilities vs predict "
             "(10,000 test images) | µs/image batch 1 | µs/image batch 1,000 |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        size = f"{r['bytes'] / 1024:,.0f} KiB" if "bytes" in r else ""
        diff = f"{r['diff']:.2e}" if "diff" in r else ""
        temperature = f"{r['T']:.4g}" if r.get("T") is not None else ""
        lines.append(f"| {r['model']} | {r['format']} | {temperature} | {size} | {diff} | "
                     f"{us(r, 'batch_1')} | {us(r, 'batch_1000')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", required=True, help="finished run folders")
    parser.add_argument("--manual-dir", help="the four official .gz files ($FMNIST_MANUAL_DIR)")
    args = parser.parse_args()
    images = test_images(args.manual_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in args.runs:
            rows += check_run(Path(run_dir), images, Path(tmp))
    print(markdown(rows))


if __name__ == "__main__":
    main()
