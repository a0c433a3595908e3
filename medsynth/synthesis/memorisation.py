"""Memorisation audit: is a synthetic image closer to a training image than unseen real images ever are?

For every synthetic image we find its nearest TRAINING image; for every real TEST image (patients
the generator never saw) the same. The test distances are the reference: how close an image that is
certainly not a copy comes to the training set. A synthetic image whose nearest distance falls below
the ``percentile``-th percentile of the test distances (default 1st) is flagged as a possible copy.

Distances (all vectorised as chunked matrix products, so thousands × thousands of images take
seconds):

* ``"ncc"`` (default): 1 − normalised cross-correlation (Pearson correlation of the voxels) —
  insensitive to global brightness/contrast changes; a constant image has correlation 0 with anything;
* ``"l2"``: RMS voxel difference;
* ``"ssim"``: 1 − SSIM, computed (MONAI ``SSIMMetric``) on the ``top_k`` nearest candidates by NCC
  only — an approximation when the SSIM-nearest image is not among them.

Feature vectors ``(N, F)`` may be given instead of images (any distance but ``ssim``).

Audit synthetic images generated from held-out (test) masks: an image generated from a training
mask shares that training image's layout by construction. With ``source_ids`` the report says how
often the nearest training image is the mask's own source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from medsynth.na import needs
from medsynth.viz import save_grid, to_2d

Distance = Literal["ncc", "l2", "ssim"]


def _flat(x: torch.Tensor | npt.NDArray[np.generic]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return t.detach().cpu().float().reshape(t.shape[0], -1)


def _prep(x: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "l2":
        return x
    c = x - x.mean(1, keepdim=True)
    n = c.norm(dim=1, keepdim=True)
    return torch.where(n > 1e-8, c / n.clamp_min(1e-8), torch.zeros_like(c))


def nearest_neighbours(
    queries: torch.Tensor | npt.NDArray[np.generic],
    reference: torch.Tensor | npt.NDArray[np.generic],
    distance: Literal["ncc", "l2"] = "ncc",
    k: int = 1,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest reference items of each query: ``(distances (Q, k), indices (Q, k))``, ascending.

    Chunked over queries and reference (memory ~ ``chunk² `` floats per block), float32 matrix products.
    """
    q, r = _flat(queries), _flat(reference)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and reference differ in size: {q.shape[1]} vs {r.shape[1]}")
    k = min(k, r.shape[0])
    dim = q.shape[1]
    out_d, out_i = [], []
    r_norm2 = (r * r).sum(1) if distance == "l2" else None
    for a in range(0, q.shape[0], chunk):
        qa = _prep(q[a : a + chunk], distance)
        best_d = torch.full((qa.shape[0], k), float("inf"))
        best_i = torch.zeros((qa.shape[0], k), dtype=torch.long)
        for b in range(0, r.shape[0], chunk):
            rb = _prep(r[b : b + chunk], distance)
            dot = qa @ rb.T
            if distance == "l2":
                assert r_norm2 is not None
                d2 = (qa * qa).sum(1, keepdim=True) + r_norm2[b : b + chunk][None] - 2.0 * dot
                d = (d2.clamp_min(0.0) / dim).sqrt()
            else:
                d = 1.0 - dot
            cat_d = torch.cat([best_d, d], 1)
            cat_i = torch.cat([best_i, torch.arange(b, b + rb.shape[0]).expand(qa.shape[0], -1)], 1)
            best_d, pos = cat_d.topk(k, dim=1, largest=False, sorted=True)
            best_i = cat_i.gather(1, pos)
        out_d.append(best_d)
        out_i.append(best_i)
    return torch.cat(out_d), torch.cat(out_i)


def _ssim_rerank(
    queries: torch.Tensor, reference: torch.Tensor, cand: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from monai.metrics import SSIMMetric

    spatial = queries.shape[2:]
    win = min(11, *spatial)
    win = win if win % 2 else win - 1
    metric = SSIMMetric(len(spatial), data_range=1.0, win_size=max(win, 1), reduction="none")
    q_idx = torch.arange(queries.shape[0]).repeat_interleave(cand.shape[1])
    r_idx = cand.reshape(-1)
    dist = torch.empty(r_idx.shape[0])
    for a in range(0, r_idx.shape[0], 256):
        s = metric(queries[q_idx[a : a + 256]].float(), reference[r_idx[a : a + 256]].float())
        dist[a : a + 256] = 1.0 - torch.as_tensor(s).reshape(-1)
    dist = dist.reshape(cand.shape)
    best = dist.argmin(1, keepdim=True)
    return dist.gather(1, best)[:, 0], cand.gather(1, best)[:, 0]


def nearest_distance(
    queries: torch.Tensor, reference: torch.Tensor, distance: Distance = "ncc", top_k: int = 5, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distance (Q,), index (Q,))`` of each query's nearest reference item under ``distance``."""
    if distance == "ssim":
        if queries.ndim < 4:
            raise ValueError("the 'ssim' distance needs images (N, 1, *S), not feature vectors")
        _, cand = nearest_neighbours(queries, reference, "ncc", top_k, chunk)
        return _ssim_rerank(queries, reference, cand)
    d, i = nearest_neighbours(queries, reference, distance, 1, chunk)
    return d[:, 0], i[:, 0]


@dataclass(frozen=True)
class MemorisationResult:
    """Outcome of :func:`memorisation_audit`.

    Attributes:
        threshold: Distance below which a synthetic image is flagged.
        flagged: ``(M,)`` bool per synthetic image.
        synth_distance: ``(M,)`` distance of each synthetic image to its nearest training image.
        synth_nearest: ``(M,)`` index of that training image.
        test_distance: ``(T,)`` nearest-training distance of each real test image (the reference).
        test_nearest: ``(T,)`` index of that training image.
        summary: JSON-compatible summary (see :func:`memorisation_audit`).
        rows: Per synthetic image: id, nearest training id, distance, flagged.
    """

    threshold: float
    flagged: npt.NDArray[np.bool_]
    synth_distance: npt.NDArray[np.float64]
    synth_nearest: npt.NDArray[np.int64]
    test_distance: npt.NDArray[np.float64]
    test_nearest: npt.NDArray[np.int64]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def fraction_flagged(self) -> float:
        """Fraction of synthetic images flagged (NaN when there was no threshold, see ``summary["na"]``)."""
        if not np.isfinite(self.threshold):
            return float("nan")
        return float(self.flagged.mean()) if self.flagged.size else float("nan")


MIN_TEST_IMAGES = 2
"""The flagging threshold is a percentile of the real test images' distances: one image gives no distribution."""


def memorisation_audit(
    synth: torch.Tensor,
    train: torch.Tensor,
    test: torch.Tensor,
    percentile: float = 1.0,
    distance: Distance = "ncc",
    synth_ids: Sequence[str] | None = None,
    train_ids: Sequence[str] | None = None,
    source_ids: Sequence[str] | None = None,
    top_k: int = 5,
    chunk: int = 256,
) -> MemorisationResult:
    """Flag synthetic images closer to a training image than the ``percentile``-th percentile of real test images.

    Args:
        synth: ``(M, 1, *S)`` synthetic images (or ``(M, F)`` features).
        train: ``(N, 1, *S)`` training images of the generator (or features).
        test: ``(T, 1, *S)`` real test images (unseen patients), the reference (or features).
        percentile: Percentile of the test distances used as threshold.
        distance: ``"ncc"``, ``"l2"`` or ``"ssim"`` (see module doc).
        synth_ids: Ids of the synthetic images (default: their indices).
        train_ids: Ids of the training images (default: their indices).
        source_ids: Training id of the mask each synthetic image was generated from, if any.
        top_k: Candidates re-ranked by SSIM for ``"ssim"``.
        chunk: Block size of the matrix products.

    Returns:
        A :class:`MemorisationResult`; ``summary`` holds ``threshold, percentile, distance,
        fraction_flagged, n_flagged, n_synth, n_train, n_test``, quantiles of both distance
        distributions and, with ``source_ids``, ``fraction_nearest_is_source``.
    """
    sd, si = nearest_distance(synth, train, distance, top_k, chunk)
    td, ti = nearest_distance(test, train, distance, top_k, chunk)
    s_dist, t_dist = sd.double().numpy(), td.double().numpy()
    enough = len(t_dist) >= MIN_TEST_IMAGES
    thr = float(np.percentile(t_dist, percentile)) if enough else float("nan")
    flagged = s_dist < thr if enough else np.zeros(len(s_dist), dtype=bool)
    sids = [str(x) for x in synth_ids] if synth_ids is not None else [str(i) for i in range(len(s_dist))]
    tids = [str(x) for x in train_ids] if train_ids is not None else [str(i) for i in range(train.shape[0])]
    nearest = si.numpy().astype(np.int64)
    rows = [
        {
            "synth_id": sids[i],
            "nearest_train_id": tids[int(nearest[i])],
            "distance": float(s_dist[i]),
            "flagged": bool(flagged[i]),
        }
        for i in range(len(s_dist))
    ]
    q = [0.0, 1.0, 5.0, 50.0]
    summary: dict[str, Any] = {
        "distance": distance,
        "percentile": percentile,
        "threshold": thr if enough else None,
        "fraction_flagged": (float(flagged.mean()) if flagged.size else float("nan")) if enough else None,
        "n_flagged": int(flagged.sum()) if enough else None,
        "n_synth": len(s_dist),
        "n_train": int(train.shape[0]),
        "n_test": len(t_dist),
        "synth_quantiles": {f"p{p:g}": float(np.percentile(s_dist, p)) for p in q},
        "test_quantiles": {f"p{p:g}": float(np.percentile(t_dist, p)) for p in q},
    }
    if not enough:
        summary["na"] = needs(MIN_TEST_IMAGES, "real test images for the threshold", len(t_dist))
    if source_ids is not None:
        same = [rows[i]["nearest_train_id"] == str(source_ids[i]) for i in range(len(rows))]
        summary["fraction_nearest_is_source"] = float(np.mean(same)) if same else float("nan")
        for r, s in zip(rows, same, strict=True):
            r["nearest_is_source"] = s
    return MemorisationResult(thr, flagged, s_dist, nearest, t_dist, ti.numpy().astype(np.int64), summary, rows)


def closest_pairs_figure(
    path: str | Path,
    synth: torch.Tensor,
    train: torch.Tensor,
    result: MemorisationResult,
    n: int = 8,
    synth_ids: Sequence[str] | None = None,
    train_ids: Sequence[str] | None = None,
) -> Path:
    """PNG of the ``n`` synthetic images closest to a training image, each beside that training image.

    3D images show their middle slice along the last axis. Row titles give both ids, the distance
    and whether the pair was flagged.
    """
    order = np.argsort(result.synth_distance, kind="stable")[: max(n, 0)]
    rows, titles = [], []
    for i in order:
        j = int(result.synth_nearest[i])
        s_img = to_2d(np.asarray(synth[int(i), 0].detach().cpu().numpy(), dtype=np.float32))
        t_img = to_2d(np.asarray(train[j, 0].detach().cpu().numpy(), dtype=np.float32))
        rows.append([s_img, t_img, np.abs(np.asarray(s_img, np.float32) - np.asarray(t_img, np.float32))])
        sid = synth_ids[int(i)] if synth_ids is not None else str(int(i))
        tid = train_ids[j] if train_ids is not None else str(j)
        flag = " FLAGGED" if result.flagged[int(i)] else ""
        titles.append(f"{sid} ~ {tid}\nd={result.synth_distance[int(i)]:.3g}{flag}")
    return save_grid(path, rows, titles=titles, col_titles=["synthetic", "nearest training", "|difference|"])


@dataclass(frozen=True)
class MemorisationGuard:
    """The audit applied while synthesising: flags each new image closer to a training image than real test images.

    The threshold is fixed once from real data — the ``percentile``-th percentile of the nearest-training
    distances of the real TEST images, exactly as in :func:`memorisation_audit` — and every synthetic
    batch is compared with the training images under the same distance.

    Attributes:
        train: ``(N, 1, *S)`` training images of the generator, values in [0, 1].
        train_ids: Their ids.
        threshold: Distance below which an image is flagged.
        distance: ``"ncc"``, ``"l2"`` or ``"ssim"``.
        percentile: Percentile of the real test distances that gave ``threshold``.
        top_k: Candidates re-ranked for ``"ssim"``.
    """

    train: torch.Tensor
    train_ids: list[str]
    threshold: float
    distance: Distance
    percentile: float
    top_k: int = 5

    @classmethod
    def from_reference(
        cls,
        train: torch.Tensor,
        test: torch.Tensor,
        train_ids: Sequence[str],
        percentile: float = 1.0,
        distance: Distance = "ncc",
        top_k: int = 5,
    ) -> MemorisationGuard:
        """Fix the threshold from real test images ``(T, 1, *S)`` against the training images ``(N, 1, *S)``."""
        if len(train) == 0 or len(test) == 0:
            raise ValueError("the memorisation guard needs training and real test images")
        td, _ = nearest_distance(test, train, distance, top_k)
        thr = float(np.percentile(td.double().numpy(), percentile))
        return cls(train, [str(i) for i in train_ids], thr, distance, percentile, top_k)

    def check(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """Per image of ``(B, 1, *S)``: ``{"flagged", "nearest_train_id", "distance"}``."""
        d, i = nearest_distance(images.float(), self.train, self.distance, self.top_k)
        return [
            {
                "flagged": bool(float(d[k]) < self.threshold),
                "nearest_train_id": self.train_ids[int(i[k])],
                "distance": float(d[k]),
            }
            for k in range(len(d))
        ]
