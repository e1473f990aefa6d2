"""gpu_check.md: the results of `benchmarks.gpu_check` (its JSON) as one markdown page."""

from __future__ import annotations

from typing import Any

TITLES = {"environment": "Environment", "tests": "Tests on this device",
          "conv_formulations": "Conv and pool formulations",
          "bench_lenet5": "Bench: lenet5, JAX against PyTorch",
          "train_run": "scripts/train.py: wall time split, compile; the checkpoint on another "
                       "device",
          "precision": "Test accuracy: GPU (TF32), GPU (highest), CPU, same seed",
          "seeds": "--seeds K epoch time against one model",
          "bench_cnn": "Bench: cnn, JAX against PyTorch"}


def markdown(results: dict[str, Any]) -> str:
    parts = results["parts"]
    gpu = results.get("gpu")
    lines = ["# GPU check", "",
             f"{results['date']}; mode {results['mode']}; budget {results['budget_s']:.0f} s; "
             f"wall {results.get('wall_s', 0):.0f} s; GPU: "
             + ("yes" if gpu else "not yet known" if gpu is None else
                "none (skipped: no GPU for the GPU parts; the rest ran on the CPU)"), "",
             "| part | status | seconds |", "| --- | --- | --- |"]
    for name, title in TITLES.items():
        entry = parts.get(name)
        lines.append(f"| {name} | {entry['status'] if entry else 'not run yet'} | "
                     f"{entry.get('seconds', '') if entry else ''} |")
    for name, title in TITLES.items():
        entry = parts.get(name)
        if entry is None:
            continue
        lines += ["", f"## {title}", "", f"status: {entry['status']}"]
        for key in ("note", "error"):
            if entry.get(key):
                lines.append(f"{key}: {entry[key]}")
        try:
            lines += RENDER.get(name, lambda e, r: [])(entry, results)
        except Exception as e:  # a partial result must not lose the page
            lines.append(f"(could not render: {type(e).__name__}: {e})")
        if entry.get("stderr_tail"):
            lines += ["", "```", entry["stderr_tail"][-800:].strip(), "```"]
    return "\n".join(lines) + "\n"


def _environment(entry, results):
    info = entry.get("result") or {}
    versions = info.get("versions", {})
    devices = info.get("devices", [])
    memory = info.get("device_memory_bytes")
    return ["", f"- devices: {len(devices)} x {devices[0]['platform']} ({devices[0]['kind']})"
            if devices else "- devices: unknown",
            f"- device memory (jax bytes_limit): "
            f"{memory / 2**30:.1f} GiB" if memory else "- device memory: n/a",
            f"- nvidia-smi: {info.get('nvidia_smi')}",
            f"- compute capability: {info.get('compute_capability', 'n/a')}",
            f"- jax default matmul precision: {info.get('jax_default_matmul_precision')} "
            f"(None: XLA's default, TF32 for float32 on recent NVIDIA GPUs)",
            f"- torch CUDA: {info.get('torch_cuda')}",
            f"- Python {info.get('python')}; "
            + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
            f"- CPUs: {info.get('cpu_count')}"]


def _tests(entry, results):
    out = ["", f"command: `{entry.get('command')}`, env {entry.get('env')}"]
    if "passed" in entry:
        out.append(f"passed {entry['passed']}, failed {entry['failed']}, errors "
                   f"{entry['errors']}, skipped {entry['skipped']}"
                   + (f", stopped while running {entry['interrupted']}"
                      if entry.get("interrupted") else ""))
        out += [f"- FAILED {f['test']}: {f['message'][:200]}" for f in entry["failures"]]
    elif entry.get("output_tail"):
        out += ["", "```", entry["output_tail"].strip(), "```"]
    return out


def _conv(entry, results):
    r = entry.get("result") or {}
    out = [f"backend: {r.get('backend')}"]
    for layer in r.get("layers", []):
        us = layer["us_per_image"]
        out += ["", f"**{layer['layer']}** (batch {layer['batch']}, input "
                    f"{'x'.join(map(str, layer['input']))}, {layer['features']} features, "
                    f"{layer['kernel']}x{layer['kernel']}): conv_and_pool_impl picks "
                    f"{layer['chosen']}, fastest measured {layer['fastest']}", "",
                "| conv+pool | us/image (fwd+bwd) | compile s |", "| --- | --- | --- |"]
        out += [f"| {f} | {v:.2f} | {layer['compile_s'][f]:.2f} |" for f, v in us.items()]
    for model in r.get("models", []):
        us = model["us_per_image"]
        out += ["", f"**{model['model']}** training epoch ({model['images_per_epoch']} images, "
                    f"batch {model['batch']}); fastest {model['fastest']}", "",
                "| every layer's conv+pool | us/image (train step) | compile s |",
                "| --- | --- | --- |"]
        out += [f"| {f} | {v:.2f} | {model['compile_s'][f]:.2f} |" for f, v in us.items()]
    out += [f"- {s}" for s in r.get("skipped", [])]
    return out


def _bench(entry, results):
    r = entry.get("result") or {}
    out = ["", f"asked: {entry['asked']}"] if entry.get("asked") else []
    if r.get("pipelines"):
        out.append(f"pipelines run: {', '.join(r['pipelines'])}")
    if r.get("table"):
        out += [f"seeds run: {r.get('seeds_run')}", "", r["table"]]
    if r.get("in_progress"):  # stopped inside a seed: its epochs so far
        p = r["in_progress"]
        out += ["", f"stopped in seed {p['seed']} after epoch {p['epoch']}; its epoch "
                    f"seconds: " + "; ".join(f"{k} {[round(x, 4) for x in v]}"
                                             for k, v in p["epoch_s"].items())]
    return out


def _train(entry, results):
    a = entry.get("train") or {}
    out = ["", f"command: `{a.get('command')}`", f"{a.get('device')}", "",
           "| wall s | to first line (imports) s | to first epoch s | of which compile s | "
           "epochs (train + eval + checkpoint) s | epochs wall s | after the epochs "
           "(report) s | epoch s |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
           f"| {a.get('wall_s')} | {a.get('imports_s')} | {a.get('to_first_epoch_s')} | "
           f"{_round(a.get('compile_s'))} | {a.get('train_s')} + {a.get('eval_s')} + "
           f"{a.get('checkpoint_s')} | {a.get('epochs_wall_s')} | {a.get('after_epochs_s')} | "
           f"{a.get('epoch_s')} |", "", f"final epoch: {a.get('final')}"]
    ck = entry.get("checkpoint")
    if ck:
        out += ["", f"checkpoint written by `{ck['written_on']}`, read through "
                    f"load_predictor in two other processes: default device and "
                    f"JAX_PLATFORMS=cpu: same SHA-256 {ck['same_sha256']}, arrays equal "
                    f"{ck['arrays_equal']}; test accuracy of the read model: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in ck["test_accuracy"].items())]
        if ck.get("note"):
            out.append(f"note: {ck['note']}")
    for where, r in (entry.get("restore") or {}).items():
        if r["status"] != "ok":
            out.append(f"restore on {where}: {r['status']} {r.get('stderr_tail') or ''}")
    return out


def _precision(entry, results):
    if entry["status"].startswith("skipped"):
        return []
    runs = {"gpu (default precision: TF32)": (results["parts"].get("train_run") or {}).get(
        "train", {}), **{k: v for k, v in (entry.get("runs") or {}).items()}}
    out = ["", "| run | status | epochs | final test accuracy | final train loss | "
               "epoch s (median) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in runs.items():
        final = r.get("final") or {}
        epochs = sorted(r.get("epoch_s") or [])
        out.append(f"| {name} | {r.get('status')} | {final.get('epoch')} | "
                   f"{final.get('test_accuracy')} | {final.get('train_loss')} | "
                   f"{epochs[len(epochs) // 2] if epochs else None} |")
    by_epoch = {name: r["test_accuracy_by_epoch"] for name, r in runs.items()
                if r.get("test_accuracy_by_epoch")}
    if len({len(a) for a in by_epoch.values()}) > 1:  # one run stopped early
        last = min(len(a) for a in by_epoch.values())
        out += ["", f"at epoch {last}, the last every run reached: test accuracy "
                    + ", ".join(f"{name} {a[last - 1]}" for name, a in by_epoch.items())]
    return out


def _seeds(entry, results):
    r = entry.get("result") or {}
    return ["", f"asked: {entry.get('asked')}", "", r.get("table") or "(no rows)",
            *[f"- {s}" for s in r.get("skipped", [])]]


def _round(x):
    return round(x, 2) if isinstance(x, float) else x


RENDER = {"environment": _environment, "tests": _tests, "conv_formulations": _conv,
          "bench_lenet5": _bench, "bench_cnn": _bench, "train_run": _train,
          "precision": _precision, "seeds": _seeds}
