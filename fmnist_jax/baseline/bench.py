"""Head-to-head: JAX against the PyTorch baseline, same machine, same run, same start.

Every pipeline trains one preset's `TrainConfig` (default: `lenet5`, the LeNet-5 report's
recipe) on all 60,000 training images, for seeds 0..num_seeds-1. For each seed, every pipeline
starts from the same weights (the JAX init, exchanged to torch). Pipelines take turns epoch by
epoch, so a change in machine load hits them alike:

- `jax`: `steps.train_epoch`, one `lax.scan` per epoch, data on the device, compiled and timed
  by `epochs.CompiledEpochs` exactly as the training loop does;
- `torch-tensors`: the split as tensors on the device, index batches, in the JAX side's batch
  order (so its accuracy is a like-for-like check of the JAX numbers);
- `torch-dataloader`: a per-sample Dataset and a shuffling DataLoader, as PyTorch tutorials do.

Warm-up (XLA compilation; torch's first steps or torch.compile) is timed apart and not
counted in the epochs; every clock read follows a device sync.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax

from fmnist_jax import data, streams
from fmnist_jax.baseline import TORCH_MODELS
from fmnist_jax.baseline.order import jax_epoch_batch_order, run_epoch_order, run_init_params
from fmnist_jax.run.config import TrainConfig
from fmnist_jax.run.presets import PRESETS, get_config
from fmnist_jax.run.compiled import CompiledEpochs, step_options
from fmnist_jax.run.parallel import describe_devices
from fmnist_jax.errors import FmnistError
from fmnist_jax.models import get_model
from fmnist_jax.optim import make_optimizer
from fmnist_jax.steps import create_train_state

PIPELINES = ("jax", "torch-tensors", "torch-dataloader")
TORCH_WARMUP_STEPS = 20  # steps on the real model before the clock starts, then reset
# The config fields the PyTorch baseline follows; any other must keep its default (the lenet5
# preset's value), which the baseline's recipe implements: constant-rate Adam, no weight decay,
# clipping, smoothing, augmentation or EMA, pixels to [-1, 1]. `model` must be one of
# `baseline.TORCH_MODELS`.
TORCH_VARIES = ("model", "epochs", "batch_size", "eval_batch_size", "learning_rate", "seed",
                "val_fraction")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    config: TrainConfig  # the recipe every pipeline trains; its `seed` is replaced per run
    num_seeds: int = 3  # seeds 0..num_seeds-1
    pipelines: tuple[str, ...] = PIPELINES
    torch_device: str = "cpu"  # "cpu" or "cuda"
    torch_compile: bool = False  # torch.compile the torch-tensors pipeline's model


def bench_config(preset: str, **overrides: Any) -> TrainConfig:
    """The preset's config for the bench: no validation split, so every pipeline trains on all
    60,000 images (the baseline has no validation split to hold out), and so no early
    stopping either (the bench times every epoch it is asked for). It runs no teacher."""
    if preset in PRESETS and PRESETS[preset].teacher_preset:
        raise FmnistError(f"preset {preset} learns from a teacher, and bench.py trains without "
                          f"one: bench another preset, or read a taught run's epoch times in "
                          f"its timing.jsonl")
    decay = overrides.get("decay", PRESETS[preset].config.decay if preset in PRESETS else None)
    if decay == "plateau":  # else get_config's advice, --val-fraction, is a flag bench lacks
        raise FmnistError(f"{'preset ' + preset if 'decay' not in overrides else '--decay'} "
                          f"lowers the learning rate on a validation plateau, and the bench "
                          f"holds out no validation split: pass --decay constant (or cosine)")
    return get_config(preset, **{"val_fraction": 0.0, "val_seed": None, "patience": 0,
                                 **overrides})


def check_settings(s: BenchSettings) -> None:
    """FmnistError unless every pipeline can train `s.config` as it says (none runs a teacher
    or a sweep), and the torch pipelines exactly as JAX does: the baseline has LeNet-5 and the
    tutorial CNN, trained with constant-rate Adam on pixels normalized to [-1, 1]."""
    unknown = [p for p in s.pipelines if p not in PIPELINES]
    if unknown or not s.pipelines:
        raise FmnistError(f"unknown pipelines {unknown}: choose from {', '.join(PIPELINES)}")
    if s.num_seeds < 1:
        raise FmnistError(f"--num-seeds must be at least 1, got {s.num_seeds}")
    if s.config.teacher:
        raise FmnistError(f"the bench trains without a teacher, but this config names "
                          f"{s.config.teacher!r}: drop teacher, or read a taught run's epoch "
                          f"times in its timing.jsonl")
    if s.config.sweep:
        raise FmnistError(f"the bench trains one recipe, but this config sweeps "
                          f"{s.config.sweep!r}: drop sweep, or bench one point of it")
    if not any(p.startswith("torch") for p in s.pipelines):
        return
    cfg, plain = s.config, TrainConfig()
    if cfg.model not in TORCH_MODELS:
        raise FmnistError(f"the PyTorch baseline has no {cfg.model} model (it has "
                          f"{', '.join(TORCH_MODELS)}): pass --pipelines jax, or --preset "
                          f"{' or --preset '.join(TORCH_MODELS)}")
    differs = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in TORCH_VARIES and getattr(cfg, f.name) != getattr(plain, f.name)]
    if differs:
        raise FmnistError(f"the PyTorch baseline trains with constant-rate Adam only, but this "
                          f"config changes {', '.join(differs)}: pass --pipelines jax, or "
                          f"--preset {' or --preset '.join(TORCH_MODELS)} without those changes")


def choose_device(requested: str, torch_pipelines: bool = True) -> str:
    """"cpu" or "cuda" for `requested` ("auto", "cpu" or "cuda"), set up for both frameworks.

    Call before JAX touches a device. "auto" picks CUDA when JAX sees a GPU; with torch
    pipelines, torch must see it too, since JAX on a GPU against torch on a CPU is no match.
    """
    if requested == "cpu":
        jax.config.update("jax_platforms", "cpu")
    # JAX and torch share the GPU in this process: JAX must not grab 75% of it at start.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if requested == "cpu":
        return requested
    if jax.default_backend() != "gpu":
        if requested == "cuda":
            raise FmnistError("--device cuda, but JAX sees no GPU: install jax with CUDA "
                              "(pip install -e \".[cuda12]\"), or pass --device cpu")
        return "cpu"
    if torch_pipelines and importlib.util.find_spec("torch") and not _torch_has_cuda():
        raise FmnistError("JAX sees a GPU but torch does not (a CPU build of torch?): install "
                          "torch with CUDA, pass --pipelines jax, or pass --device cpu to bench "
                          "both on the CPU")
    return "cuda"


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _sync_torch(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _JaxRun:
    def __init__(self, cfg: TrainConfig, train_xy, test_xy, n_train: int, norm):
        self.cfg = cfg
        steps_per_epoch = n_train // cfg.batch_size
        self.state = create_train_state(get_model(cfg.model), make_optimizer(cfg, steps_per_epoch),
                                        streams.stream_key(cfg.seed, streams.INIT),
                                        ema_decay=cfg.ema_decay)
        self.compiled = CompiledEpochs(self.state, train_xy, {"test": test_xy},
                                       batch_size=cfg.batch_size,
                                       eval_batch_size=cfg.eval_batch_size, norm=norm,
                                       key=streams.epoch_shuffle_key(cfg.seed, 1),
                                       options=step_options(cfg))
        self.warmup_s = self.compiled.compile_seconds

    def epoch(self, epoch: int) -> float:
        self.state, _, seconds = self.compiled.train(
            self.state, streams.epoch_shuffle_key(self.cfg.seed, epoch))
        return seconds

    def test_accuracy(self) -> float:
        sums = jax.device_get(self.compiled.evaluate(self.state, "test"))
        return float(sums.correct) / float(sums.count)

    def peak_bytes(self) -> int | None:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")


class _TorchRun:
    def __init__(self, s: BenchSettings, cfg: TrainConfig, kind: str, train: data.Split,
                 test: data.Split):
        import torch

        from fmnist_jax.baseline import torch_train as tl
        from fmnist_jax.baseline.exchange import flax_to_torch_state_dict

        self.tl, self.kind, self.cfg = tl, kind, cfg
        init = run_init_params(cfg.seed, cfg.model)
        self.setup = tl.make_setup(model=cfg.model, learning_rate=cfg.learning_rate,
                                   device=s.torch_device, params=init,
                                   compile=s.torch_compile and kind == "torch-tensors")
        self.device = self.setup.device
        self.test = tl.to_device_split(test.images_NxHxWx1, test.labels_N, s.torch_device)
        self.n = len(train)
        if kind == "torch-tensors":
            self.train = tl.to_device_split(train.images_NxHxWx1, train.labels_N, s.torch_device)
        else:
            self.loader = tl.dataloader(
                tl.PerSampleDataset(train.images_NxHxWx1, train.labels_N),
                batch_size=cfg.batch_size, seed=cfg.seed)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # Warm-up on the real model (kernels, allocator, torch.compile), then back to the init.
        t0 = time.perf_counter()
        order_SxB = jax_epoch_batch_order(streams.stream_key(cfg.seed, streams.BENCH_WARMUP),
                                          self.n, cfg.batch_size)
        warm_SxB = order_SxB[:TORCH_WARMUP_STEPS]
        if kind == "torch-tensors":
            tl.train_epoch_tensors(self.setup, self.train, warm_SxB)
        else:
            tl.train_epoch_dataloader(self.setup, tl.dataloader(
                self.loader.dataset, batches_SxB=warm_SxB))
        _sync_torch(self.device)
        self.warmup_s = time.perf_counter() - t0
        self.setup.model.load_state_dict(flax_to_torch_state_dict(init, cfg.model))  # in place
        self.setup.optimizer = torch.optim.Adam(self.setup.model.parameters(),
                                                lr=cfg.learning_rate)

    def epoch(self, epoch: int) -> float:
        if self.kind == "torch-tensors":  # the JAX side's batches, computed before the clock
            order_SxB = run_epoch_order(self.cfg.seed, epoch, self.n, self.cfg.batch_size)
            t0 = time.perf_counter()
            self.tl.train_epoch_tensors(self.setup, self.train, order_SxB)
        else:
            t0 = time.perf_counter()
            self.tl.train_epoch_dataloader(self.setup, self.loader)
        _sync_torch(self.device)
        return time.perf_counter() - t0

    def test_accuracy(self) -> float:
        sums = self.tl.evaluate(self.setup, self.test, batch_size=self.cfg.eval_batch_size)
        return sums.correct / sums.count

    def peak_bytes(self) -> int | None:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None


def run_bench(train: data.Split, test: data.Split, s: BenchSettings,
              log_fn: Callable[[str], Any] = print,
              after_seed: Callable[[dict[str, Any]], bool] | None = None,
              after_epoch: Callable[[int, int, dict[str, Any]], Any] | None = None
              ) -> dict[str, Any]:
    """Train every pipeline of `s` for every seed; return raw numbers and their summary.

    `after_seed`, when given, gets the result so far after each seed and returns whether to
    go on (a caller with a time budget stops at a seed's end); `seeds_run` says how many ran.
    `after_epoch` gets (seed, epoch, the raw numbers so far) after every epoch of every
    pipeline (a caller that may be stopped mid-seed saves them).
    """
    check_settings(s)
    epochs = s.config.epochs
    train_xy = jax.device_put((train.images_NxHxWx1, train.labels_N))
    test_xy = jax.device_put((test.images_NxHxWx1, test.labels_N))
    norm = data.normalization_for(s.config.normalization, train.images_NxHxWx1)
    raw = {p: {"warmup_s": [], "epoch_s": [], "total_s": [], "test_accuracy": [],
               "peak_bytes": []} for p in s.pipelines}
    for seed in range(s.num_seeds):
        cfg = dataclasses.replace(s.config, seed=seed)
        runs = {}
        for p in s.pipelines:
            runs[p] = (_JaxRun(cfg, train_xy, test_xy, len(train), norm) if p == "jax"
                       else _TorchRun(s, cfg, p, train, test))
        for epoch in range(1, epochs + 1):
            for p, run in runs.items():  # alternate: the same load for all
                seconds = run.epoch(epoch)
                raw[p]["epoch_s"].append(seconds)
                log_fn(f"seed {seed} epoch {epoch:2d} {p:17s} {seconds:8.3f} s")
            if after_epoch is not None:
                after_epoch(seed, epoch, raw)
        for p, run in runs.items():
            raw[p]["warmup_s"].append(run.warmup_s)
            raw[p]["total_s"].append(sum(raw[p]["epoch_s"][-epochs:]))
            raw[p]["test_accuracy"].append(run.test_accuracy())
            raw[p]["peak_bytes"].append(run.peak_bytes())
            log_fn(f"seed {seed} {p:17s} test accuracy {raw[p]['test_accuracy'][-1]:.4f}")
        if after_seed is not None and seed + 1 < s.num_seeds and not after_seed(
                _result(s, train, test, raw, seed + 1)):
            break
    return _result(s, train, test, raw, seed + 1)


def _result(s: BenchSettings, train: data.Split, test: data.Split, raw: dict,
            seeds_run: int) -> dict[str, Any]:
    images_per_epoch = (len(train) // s.config.batch_size) * s.config.batch_size
    return {"settings": dataclasses.asdict(s), "environment": environment(s),
            "n_train": len(train), "n_test": len(test), "seeds_run": seeds_run, "raw": raw,
            "summary": summarize(raw, images_per_epoch, len(train))}


def summarize(raw: dict, images_per_epoch: int, n_train: int) -> dict[str, dict]:
    summary = {}
    for p, r in raw.items():
        median = statistics.median(r["epoch_s"])
        seen = n_train if p == "torch-dataloader" else images_per_epoch  # keeps its last batch
        acc = r["test_accuracy"]
        peaks = [b for b in r["peak_bytes"] if b is not None]
        summary[p] = {
            "warmup_s_median": statistics.median(r["warmup_s"]),
            "epoch_s_median": median, "epoch_s_min": min(r["epoch_s"]),
            "epoch_s_max": max(r["epoch_s"]),
            "images_per_s": seen / median,
            "total_s_median": statistics.median(r["total_s"]),
            "test_accuracy_mean": float(np.mean(acc)),
            "test_accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
            "peak_mib": max(peaks) / 2**20 if peaks else None,
        }
    if "jax" in summary:
        for p in summary:
            summary[p]["epoch_ratio_to_jax"] = summary[p]["epoch_s_median"] / summary["jax"][
                "epoch_s_median"]
    return summary


def environment(s: BenchSettings) -> dict[str, Any]:
    import flax

    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
           "jax_device": describe_devices(),  # "cpu (cpu)", or "2 x cpu (cpu), data parallel"
           "cpu": platform.processor() or platform.machine(),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if any(p.startswith("torch") for p in s.pipelines):
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["torch_device"] = (torch.cuda.get_device_name() if s.torch_device.startswith("cuda")
                               else "cpu")
    return env


def markdown_table(result: dict[str, Any]) -> str:
    cfg = result["settings"]["config"]
    n_seeds = result.get("seeds_run", result["settings"]["num_seeds"])
    lines = [
        f"| pipeline | warm-up s | s/epoch median (min-max) | images/s | {cfg['epochs']} epochs s "
        f"| test acc mean +- std ({n_seeds} seeds) | peak MiB | epoch time / JAX |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, r in result["summary"].items():
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        lines.append(
            f"| {p} | {r['warmup_s_median']:.2f} | {r['epoch_s_median']:.3f} "
            f"({r['epoch_s_min']:.3f}-{r['epoch_s_max']:.3f}) | {r['images_per_s']:,.0f} "
            f"| {r['total_s_median']:.2f} | {100 * r['test_accuracy_mean']:.2f} +- "
            f"{100 * r['test_accuracy_std']:.2f} | {peak} "
            f"| {r.get('epoch_ratio_to_jax', float('nan')):.2f}x |")
    env = result["environment"]
    lines.append("")
    lines.append(f"{env['date']}; JAX {env['jax']} on {env['jax_device']}"
                 + (f"; torch {env['torch']} on {env['torch_device']} "
                    f"({env['torch_threads']} threads)" if "torch" in env else "")
                 + f"; {result['n_train']} training images, {cfg['model']}, batch "
                 f"{cfg['batch_size']}; process peak RSS "
                 f"{env['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def check_out(path, *, overwrite: bool) -> None:
    """FmnistError unless the results can be written to `path`: checked before the benchmark
    runs, by creating (and removing) a file beside it, so an hour of measurements is never
    lost to a bad --out at the end."""
    path = Path(path)
    if path.is_dir():
        raise FmnistError(f"--out {path} is a folder: pass a file name, e.g. {path / 'bench.json'}")
    if path.exists() and not overwrite:
        raise FmnistError(f"--out {path} already exists: pass another --out, delete it, or "
                          f"pass --overwrite to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise FmnistError(f"--out {path}: the folder {folder} does not exist: create it or "
                          f"pass another --out")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise FmnistError(f"--out {path} cannot be written ({e.strerror}): pass another --out "
                          f"in a folder you can write") from e


def save(result: dict[str, Any], path, *, overwrite: bool = True) -> None:
    """The results as JSON; an existing file is replaced only with `overwrite` (a file that
    appeared while the benchmark ran is then kept, and the error says so)."""
    try:
        with open(path, "w" if overwrite else "x") as f:
            json.dump(result, f, indent=2)
    except FileExistsError as e:
        raise FmnistError(f"--out {path} was created while the benchmark ran: pass another "
                          f"--out, or --overwrite") from e
    except OSError as e:
        raise FmnistError(f"cannot write --out {path} ({e.strerror}): pass another --out") from e

