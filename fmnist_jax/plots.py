"""PNG figures of a run: confusion matrix, reliability diagrams, training curves (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist_jax.metrics import Reliability  # noqa: E402


def plot_confusion_matrix(cm_CxC: np.ndarray, class_names: Sequence[str], path: Path,
                          title: str = "Confusion matrix (test)") -> None:
    """Counts with true classes as rows and predicted classes as columns, as sklearn."""
    cm_CxC = np.asarray(cm_CxC)
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(cm_CxC, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    threshold = cm_CxC.max() / 2
    for (i, j), count in np.ndenumerate(cm_CxC):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(before: Reliability, after: Reliability, ece_before: float,
                     ece_after: float, temperature: float, path: Path) -> None:
    """Accuracy against mean confidence per bin, before and after temperature scaling.

    Bars at each non-empty bin's mean confidence; the diagonal is perfect calibration.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    panels = [(before, f"before: T = 1, ECE {100 * ece_before:.2f}%"),
              (after, f"after: T = {temperature:.3f}, ECE {100 * ece_after:.2f}%")]
    for ax, (rel, title) in zip(axes, panels):
        count = np.asarray(rel.count)
        shown = count > 0
        width = 1.0 / max(len(count) - 1, 1)
        ax.bar(np.asarray(rel.lower)[shown], np.asarray(rel.accuracy)[shown], width=width,
               align="edge", edgecolor="black", alpha=0.7, label="accuracy in bin")
        ax.plot(np.asarray(rel.confidence)[shown], np.asarray(rel.accuracy)[shown], "o",
                color="C3", label="(mean confidence, accuracy)")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence")
        ax.set_title(title)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.suptitle("Reliability diagram (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch for every split the history holds."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split in ("train", "val", "test"):
            key = f"{split}_{metric}"
            if key in history[0]:
                ax.plot(epochs, [row[key] for row in history], "o-", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy" if metric == "loss" else "accuracy")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
