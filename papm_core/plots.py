"""PNG plots for reports: labelled heatmaps and dendrograms (matplotlib, Agg backend).

Each function writes its PNG atomically and returns the path.

Example::

    python -c "import numpy as np; from papm_core.plots import heatmap
    heatmap(np.eye(3), list('abc'), 'x.png', 'demo')"
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .util import atomic_write


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _figure()
    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return out


def heatmap(matrix: np.ndarray, labels: list[str], path: str | Path, title: str) -> Path:
    """A labelled, annotated heatmap of a square matrix."""
    plt = _figure()
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.55 * k))
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(matrix[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    return _save(fig, path)


def dendrogram(sim: np.ndarray, labels: list[str], path: str | Path, title: str) -> Path:
    """Average-linkage dendrogram of distance 1 - similarity (the clustering's linkage)."""
    from scipy.cluster.hierarchy import dendrogram as dgram
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    plt = _figure()
    dist = np.clip(1.0 - (sim + sim.T) / 2, 0, None)
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method="average")
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * len(labels), 4))
    dgram(z, labels=labels, ax=ax, leaf_rotation=45)
    ax.set_ylabel("distance (1 - similarity)")
    ax.set_title(title)
    return _save(fig, path)


def figure(ncols: int = 1, size: tuple[float, float] = (5.0, 3.6)):
    """(fig, axes) of a row of ``ncols`` plots, size in inches per plot."""
    return _figure().subplots(1, ncols, figsize=(size[0] * ncols, size[1]))


save = _save
