"""Head-to-head: JAX against the PyTorch baseline, same machine, same run, same start.

For each seed, every pipeline starts from the same LeNet-5 weights (the JAX init, exchanged to
torch) and trains the seed-002 recipe (batch 64, Adam 1e-3, 0.5/0.5) on all 60,000 training
images. Pipelines take turns epoch by epoch, so a change in machine load hits them alike:

- `jax`: `steps.train_epoch`, one `lax.scan` per epoch, data on the device;
- `torch-tuned`: data on the device, index batches, in the JAX side's batch order (so its
  accuracy is a like-for-like check of the JAX numbers);
- `torch-seed-style`: the seeds' per-sample Dataset and shuffling DataLoader.

Warm-up (XLA compilation; torch's first steps or torch.compile) is timed apart and not
counted in the epochs; every clock read follows a device sync.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import resource
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from fmnist_jax import data
from fmnist_jax.baseline.order import (jax_epoch_batch_order, jax_init_params,
                                       train_py_epoch_order)
from fmnist_jax.models import get_model
from fmnist_jax.steps import create_train_state, evaluate, train_epoch
from fmnist_jax.train import INIT_STREAM, SHUFFLE_STREAM, stream_key

PIPELINES = ("jax", "torch-tuned", "torch-seed-style")
TORCH_WARMUP_STEPS = 20  # steps on the real model before the clock starts, then reset


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    epochs: int = 10
    seeds: int = 3
    batch_size: int = 64
    learning_rate: float = 1e-3
    pipelines: tuple[str, ...] = PIPELINES
    torch_device: str = "cpu"  # "cpu" or "cuda"
    torch_compile: bool = False  # torch.compile the tuned pipeline's model


def _sync_torch(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _JaxRun:
    def __init__(self, s: BenchSettings, seed: int, train_xy, test_xy):
        self.train_xy, self.test_xy, self.seed = train_xy, test_xy, seed
        self.state = create_train_state(get_model("lenet5"), optax.adam(s.learning_rate),
                                        stream_key(seed, INIT_STREAM))
        self.shuffle_key = stream_key(seed, SHUFFLE_STREAM)
        t0 = time.perf_counter()
        self.epoch_fn = train_epoch.lower(self.state, *train_xy, self.shuffle_key,
                                          batch_size=s.batch_size).compile()
        self.eval_fn = evaluate.lower(self.state, *test_xy, batch_size=1000).compile()
        self.warmup_s = time.perf_counter() - t0

    def epoch(self, epoch: int) -> float:
        t0 = time.perf_counter()
        self.state, sums = self.epoch_fn(self.state, *self.train_xy,
                                         jax.random.fold_in(self.shuffle_key, epoch))
        jax.block_until_ready(sums)
        return time.perf_counter() - t0

    def test_accuracy(self) -> float:
        sums = jax.device_get(self.eval_fn(self.state, *self.test_xy))
        return float(sums.correct) / float(sums.count)

    def peak_bytes(self) -> int | None:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")


class _TorchRun:
    def __init__(self, s: BenchSettings, seed: int, kind: str, train: data.Split,
                 test: data.Split):
        import torch

        from fmnist_jax.baseline import torch_lenet as tl
        from fmnist_jax.baseline.exchange import flax_to_torch_state_dict

        self.tl, self.kind, self.seed, self.s = tl, kind, seed, s
        init = jax_init_params(seed)
        self.setup = tl.make_setup(learning_rate=s.learning_rate, device=s.torch_device,
                                   params=init,
                                   compile=s.torch_compile and kind == "torch-tuned")
        self.device = self.setup.device
        self.test = tl.to_device_split(test.images_NxHxWx1, test.labels_N, s.torch_device)
        self.n = len(train)
        if kind == "torch-tuned":
            self.train = tl.to_device_split(train.images_NxHxWx1, train.labels_N, s.torch_device)
        else:
            self.loader = tl.seed_style_loader(
                tl.SeedStyleDataset(train.images_NxHxWx1, train.labels_N),
                batch_size=s.batch_size, seed=seed)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # Warm-up on the real model (kernels, allocator, torch.compile), then back to the init.
        t0 = time.perf_counter()
        order = jax_epoch_batch_order(jax.random.key(10_000 + seed), self.n, s.batch_size)
        warm = order[:TORCH_WARMUP_STEPS]
        if kind == "torch-tuned":
            tl.train_epoch_tuned(self.setup, self.train, warm)
        else:
            tl.train_epoch_seed_style(self.setup, tl.seed_style_loader(
                self.loader.dataset, batches_SxB=warm))
        _sync_torch(self.device)
        self.warmup_s = time.perf_counter() - t0
        self.setup.model.load_state_dict(flax_to_torch_state_dict(init))  # copies in place
        self.setup.optimizer = torch.optim.Adam(self.setup.model.parameters(),
                                                lr=s.learning_rate)

    def epoch(self, epoch: int) -> float:
        if self.kind == "torch-tuned":  # the JAX side's batches, computed before the clock
            order = train_py_epoch_order(self.seed, epoch, self.n, self.s.batch_size)
            t0 = time.perf_counter()
            self.tl.train_epoch_tuned(self.setup, self.train, order)
        else:
            t0 = time.perf_counter()
            self.tl.train_epoch_seed_style(self.setup, self.loader)
        _sync_torch(self.device)
        return time.perf_counter() - t0

    def test_accuracy(self) -> float:
        sums = self.tl.evaluate(self.setup, self.test)
        return sums.correct / sums.count

    def peak_bytes(self) -> int | None:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None


def run_bench(train: data.Split, test: data.Split, s: BenchSettings,
              log_fn: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train every pipeline of `s` for every seed; return raw numbers and their summary."""
    train_xy = jax.device_put((train.images_NxHxWx1, train.labels_N))
    test_xy = jax.device_put((test.images_NxHxWx1, test.labels_N))
    raw = {p: {"warmup_s": [], "epoch_s": [], "total_s": [], "test_accuracy": [],
               "peak_bytes": []} for p in s.pipelines}
    for seed in range(s.seeds):
        runs = {}
        for p in s.pipelines:
            runs[p] = (_JaxRun(s, seed, train_xy, test_xy) if p == "jax"
                       else _TorchRun(s, seed, p, train, test))
        for epoch in range(1, s.epochs + 1):
            for p, run in runs.items():  # alternate: the same load for all
                seconds = run.epoch(epoch)
                raw[p]["epoch_s"].append(seconds)
                log_fn(f"seed {seed} epoch {epoch:2d} {p:17s} {seconds:8.3f} s")
        for p, run in runs.items():
            raw[p]["warmup_s"].append(run.warmup_s)
            raw[p]["total_s"].append(sum(raw[p]["epoch_s"][-s.epochs:]))
            raw[p]["test_accuracy"].append(run.test_accuracy())
            raw[p]["peak_bytes"].append(run.peak_bytes())
            log_fn(f"seed {seed} {p:17s} test accuracy {raw[p]['test_accuracy'][-1]:.4f}")
    images_per_epoch = (len(train) // s.batch_size) * s.batch_size
    return {"settings": dataclasses.asdict(s), "environment": environment(s),
            "n_train": len(train), "n_test": len(test), "raw": raw,
            "summary": summarize(raw, images_per_epoch, len(train))}


def summarize(raw: dict, images_per_epoch: int, n_train: int) -> dict[str, dict]:
    summary = {}
    for p, r in raw.items():
        median = statistics.median(r["epoch_s"])
        seen = n_train if p == "torch-seed-style" else images_per_epoch  # keeps its last batch
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
           "jax_device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
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
    s, n_seeds = result["settings"], result["settings"]["seeds"]
    lines = [
        f"| pipeline | warm-up s | s/epoch median (min-max) | images/s | {s['epochs']} epochs s "
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
                 + f"; {result['n_train']} training images; process peak RSS "
                 f"{env['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def save(result: dict[str, Any], path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)

