"""The evaluation's time, compile apart from compute, against an earlier commit's code in the
same run: `python -m benchmarks.time_evaluation RUN --baseline REV [--rounds 2] [--end-to-end]
[--data-dir DIR] [--manual-dir DIR]`.

The run's test and validation logits are computed once; then each round starts a fresh
process for the baseline (REV's `fmnist_jax`, from `git archive`) and one for this tree's, in
turn, so that a change of the machine's load hits both alike. Each process calls
`compute_report` twice on the same logits and key: cold (everything compiles) and warm (all
compiled: compute and dispatch only), and counts XLA's compiles and their seconds (tracing,
lowering, backend) with `jax.monitoring`; every clock read follows a `block_until_ready`
(the report's numbers are Python floats by then). `--end-to-end` also times `scripts/
evaluate.py RUN --compile-cache none` of each tree on a copy of the run folder, as a user
runs it. Both trees' reports must be equal to the bit (it prints the largest difference
otherwise); no persistent compile cache is used, and every process gets a temporary HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def child(logits_file: str, n_resamples: int) -> dict:
    """In a fresh process: cold and warm `compute_report`, with the compiles of each."""
    import jax
    import numpy as np

    from fmnist_jax import streams
    from fmnist_jax.evaluation.report import compute_report

    compiles: list[tuple[str, str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append((event, kw.get("fun_name", "?"), seconds))
        if event in COMPILE_EVENTS else None)
    arrays = np.load(logits_file)
    inputs = [jax.block_until_ready(jax.device_put(arrays[k]))
              for k in ("test", "test_labels", "val", "val_labels")]
    key = streams.stream_key(0, streams.BOOTSTRAP)
    out: dict = {}
    for phase in ("cold", "warm"):
        before = len(compiles)
        start = time.perf_counter()
        report = compute_report(*inputs, key=key, n_resamples=n_resamples)
        seconds = time.perf_counter() - start
        mine = compiles[before:]
        backend = [(name, s) for event, name, s in mine if event == COMPILE_EVENTS[2]]
        out[phase] = {"seconds": seconds, "compile_s": sum(s for _, _, s in mine),
                      "compiles": len(backend),
                      "largest": sorted(backend, key=lambda x: -x[1])[:6],
                      "names": sorted(name for name, _ in backend)}
    out["report"] = report
    return out


def _tree(rev: str, into: Path) -> Path:
    """REV's fmnist_jax and scripts, extracted into `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "fmnist_jax", "scripts"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _env(tree: Path, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMNIST_COMPILE_CACHE")}
    env.update(PYTHONPATH=str(tree), HOME=str(home))
    return env


def differences(a, b, path: str = "") -> list[tuple[str, float]]:
    """(where, |a - b|) for every number that differs between two JSON documents of the
    same shape (inf where anything else differs)."""
    if isinstance(a, dict):
        return [d for k in a for d in differences(a[k], b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if a == b:
        return []
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return [(path, abs(a - b) if numbers else float("inf"))]


def _verdict(old, new) -> str:
    found = differences(old, new)
    if not found:
        return "bit-identical"
    worst = max(found, key=lambda d: d[1])
    return (f"DIFFER in {len(found)} numbers, the largest by {worst[1]:.3g} at {worst[0]} "
            f"(first: {', '.join(p for p, _ in found[:5])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time scripts/evaluate.py of each tree")
    parser.add_argument("--data-dir")
    parser.add_argument("--manual-dir")
    parser.add_argument("--child", metavar="LOGITS", help=argparse.SUPPRESS)
    parser.add_argument("--keep", metavar="DIR", help="also write each tree's first report "
                        "there (baseline.json, new.json)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.resamples)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"baseline": _tree(args.baseline, tmp / "baseline"), "new": REPO}
        logits_file = tmp / "logits.npz"
        _save_logits(args, logits_file)
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, tree in trees.items():
                home = tmp / f"home-{name}-{r}"
                home.mkdir()
                result = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", str(logits_file),
                     "--resamples", str(args.resamples)], env=_env(tree, home), check=True,
                    capture_output=True, text=True)
                runs[name].append(json.loads(result.stdout.splitlines()[-1]))
                if args.end_to_end:
                    runs[name][-1]["end_to_end"] = _evaluate_py(args, tree, tmp, f"{name}-{r}")
                print(f"round {r + 1} {name}: cold {runs[name][-1]['cold']['seconds']:.2f} s, "
                      f"warm {runs[name][-1]['warm']['seconds']:.2f} s", flush=True)
        print(_table(runs, args.end_to_end))
        if args.keep:
            for name in runs:
                Path(args.keep, f"{name}.json").write_text(json.dumps(runs[name][0]["report"]))
        print("compute_report's reports: "
              + _verdict(runs["baseline"][0]["report"], runs["new"][0]["report"]))


def _save_logits(args, path: Path) -> None:
    import jax.numpy as jnp
    import numpy as np

    from fmnist_jax import data
    from fmnist_jax.evaluation.report import load_run
    from fmnist_jax.models import get_model
    from fmnist_jax.steps import inference_state, predict_logits

    run = load_run(args.run_dir)
    train, test = data.load(data_dir=args.data_dir, manual_dir=args.manual_dir)
    _, val = data.split_train_val(train, run.config.val_fraction, run.config.split_seed)
    state = inference_state(get_model(run.config.model), run.variables)

    def logits(split):
        return np.asarray(predict_logits(state, jnp.asarray(split.images_NxHxWx1),
                                         batch_size=run.config.eval_batch_size,
                                         norm=run.normalization))

    np.savez(path, test=logits(test), test_labels=test.labels_N, val=logits(val),
             val_labels=val.labels_N)


def _evaluate_py(args, tree: Path, tmp: Path, name: str) -> dict:
    """`scripts/evaluate.py` of `tree` on a copy of the run folder: wall seconds, compiles
    (counted from JAX_LOG_COMPILES) and the report.json it wrote."""
    import shutil

    run_copy = tmp / f"run-{name}"
    shutil.copytree(args.run_dir, run_copy)
    home = tmp / f"home-e2e-{name}"
    home.mkdir()
    flags = [f"--{flag.replace('_', '-')}={getattr(args, flag)}"
             for flag in ("data_dir", "manual_dir") if getattr(args, flag)]
    env = {**_env(tree, home), "JAX_LOG_COMPILES": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(tree / "scripts" / "evaluate.py"), str(run_copy),
                             "--compile-cache", "none", *flags], env=env, check=True,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "compiles": result.stderr.count("Finished XLA compilation"),
            "report": json.loads((run_copy / "report.json").read_text())}


def _table(runs: dict[str, list[dict]], end_to_end: bool) -> str:
    def median(name, *path):
        values = []
        for run in runs[name]:
            for step in path:
                run = run[step]
            values.append(run)
        return statistics.median(values)

    rows = [("compute_report cold (s)", "cold", "seconds"),
            ("  of which compiling (s)", "cold", "compile_s"),
            ("  compiles", "cold", "compiles"),
            ("compute_report warm (s)", "warm", "seconds"),
            ("  compiles", "warm", "compiles")]
    if end_to_end:
        rows += [("evaluate.py (s)", "end_to_end", "seconds"),
                 ("  compiles", "end_to_end", "compiles")]
    lines = ["| | baseline | new | new / baseline |", "| --- | --- | --- | --- |"]
    for label, *path in rows:
        old, new = median("baseline", *path), median("new", *path)
        lines.append(f"| {label} | {old:.2f} | {new:.2f} | "
                     f"{new / old if old else float('nan'):.3f} |")
    lines.append(f"(medians of {len(runs['new'])} rounds)")
    for name in runs:
        lines.append(f"{name}, largest compiles (cold, first round): " + ", ".join(
            f"{fn} {s:.2f} s" for fn, s in runs[name][0]["cold"]["largest"]))
    if end_to_end:
        lines.append("evaluate.py's report.json: " + _verdict(
            *(runs[n][0]["end_to_end"]["report"] for n in ("baseline", "new"))))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
