"""The parts of `benchmarks.gpu_check` that run inside jax, each in a process of its own:

    python -m benchmarks.gpu_parts PART --result FILE --deadline UNIX_SECONDS --opts JSON

A part writes its result to FILE (JSON) as it goes, so that the parent, which kills it at its
deadline, keeps what was measured. A part stops itself before the deadline where it can (between
programs, rounds or seeds). Every clock stops after `block_until_ready` (JAX) or
`torch.cuda.synchronize` (the bench's torch pipelines); compilation is timed apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

# torch may share the GPU with JAX in a part: JAX must not take 75% of it at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Every conv of the two models: (name, H=W, Cin, Cout, kernel, padding, the preset's batch).
CONV_LAYERS = [("lenet5.conv1", 28, 1, 6, 5, 2, 64), ("lenet5.conv2", 14, 6, 16, 5, 0, 64),
               ("cnn.conv1", 28, 1, 16, 3, 1, 32), ("cnn.conv2", 14, 16, 32, 3, 1, 32)]


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    found = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
                 "orbax-checkpoint", "chex", "numpy", "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment(opts: dict, save: Callable, time_left: Callable) -> dict:
    """Versions, jax's devices and their memory, torch's CUDA; in smoke mode also the tiny
    CSV data that the smoke run's train.py reads."""
    import platform

    import jax

    devices = jax.devices()
    info: dict[str, Any] = {"python": platform.python_version(), "versions": _versions(),
                            "jax_backend": jax.default_backend(),
                            "jax_default_matmul_precision":
                                str(jax.config.jax_default_matmul_precision),
                            "devices": [{"platform": d.platform, "kind": d.device_kind,
                                         "id": d.id} for d in devices]}
    try:
        stats = devices[0].memory_stats() or {}
        info["device_memory_bytes"] = stats.get("bytes_limit")
    except Exception as e:  # the CPU backend has no memory stats
        info["device_memory_bytes"] = None
        info["memory_stats_error"] = type(e).__name__
    for attribute in ("compute_capability", "core_count"):
        if hasattr(devices[0], attribute):
            info[attribute] = str(getattr(devices[0], attribute))
    try:
        import torch

        info["torch_cuda"] = {"available": torch.cuda.is_available(),
                              "cuda": torch.version.cuda,
                              "cudnn": torch.backends.cudnn.version()
                              if torch.cuda.is_available() else None,
                              "device": torch.cuda.get_device_name()
                              if torch.cuda.is_available() else None}
    except ImportError:
        info["torch_cuda"] = "skipped: torch is not installed"
    save(info)
    return info


def _load(opts: dict):
    from fmnist_jax import data

    return data.load(manual_dir=opts["manual_dir"], source="idx")


def _first(split, n: int | None):
    from fmnist_jax import data

    if not n:
        return split
    return data.Split(split.images_NxHxWx1[:n], split.labels_N[:n])


# ------------------------------------------------------------------------ conv formulations


def _layer_program(conv: str, pool: str, layer: tuple, batch: int, iters: int):
    """profiling.layer_program for one ConvReluPool with the given formulations: (compile
    seconds, run() -> seconds)."""
    from benchmarks.profiling import layer_program
    from fmnist_jax.layers import ConvReluPool

    _, hw, c_in, c_out, k, pad, _ = layer
    module = ConvReluPool(c_out, (k, k), padding=pad, impl=conv, pool_impl=pool)
    return layer_program(module, batch, hw, c_in, iters)


def _model_program(model_name: str, combo: tuple[str, str] | None, images: int, batch: int):
    """profiling.JaxEpoch's epoch of `model_name` with every layer's (conv, pool) forced to
    `combo` (None: conv_and_pool_impl's own choice); returns (compile seconds, run)."""
    import jax
    import optax

    from fmnist_jax import layers
    from fmnist_jax.data import HALF
    from fmnist_jax.models import get_model
    from fmnist_jax.steps import create_train_state, train_epoch
    from benchmarks.profiling import random_images

    images_NxHxWx1, labels_N = random_images(images)
    xy = jax.device_put((images_NxHxWx1, labels_N))
    chosen = layers.conv_and_pool_impl
    if combo is not None:  # read by the layers while tracing, i.e. inside lower()
        layers.conv_and_pool_impl = lambda backend=None, kernel_shape=None, **_: combo
    try:
        state = create_train_state(get_model(model_name), optax.adam(1e-3), jax.random.key(0))
        t0 = time.perf_counter()
        fn = train_epoch.lower(state, *xy, jax.random.key(1), batch_size=batch,
                               norm=HALF).compile()
        compile_s = time.perf_counter() - t0
    finally:
        layers.conv_and_pool_impl = chosen
    holder = {"state": state}  # train_epoch donates the state: keep the one it returns
    holder["state"], sums = fn(holder["state"], *xy, jax.random.key(1), norm=HALF)
    jax.block_until_ready((holder["state"], sums))  # first run: allocations

    def timed() -> float:
        t = time.perf_counter()
        holder["state"], sums = fn(holder["state"], *xy, jax.random.key(1), norm=HALF)
        jax.block_until_ready((holder["state"], sums))
        return time.perf_counter() - t
    return compile_s, timed


def _interleave(programs: dict[str, tuple[float, Callable]], rounds: int,
                time_left: Callable) -> dict[str, list[float]]:
    times = {name: [] for name in programs}
    for _ in range(rounds):
        t0 = time.perf_counter()
        for name, (_, run) in programs.items():
            times[name].append(run())
        if time_left() < time.perf_counter() - t0:
            break
    return times


def conv_formulations(opts: dict, save: Callable, time_left: Callable) -> dict:
    """Per layer: every (conv, pool) formulation's forward+backward time at the preset's
    batch; per model: a training epoch with every layer forced to one formulation, and
    with `conv_and_pool_impl`'s own choice. Programs that do not fit the time are left out
    (listed in `skipped`)."""
    import jax

    from fmnist_jax.conv_forms import CONV_IMPLS, POOL_IMPLS
    from fmnist_jax.layers import conv_and_pool_impl

    backend = jax.default_backend()
    smoke = opts["smoke"]
    combos = [(c, p) for c in sorted(CONV_IMPLS) for p in sorted(POOL_IMPLS)]
    result: dict[str, Any] = {"backend": backend, "layers": [], "models": [], "skipped": []}
    for layer in CONV_LAYERS[:1] if smoke else CONV_LAYERS:
        name, hw, c_in, c_out, k, pad, batch = layer
        batch = 8 if smoke else batch
        programs = {}
        for conv, pool in combos[:2] if smoke else combos:
            if (result["layers"] or programs) and time_left() < 5:
                result["skipped"].append(f"{name} {conv}+{pool}: skipped: out of time")
                continue
            programs[f"{conv}+{pool}"] = _layer_program(conv, pool, layer, batch,
                                                        2 if smoke else 50)
        times = _interleave(programs, 1 if smoke else 5, time_left)
        iters = 2 if smoke else 50
        us = {f: statistics.median(t) / (iters * batch) * 1e6 for f, t in times.items()}
        result["layers"].append({
            "layer": name, "batch": batch, "input": [hw, hw, c_in], "features": c_out,
            "kernel": k, "chosen": "+".join(conv_and_pool_impl(
                backend, (k, k, c_in, c_out), padded_width=hw + 2 * pad)),
            "compile_s": {f: round(p[0], 3) for f, p in programs.items()},
            "us_per_image": us, "fastest": min(us, key=us.get) if us else None})
        save(result)
    model_sizes = [("lenet5", 64, 128 if smoke else 64 * 100)] + (
        [] if smoke else [("cnn", 32, 32 * 100)])
    for model_name, batch, images in model_sizes:
        wanted = [None] + (combos[:1] if smoke else combos)
        programs = {}
        for combo in wanted:
            label = "chosen" if combo is None else "+".join(combo)
            if programs and time_left() < 3 * max(p[0] for p in programs.values()):
                result["skipped"].append(f"{model_name} {label}: skipped: out of time")
                continue
            programs[label] = _model_program(model_name, combo, images, batch)
        times = _interleave(programs, 1 if smoke else 3, time_left)
        n = images // batch * batch
        us = {f: statistics.median(t) / n * 1e6 for f, t in times.items()}
        result["models"].append({
            "model": model_name, "batch": batch, "images_per_epoch": n,
            "compile_s": {f: round(p[0], 3) for f, p in programs.items()},
            "us_per_image": us, "fastest": min(us, key=us.get) if us else None})
        save(result)
    return result


# -------------------------------------------------------------------------- bench, seeds


def bench(opts: dict, save: Callable, time_left: Callable) -> dict:
    """fmnist_jax.baseline.bench's head-to-head for opts' preset and sizes, stopped at a
    seed's end when the next seed would not fit the time."""
    from fmnist_jax.baseline import bench as b

    pipelines = tuple(opts["pipelines"])
    try:
        import torch
    except ImportError:
        pipelines = ("jax",)
    else:  # a torch without CUDA on the GPU box: the JAX side is still worth its time
        if opts["gpu"] and not torch.cuda.is_available():
            pipelines = ("jax",)
    device = b.choose_device("cuda" if opts["gpu"] else "cpu",
                             torch_pipelines=pipelines != ("jax",))
    train, test = _load(opts)
    train = _first(train, opts.get("train_images"))
    cfg = b.bench_config(opts["preset"], epochs=opts["epochs"])
    settings = b.BenchSettings(config=cfg, num_seeds=opts["num_seeds"], pipelines=pipelines,
                               torch_device=device)
    started = time.perf_counter()
    done: dict = {"pipelines": list(pipelines)}  # the seeds finished so far

    def after_seed(partial: dict) -> bool:
        done.update(partial, table=b.markdown_table(partial))
        save(done)
        per_seed = (time.perf_counter() - started) / partial["seeds_run"]
        return time_left() > 1.15 * per_seed

    def after_epoch(seed: int, epoch: int, raw: dict) -> None:
        save({**done, "in_progress": {"seed": seed, "epoch": epoch, "epoch_s": {
            p: r["epoch_s"][-epoch:] for p, r in raw.items()}}})

    result = b.run_bench(train, test, settings, log_fn=lambda line: None, after_seed=after_seed,
                         after_epoch=after_epoch)
    result.update(pipelines=list(pipelines), table=b.markdown_table(result))
    save(result)
    return result


def seeds(opts: dict, save: Callable, time_left: Callable) -> dict:
    """benchmarks.seed_timing's epoch time of --seeds K against one model."""
    from fmnist_jax.run.presets import get_config
    from benchmarks.seed_timing import markdown_table, seed_rows

    train, _ = _load(opts)
    train = _first(train, opts.get("train_images"))
    def result_of(rows: list[dict]) -> dict:
        done = {row["seeds"] for row in rows}
        return {"rows": rows, "table": markdown_table(rows) if rows else "",
                "skipped": [f"K={k}: skipped: out of time" for k in [0, *opts["seeds_list"]]
                            if k not in done]}

    rows = seed_rows(get_config("lenet5"), train, opts["seeds_list"], opts["rounds"],
                     time_left=time_left, on_progress=lambda rows: save(result_of(rows)))
    result = result_of(rows)
    save(result)
    return result


# ------------------------------------------------------------------------------ restore


def restore(opts: dict, save: Callable, time_left: Callable) -> dict:
    """A run folder's model read through the package's API (`load_predictor`) on this
    process's device: a SHA-256 over its arrays, the arrays themselves (npz, to compare with
    another process's), and its test accuracy evaluated here."""
    import jax
    import numpy as np

    from fmnist_jax.evaluation.predict import load_predictor, predict_probs

    predictor = load_predictor(opts["run_dir"])
    leaves = jax.tree_util.tree_flatten_with_path(predictor.variables)[0]
    digest, arrays = hashlib.sha256(), {}
    for path, leaf in leaves:
        array = np.asarray(leaf)
        name = jax.tree_util.keystr(path)
        digest.update(name.encode() + str(array.dtype).encode() + array.tobytes())
        arrays[name] = array
    np.savez(opts["arrays_out"], **arrays)
    if opts.get("test_csv"):
        from fmnist_jax import data

        test = data.read_csv_split(opts["test_csv"])
    else:
        test = _load(opts)[1]
    probs = predict_probs(predictor, test.images_NxHxWx1)
    result = {"device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
              "epoch": predictor.epoch, "sha256": digest.hexdigest(), "arrays": len(arrays),
              "test_accuracy": float(np.mean(probs.argmax(-1) == test.labels_N))}
    save(result)
    return result


PARTS = {"environment": environment, "conv_formulations": conv_formulations, "bench": bench,
         "seeds": seeds, "restore": restore}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--result", required=True)
    parser.add_argument("--deadline", type=float, required=True, help="time.time() to stop by")
    parser.add_argument("--opts", default="{}")
    args = parser.parse_args()
    opts = json.loads(args.opts)

    def save(result: dict) -> None:
        from fmnist_jax.files import write_atomically

        write_atomically(Path(args.result), json.dumps(result, indent=1, default=str))

    PARTS[args.part](opts, save, lambda: args.deadline - time.time())


if __name__ == "__main__":
    sys.exit(main())
