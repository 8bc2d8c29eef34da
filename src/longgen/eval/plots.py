"""PNG figures of evaluation results (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("longgen's evaluation figures need matplotlib (pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_heatmap(
    path: str | os.PathLike, lengths: Sequence[int], depths: Sequence[float], acc: Sequence[Sequence[float]], title: str
) -> None:
    """Heatmap of accuracy: `acc[d][l]` for depth d (rows) and length l (columns), written to `path`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curve(path: str | os.PathLike, positions: Sequence[float], losses: Sequence[float], title: str) -> None:
    """Mean next-token loss against token position, written to `path`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(positions, losses, marker=".")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
