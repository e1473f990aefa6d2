"""The end of a sweep (`--sweep`): each grid point's validation accuracy over its seeds, the
point chosen by it (the test set never chooses), that point's test accuracy; sweep.json, its
table and sweep.png (validation accuracy against each swept value).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fmnist_jax import metrics
from fmnist_jax.run import folder, results
from fmnist_jax.run.config import TrainConfig, flag_words, point_name


def point_rows(cfg: TrainConfig, kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point from each member's kept model (`kept`, in `cfg.members()`'s
    order: the points' seeds together): its values, folder, each seed's validation and test
    accuracy, and their means (with a 95% Student-t interval over two or more seeds)."""
    rows = []
    for p, point in enumerate(cfg.points()):
        seeds = kept[p * cfg.seeds:(p + 1) * cfg.seeds]
        val, test = [row["val_accuracy"] for row in seeds], [row["test_accuracy"] for row in seeds]
        rows.append({"point": point, "folder": point_name(point),
                     "seeds": [{"seed": row["seed"], "epoch": row["epoch"],
                                "val_accuracy": row["val_accuracy"],
                                "test_accuracy": row["test_accuracy"]} for row in seeds],
                     "val_accuracy": _mean(val), "test_accuracy": _mean(test)})
    return rows


def _mean(values: list[float]) -> dict[str, Any]:
    if len(values) < 2:
        return {"n": len(values), "mean": float(np.mean(values)), "interval": None}
    return metrics.mean_and_interval(values)


def summarize(run_dir: Path, cfg: TrainConfig, kept: list[dict[str, Any]],
              log_fn: Callable[[str], Any]) -> dict[str, Any]:
    """Write sweep.json and sweep.png of the sweep in `run_dir` and log its table. The point
    chosen has the highest mean validation accuracy (ties: the earlier point)."""
    rows = point_rows(cfg, kept)
    chosen = max(range(len(rows)), key=lambda p: (rows[p]["val_accuracy"]["mean"], -p))
    summary = {"metric": "validation accuracy of each member's kept model (its best "
                         "validation epoch), mean over the point's seeds; the test set never "
                         "chooses",
               "fields": list(cfg.grid()), "seeds": cfg.seeds, "points": rows,
               "chosen": {"index": chosen, "point": rows[chosen]["point"],
                          "folder": rows[chosen]["folder"],
                          "val_accuracy": rows[chosen]["val_accuracy"],
                          "test_accuracy": rows[chosen]["test_accuracy"]}}
    results.save_sweep(run_dir, summary)
    plot_sweep(summary, run_dir / folder.SWEEP_PLOT_FILE)
    for line in table_lines(summary):
        log_fn(line)
    log_fn(f"sweep: {run_dir / folder.SWEEP_FILE}, {run_dir / folder.SWEEP_PLOT_FILE}")
    return summary


def _accuracy_text(stat: dict[str, Any]) -> str:
    if stat["interval"] is None:
        return f"{stat['mean']:.4f}"
    low, high = stat["interval"]
    return f"{stat['mean']:.4f} [{low:.4f}, {high:.4f}]"


def table_lines(summary: dict[str, Any]) -> list[str]:
    """sweep.json as a table (one line per point, the chosen one marked) and its verdict."""
    names = summary["fields"]
    widths = [max(len(name), 8) for name in names]
    interval = " (95% CI)" if summary["seeds"] > 1 else ""
    lines = ["  ".join(name.rjust(w) for name, w in zip(names, widths))
             + f"  val acc{interval:>9s}  test acc"]
    for p, row in enumerate(summary["points"]):
        mark = "  <- chosen" if p == summary["chosen"]["index"] else ""
        lines.append("  ".join(f"{row['point'][name]:g}".rjust(w) for name, w in zip(names, widths))
                     + f"  {_accuracy_text(row['val_accuracy'])}"
                     + f"  {row['test_accuracy']['mean']:.4f}{mark}")
    chosen = summary["chosen"]
    lines.append(f"chosen by validation accuracy: {chosen['folder']} (mean of "
                 f"{summary['seeds']} seed{'s' if summary['seeds'] > 1 else ''}); its test "
                 f"accuracy: {_accuracy_text(chosen['test_accuracy'])}")
    return lines


def plot_sweep(summary: dict[str, Any], path: Path) -> None:
    """Validation accuracy (mean over seeds, with its interval) against each swept field's
    values, one panel per field; the points that share the other fields' values are joined."""
    panels = []
    for name in summary["fields"]:
        others = [other for other in summary["fields"] if other != name]
        lines: dict[str, list[tuple[float, float, tuple[float, float] | None]]] = {}
        for row in summary["points"]:
            key = ", ".join(f"{flag_words(o)} {row['point'][o]:g}" for o in others)
            stat = row["val_accuracy"]
            lines.setdefault(key, []).append((row["point"][name], stat["mean"],
                                              stat["interval"]))
        panels.append((flag_words(name), lines))
    _plot_panels(panels, path)


def _plot_panels(panels: list[tuple[str, dict]], path: Path) -> None:
    """One panel per swept field (name, {line label: [(value, mean, interval or None)]}):
    mean validation accuracy against the field's values, with error bars where there is an
    interval; a log axis where the values are positive and span a factor of 10 or more."""
    import matplotlib  # about a second to import: only here

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels):
        for label, points in lines.items():
            points = sorted(points)
            x = np.array([p[0] for p in points], float)
            y = np.array([p[1] for p in points], float)
            intervals = [p[2] for p in points]
            if all(i is not None for i in intervals):
                err = np.array([[m - i[0] for m, i in zip(y, intervals)],
                                [i[1] - m for m, i in zip(y, intervals)]])
                ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=label or None)
            else:
                ax.plot(x, y, "o-", label=label or None)
        values = [p[0] for points in lines.values() for p in points]
        if min(values) > 0 and max(values) >= 10 * min(values):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("validation accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        if any(lines):
            ax.legend(fontsize=8)
    fig.suptitle("Sweep: validation accuracy of each grid point")
    fig.tight_layout()
    png = io.BytesIO()  # rendered whole, then written atomically: no half figure
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    folder.write_file(path, png.getvalue())
