"""PNG plots of a training run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Three panels: train/val loss, val accuracy and macro F1, learning rate."""
    plt = _pyplot()
    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(epochs, [h.get("train_loss") for h in history], marker="o", label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax.plot(epochs, [h.get("val_loss") for h in history], marker="o", label="val")
    ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [h.get("val_accuracy") for h in history], marker="o", label="val accuracy")
    ax.plot(epochs, [h.get("val_f1_macro") for h in history], marker="s", label="val macro F1")
    ax.set(title="validation", xlabel="epoch", ylim=(0, 1.02))
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [h.get("lr") for h in history], marker="o")
    ax.set(title="learning rate (head, end of epoch)", xlabel="epoch")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    from matplotlib.ticker import MaxNLocator

    for a in axes:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                          title: str = "confusion matrix (test)") -> Path:
    """Row-normalised colours, raw counts written in the cells."""
    import numpy as np

    plt = _pyplot()
    path = Path(path)
    cm = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
