"""Every calibration error before and after each calibration map, with intervals, for finished
run folders: `python -m benchmarks.calibration_maps --runs RUN [RUN ...] [--data-dir DIR]`
copies each run once per map, evaluates the copy with `scripts/evaluate.py --calibration MAP`
(the run itself is not touched) and prints markdown tables: per run, the comparison every
report holds (each map's 5-fold CV NLL on validation and its point values on test), then
each error with its 95% interval before calibration and after each map, and the wall time
of each evaluation."""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fmnist_jax.evaluation.report import CALIBRATION_INTERVALS, CALIBRATION_ROWS
from fmnist_jax.run.results import CALIBRATION_KINDS

REPO = Path(__file__).resolve().parent.parent
TABLE_COLUMNS = (("cv_nll_validation", "CV NLL (val)", "{:.4f}"), ("nll", "NLL", "{:.4f}"),
                 ("brier", "Brier", "{:.4f}"),
                 *((name, label, "{:.2%}") for name, label in CALIBRATION_ROWS),
                 ("accuracy", "accuracy", "{:.2%}"), ("predictions_changed", "changed", "{}"))


def evaluate_copy(run: Path, kind: str, scratch: Path, extra: list[str]) -> tuple[dict, float]:
    copy = scratch / f"{run.name}-{kind}"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tensorboard"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "scripts/evaluate.py", str(copy), "--calibration", kind,
                    *extra], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((copy / "report.json").read_text()), time.perf_counter() - started


def _interval(section: dict, name: str) -> str:
    low, high = section[name + "_ci95"]
    return f"{section[name]:.2%} [{low:.2%}, {high:.2%}]"


def tables(run: Path, reports: dict[str, dict], seconds: dict[str, float]) -> str:
    first = reports[CALIBRATION_KINDS[0]]["calibration"]
    lines = [f"### {run}", "",
             f"Each map fit on {reports[CALIBRATION_KINDS[0]]['n_validation']} validation "
             f"images; recommended (lowest CV NLL): **{first['recommended']}**", "",
             "| map | " + " | ".join(label for _, label, _ in TABLE_COLUMNS) + " |",
             "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for kind in ("none",) + CALIBRATION_KINDS:
        row = first["maps"][kind]
        lines.append(f"| {kind} | " + " | ".join(fmt.format(row[name])
                                                 for name, _, fmt in TABLE_COLUMNS) + " |")
    before = reports[CALIBRATION_KINDS[0]]["before_temperature"]
    lines += ["", "| error (95% CI) | before | " + " | ".join(CALIBRATION_KINDS) + " |",
              "|---" * (len(CALIBRATION_KINDS) + 2) + "|"]
    for name, label in CALIBRATION_ROWS:
        lines.append(f"| {label} | {_interval(before, name)} | " + " | ".join(
            _interval(reports[kind]["after_temperature"], name) for kind in CALIBRATION_KINDS)
            + " |")
    lines += ["", "evaluation wall time (s, compile included): " + ", ".join(
        f"{kind} {seconds[kind]:.1f}" for kind in CALIBRATION_KINDS)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, type=Path)
    parser.add_argument("--data-dir", help="passed on to scripts/evaluate.py")
    args = parser.parse_args()
    extra = ["--data-dir", args.data_dir] if args.data_dir else []
    assert set(CALIBRATION_INTERVALS) == {name for name, _ in CALIBRATION_ROWS}
    with tempfile.TemporaryDirectory() as scratch:
        for run in args.runs:
            results = {kind: evaluate_copy(run, kind, Path(scratch), extra)
                       for kind in CALIBRATION_KINDS}
            print(tables(run, {k: r for k, (r, _) in results.items()},
                         {k: s for k, (_, s) in results.items()}), "\n", flush=True)


if __name__ == "__main__":
    main()
