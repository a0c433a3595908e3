"""The latent map: where synthetic items sit among real ones in an embedding space, and how much they cover.

Embeddings are the in-domain feature-encoder vectors of the realism metric
(:mod:`medsynth.evaluation.features`) or the autoencoder's flattened latent means. Three sets:
``T`` the real TEST items, ``R`` the real TRAIN items, ``S`` synthetic items generated from
training masks (never from the test masks: an image drawn from a test item's own mask would sit next
to it by construction). Distances are Euclidean in the embedding space (never in the 2D map).

:func:`coverage` — for each real test item ``t``: ``d_R(t)`` its distance to the nearest real train
item, ``d_S(t)`` to the nearest synthetic item; ``tau`` the ``q``-quantile of ``{d_R(t)}`` (how far
real data is from real data). Then

* **coverage** = fraction of ``t`` whose nearest neighbour in ``R ∪ S`` is synthetic
  (``d_S(t) < d_R(t)``) AND within ``tau`` (``d_S(t) <= tau``). With ``|S| = |R|`` and synthetic items
  drawn from the real distribution it is near ``q / 2``; 0 means no test item has a synthetic item
  as its closest neighbour.
* **recall** = fraction of ``t`` with ``d_S(t) <= tau``: a synthetic item within the real-real reach
  (about ``q`` for an ideal generator, whatever the set sizes); ``recall_reference`` is the same for
  ``R`` itself (``q`` by construction of ``tau`` up to ties).
* **nn_synthetic** = fraction of ``t`` with ``d_S(t) < d_R(t)`` (no radius).
* **precision** = fraction of synthetic items within ``tau`` of some real test item ("synthetic items
  near real test"); ``precision_reference`` the same for the real train items.

A generator that collapses onto part of the real manifold keeps precision high and loses recall; a
generator off the manifold loses both. :func:`coverage_reading` states which, from the numbers.
:func:`umap_2d` draws the map with umap-learn when installed (optional extra ``medsynth[analysis]``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medsynth.fileio import write_atomic, write_text_atomic
from medsynth.na import needs

FloatArray = npt.NDArray[np.float64]

UMAP_MISSING = "n/a (umap-learn not installed: pip install 'medsynth[analysis]')"


def _nearest(a: FloatArray, b: FloatArray, chunk: int = 1024) -> FloatArray:
    """``(len(a),)`` Euclidean distance of each row of ``a`` ``(n, F)`` to its nearest row of ``b`` ``(m, F)``."""
    out = np.empty(len(a), dtype=np.float64)
    bb = (b * b).sum(1)
    for i in range(0, len(a), chunk):
        x = a[i : i + chunk]
        d2 = (x * x).sum(1)[:, None] + bb[None, :] - 2.0 * x @ b.T
        out[i : i + chunk] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def coverage(
    test: npt.ArrayLike, train: npt.ArrayLike, synthetic: npt.ArrayLike, quantile: float = 0.95, min_items: int = 5
) -> dict[str, Any]:
    """Coverage of the real test items by synthetic items (definitions in the module doc).

    Args:
        test: ``(n_T, F)`` embeddings of the real test items.
        train: ``(n_R, F)`` embeddings of the real train items.
        synthetic: ``(n_S, F)`` embeddings of synthetic items (from training masks).
        quantile: ``q`` of the radius ``tau`` (quantile of the test items' nearest-train distances).
        min_items: Fewer items in any set: every number None and ``na`` says why.

    Returns:
        ``{"coverage", "recall", "recall_reference", "nn_synthetic", "precision", "precision_reference",
        "tau", "quantile", "n_test", "n_train", "n_synthetic", "na"}`` (``na`` None when computed).
    """
    t, r, s = (np.asarray(x, dtype=np.float64).reshape(len(np.asarray(x)), -1) for x in (test, train, synthetic))
    out: dict[str, Any] = {
        "quantile": quantile,
        "n_test": len(t),
        "n_train": len(r),
        "n_synthetic": len(s),
        "na": None,
    }
    keys = ("coverage", "recall", "recall_reference", "nn_synthetic", "precision", "precision_reference", "tau")
    for what, arr in (("real test items", t), ("real train items", r), ("synthetic items", s)):
        if len(arr) < min_items:
            return {**out, **dict.fromkeys(keys), "na": needs(min_items, what, len(arr))}
    d_r, d_s = _nearest(t, r), _nearest(t, s)
    tau = float(np.quantile(d_r, quantile))
    s_to_t, r_to_t = _nearest(s, t), _nearest(r, t)
    return {
        **out,
        "tau": tau,
        "coverage": float(np.mean((d_s < d_r) & (d_s <= tau))),
        "recall": float(np.mean(d_s <= tau)),
        "recall_reference": float(np.mean(d_r <= tau)),
        "nn_synthetic": float(np.mean(d_s < d_r)),
        "precision": float(np.mean(s_to_t <= tau)),
        "precision_reference": float(np.mean(r_to_t <= tau)),
    }


def coverage_reading(cov: dict[str, Any]) -> str:
    """One sentence on whether synthetic items cover the real test manifold, read off :func:`coverage`.

    Rule: recall at least 0.8 of its real reference -> "cover"; else, precision at least 0.8 of its
    reference -> "collapse onto part of it"; else "lie off it".
    """
    if cov.get("na"):
        return f"Coverage {cov['na']}."
    rec, rec_ref = float(cov["recall"]), float(cov["recall_reference"])
    prec, prec_ref = float(cov["precision"]), float(cov["precision_reference"])
    nums = (
        f"coverage {cov['coverage']:.3f} (nearest neighbour synthetic and within the radius; about "
        f"{cov['quantile'] / 2:.2f} for an ideal generator with as many synthetic as real train items), recall "
        f"{rec:.3f} vs {rec_ref:.3f} for real train items, precision {prec:.3f} vs {prec_ref:.3f}"
    )
    if rec >= 0.8 * rec_ref:
        verdict = "synthetic items cover the real test manifold"
    elif prec >= 0.8 * prec_ref:
        verdict = "synthetic items collapse onto part of the real test manifold (they lie on it but miss regions)"
    else:
        verdict = "synthetic items lie largely off the real test manifold"
    return f"In this embedding, {verdict}: {nums}."


def umap_2d(points: npt.ArrayLike, n_neighbors: int, min_dist: float, metric: str, seed: int) -> FloatArray:
    """``(N, 2)`` UMAP coordinates of ``points`` ``(N, F)`` (umap-learn, one thread, seeded).

    Raises:
        ImportError: If umap-learn is not installed.
    """
    import importlib

    umap = importlib.import_module("umap")  # optional extra: imported only here
    x = np.asarray(points, dtype=np.float64)
    reducer = umap.UMAP(
        n_neighbors=max(2, min(n_neighbors, len(x) - 1)),
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        n_jobs=1,
        init="spectral" if len(x) > n_neighbors + 2 else "random",
    )
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def umap_available() -> bool:
    """True when umap-learn can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def write_map_csv(path: Path, coords: FloatArray | None, items: Sequence[dict[str, Any]]) -> Path:
    """``latent_map.csv``: one row per item (``x, y`` empty without a map) with its split, patient, site, lesion."""
    buf = io.StringIO()
    fields = ["item_id", "set", "patient", "site", "lesion", "lesion_voxels", "size_group", "x", "y"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for i, it in enumerate(items):
        row = {k: it.get(k) for k in fields[:7]}
        row["x"] = "" if coords is None else f"{coords[i, 0]:.5f}"
        row["y"] = "" if coords is None else f"{coords[i, 1]:.5f}"
        w.writerow(row)
    return write_text_atomic(path, buf.getvalue())


def map_figure(path: Path, coords: FloatArray, items: Sequence[dict[str, Any]], title: str) -> Path:
    """PNG of the 2D map in four panels coloured by set, lesion presence, lesion size and site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    markers = {"real train": "o", "real test": "s", "synthetic": "^"}

    def scatter_by(ax: Any, key: str, name: str) -> None:
        values = [str(it.get(key)) for it in items]
        cats = sorted(set(values))
        cmap = plt.get_cmap("tab10")
        for j, c in enumerate(cats):
            for st, mk in markers.items():
                idx = [i for i, it in enumerate(items) if values[i] == c and it["set"] == st]
                if idx:
                    ax.scatter(
                        coords[idx, 0],
                        coords[idx, 1],
                        s=10,
                        marker=mk,
                        color=cmap(j % 10),
                        alpha=0.7,
                        label=f"{c}" if key != "set" else st,
                    )
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=False))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, markerscale=1.5, loc="best")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])

    scatter_by(axes[0], "set", "set (o real train, ■ real test, ▲ synthetic)")
    scatter_by(axes[1], "lesion", "lesion present")
    size = np.array([math.log1p(float(it.get("lesion_voxels") or 0)) for it in items])
    sc = axes[2].scatter(coords[:, 0], coords[:, 1], c=size, s=10, cmap="viridis")
    fig.colorbar(sc, ax=axes[2], label="log(1 + lesion voxels)")
    axes[2].set_title("lesion size")
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    scatter_by(axes[3], "site", "site")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return write_atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    finally:
        plt.close(fig)
