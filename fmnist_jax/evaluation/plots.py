"""PNG figures of a run: confusion matrix, reliability diagrams, training curves (matplotlib)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fmnist_jax.errors import FmnistError  # noqa: E402
from fmnist_jax.files import write_atomically  # noqa: E402
from fmnist_jax.metrics import Reliability  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """`fig` as a PNG at `path`, written whole or not at all (rendered in memory, then
    `write_atomically`); the figure is closed either way. FmnistError when it cannot be
    written."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120)
        write_atomically(Path(path), buffer.getvalue())
    except OSError as e:
        raise FmnistError(f"cannot write {path} ({e.strerror or e}): free some space or "
                          f"check the folder's permissions, then evaluate again") from e
    finally:
        plt.close(fig)


def plot_confusion_matrix(cm_CxC: np.ndarray, class_names: Sequence[str], path: Path,
                          title: str = "Confusion matrix (test)") -> None:
    """Counts with true classes as rows and predicted classes as columns, as sklearn."""
    cm_CxC = np.asarray(cm_CxC)
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(cm_CxC, cmap="Blues")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("test images (count)")
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
    save_figure(fig, path)


def plot_reliability(panels: Sequence[tuple[Reliability, dict, str]], path: Path) -> None:
    """Accuracy against confidence, one panel per (bins, calibration section of the report,
    title): before and after calibration.

    Bars at each non-empty bin's mean confidence, and the SmoothECE curve (the kernel
    regression at the SmoothECE bandwidth) with its 95% bootstrap band; the diagonal is
    perfect calibration.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5), sharey=True)
    axes = np.atleast_1d(axes)
    titled = [(rel, section, f"{name}, ECE {100 * section['ece']:.2f}%, SmoothECE "
                             f"{100 * section['smooth_ece']:.2f}%")
              for rel, section, name in panels]
    for ax, (rel, section, title) in zip(axes, titled):
        count = np.asarray(rel.count)
        lower = np.asarray(rel.lower)
        shown = count > 0
        width = 1.0 / max(len(count) - 1, 1)
        # The last bin holds only confidence exactly 1.0 and starts at 1.0: widen the axis by
        # one bin so that it is drawn, and mark it as such.
        bars = ax.bar(lower[shown], np.asarray(rel.accuracy)[shown], width=width,
                      align="edge", edgecolor="black", alpha=0.7, label="accuracy in bin")
        if shown[-1]:
            bars[-1].set_hatch("//")  # the confidence-1.0 bin, apart from the 1/15 bins
        ax.bar_label(bars, labels=[f"{c:,}" for c in count[shown]], fontsize=7, rotation=90,
                     padding=2)  # how many images each bar stands on
        ax.plot(np.asarray(rel.confidence)[shown], np.asarray(rel.accuracy)[shown], "o",
                color="C3", label="(mean confidence, accuracy)")
        smooth = {k: np.asarray(v) for k, v in section["smooth_reliability"].items()}
        seen = ((smooth["confidence"] >= smooth["seen"][0])  # no curve where no image is
                & (smooth["confidence"] <= smooth["seen"][1]))
        ax.fill_between(smooth["confidence"][seen], smooth["ci95_low"][seen],
                        smooth["ci95_high"][seen], color="C2", alpha=0.25, linewidth=0,
                        label="95% bootstrap band")
        ax.plot(smooth["confidence"][seen], smooth["accuracy"][seen], color="C2",
                label=f"smooth (bandwidth {section['smooth_ece_sigma']:.3f})")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_xlim(0, 1 + width)
        ax.set_ylim(0, 1.2)  # room for the counts above bars that reach 1
        ax.set_yticks(np.linspace(0, 1, 6))
        ticks = [0, 0.2, 0.4, 0.6, 0.8, 1 + width / 2]
        ax.set_xticks(ticks, ["0", "0.2", "0.4", "0.6", "0.8", "=1.0"])
        ax.set_xlabel("top-1 confidence (bins of 1/15; the last holds confidence exactly 1.0)")
        ax.set_title(title)
    axes[0].set_ylabel("accuracy (numbers above the bars: images in the bin)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Reliability diagram (test)")
    fig.tight_layout()
    save_figure(fig, path)


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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel("cross-entropy" if metric == "loss" else "accuracy")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.text(0.5, 0.01, "train: mean over the epoch's steps, while the weights change; "
             "validation and test: measured once, at the end of the epoch",
             ha="center", fontsize=9, style="italic")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)
