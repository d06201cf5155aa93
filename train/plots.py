"""PNG plots for a run folder: loss per epoch and the precision-recall curve over Hamming radius."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training hosts have no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(history: list[float], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(history) + 1), history, marker=".")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pr(precision, recall, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(recall, precision, marker=".")
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
