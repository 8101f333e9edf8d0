"""What the inspect figures and the training curves share: matplotlib, loaded on the Agg backend
(files only: works on headless machines) when a figure is drawn, never when a module is imported."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (matplotlib is slow to import)."""
    import matplotlib
    matplotlib.use("Agg")  # before pyplot: files only, works on headless machines
    import matplotlib.pyplot as plt
    return plt


def _colors(n: int):
    cmap = pyplot().get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    pyplot().close(fig)
    return path
