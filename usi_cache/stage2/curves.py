"""Validation curves of training runs: `usi curves` reads each run's log.jsonl and draws them
into one PNG (matplotlib on the Agg backend, loaded by `plotting.pyplot` when drawing)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from usi_cache.plotting import _colors, _save, pyplot


def read_curve(run: str | Path, key: str = "val_top1") -> list[float]:
    """`key` per epoch from a training run's log.jsonl (its epoch records: step records have "step")."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log (is {run} a run folder?)")
    import json
    records = (json.loads(ln) for ln in path.read_text().splitlines() if ln.strip())
    return [r[key] for r in records if "step" not in r]


def plot_curves(groups: dict[str, list[list[float]]], path: str | Path, *, title: str = "",
                ylabel: str = "val top-1 (%)") -> Path:
    """One line per group: the mean over its runs per epoch, with a band from the lowest to the
    highest run (one run: the line alone); left every epoch, right the second half zoomed in,
    where the rows separate. groups: label -> one list of values per run (per epoch); runs of
    different lengths are cut to the shortest."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), dpi=110, gridspec_kw={"width_ratios": [1, 1.25]})
    for (label, runs), color in zip(groups.items(), _colors(len(groups))):
        n = min(len(r) for r in runs)
        a = np.array([r[:n] for r in runs], dtype=float)
        epochs = np.arange(1, n + 1)
        mean = a.mean(0)
        for ax, start in ((axes[0], 0), (axes[1], n // 2)):
            ax.plot(epochs[start:], mean[start:], color=color, marker="o", markersize=3,
                    label=f"{label}: {mean[-1]:.2f} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
            if len(runs) > 1:
                ax.fill_between(epochs[start:], a.min(0)[start:], a.max(0)[start:], color=color, alpha=0.15,
                                linewidth=0)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("every epoch", fontsize=9)
    axes[1].set_title("second half (zoomed); band: lowest to highest run", fontsize=9)
    axes[1].legend(loc="lower right", fontsize=8, title="mean over runs at the last epoch", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
