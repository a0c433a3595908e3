"""Pictures people look at: image/mask overlays and grids (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from medsynth.fileio import write_atomic

_COLOURS = (
    np.array(
        [
            [0, 0, 0],
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
            [210, 245, 60],
        ],
        dtype=np.float32,
    )
    / 255.0
)


def representative_slice(image: npt.NDArray[np.generic], mask: npt.NDArray[np.generic] | None, axis: int = 2) -> int:
    """Index along ``axis`` of a 3D array with the most foreground (the middle slice without mask)."""
    if mask is not None and np.any(np.asarray(mask, dtype=np.int64) > 0):
        counts = (np.asarray(mask, dtype=np.int64) > 0).sum(axis=tuple(a for a in range(3) if a != axis))
        return int(np.argmax(counts))
    return int(image.shape[axis] // 2)


def to_2d(array: npt.NDArray[np.generic], index: int | None = None, axis: int = 2) -> npt.NDArray[np.generic]:
    """A displayable 2D array (rows, cols) from an index-ordered 2D or 3D array."""
    a = np.asarray(array)
    while a.ndim > 3:
        a = a[0]
    if a.ndim == 3:
        a = np.take(a, a.shape[axis] // 2 if index is None else index, axis=axis)
    return a.T


def overlay_rgb(
    image: npt.NDArray[np.generic], mask: npt.NDArray[np.generic] | None, alpha: float = 0.4
) -> npt.NDArray[np.float32]:
    """Blend a 2D display-ordered image (any range) with label colours.

    Args:
        image: ``(H, W)`` intensities; scaled to [0, 1] by its 1st/99th percentiles.
        mask: ``(H, W)`` integer labels or None.
        alpha: Opacity of the label colours.

    Returns:
        ``(H, W, 3)`` RGB in [0, 1].
    """
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    g = np.clip((img - lo) / max(float(hi - lo), 1e-8), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    if mask is not None:
        m = np.asarray(mask).astype(np.int64)
        col = _COLOURS[np.clip(m, 0, len(_COLOURS) - 1)]
        sel = m > 0
        rgb[sel] = (1 - alpha) * rgb[sel] + alpha * col[sel]
    return rgb.astype(np.float32)


def save_grid(
    path: str | Path,
    rows: Sequence[Sequence[npt.NDArray[np.generic]]],
    titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    cell_inches: float = 2.0,
) -> Path:
    """Save a grid of 2D panels (grey ``(H, W)`` or RGB ``(H, W, 3)``, display-ordered) as a PNG.

    Args:
        path: Output PNG (written atomically).
        rows: Panels per row.
        titles: One label per row (drawn left of the row).
        col_titles: One title per column.
        cell_inches: Size of each panel.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = max(len(rows), 1)
    n_cols = max((len(r) for r in rows), default=1)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows), squeeze=False)
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if i < len(rows) and j < len(rows[i]):
                panel = np.asarray(rows[i][j])
                ax.imshow(panel, cmap=None if panel.ndim == 3 else "gray", interpolation="nearest")
            if i == 0 and col_titles and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=8)
        if titles and i < len(titles):
            axes[i][0].text(-0.05, 0.5, titles[i], transform=axes[i][0].transAxes, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=80, format="png"))
    plt.close(fig)
    return Path(path)
