"""Sample diversity: mean pairwise MS-SSIM among images generated from the SAME mask with different seeds.

A mask fixes the layout; the seeds should still vary texture and detail. A value near 1 means the
generator ignores its noise (mode collapse: every seed gives the same image); lower is more diverse.
Compare with the same number for real images of similar masks when available.

Scales: MONAI's ``MultiScaleSSIMMetric`` with its default 5 weights and 11-voxel kernel refuses
images smaller than 176 voxels per axis (its check is ``size // (n_scales - 1)**2 > kernel - 1``), so
128² slices or 48×64×48 volumes cannot use 5 scales. :func:`ms_ssim_scales` picks the largest number
of scales ``n <= 5`` that passes MONAI's check AND leaves at least one kernel width at the coarsest
scale (``size // 2**(n-1) >= kernel``) — e.g. 4 scales at 128², 3 at 64² and 48-voxel axes, 2 at 32² —
and uses the first ``n`` standard weights renormalised to sum to 1. When fewer than 2 scales fit, it
falls back to single-scale ``SSIMMetric`` with the kernel shrunk to the largest odd size that fits.
The method used is recorded in the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch

from medsynth.na import needs

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL = 11


def ms_ssim_scales(spatial: Sequence[int], kernel_size: int = KERNEL, max_scales: int = 5) -> int:
    """Largest number of MS-SSIM scales usable at ``spatial`` (1 means: single-scale SSIM only)."""
    for n in range(max_scales, 1, -1):
        div = max(1, n - 1) ** 2
        if all(s // div > kernel_size - 1 and s // 2 ** (n - 1) >= kernel_size for s in spatial):
            return n
    return 1


def similarity(
    spatial_dims: int, spatial: Sequence[int], data_range: float = 1.0
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dict[str, Any]]:
    """A batched similarity ``f(x, y) -> (B,)`` for images of size ``spatial`` and its description."""
    from monai.metrics import MultiScaleSSIMMetric, SSIMMetric

    n = ms_ssim_scales(spatial)
    if n >= 2:
        w = np.asarray(MS_SSIM_WEIGHTS[:n])
        weights = tuple(float(x) for x in w / w.sum())
        metric: Any = MultiScaleSSIMMetric(
            spatial_dims, data_range=data_range, kernel_size=KERNEL, weights=weights, reduction="none"
        )
        info = {"method": "ms-ssim", "scales": n, "weights": list(weights), "kernel_size": KERNEL}
    else:
        k = min(KERNEL, *spatial)
        k = k if k % 2 else k - 1
        metric = SSIMMetric(spatial_dims, data_range=data_range, win_size=max(k, 1), reduction="none")
        info = {"method": "ssim", "scales": 1, "weights": [1.0], "kernel_size": max(k, 1)}

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(metric(x.float(), y.float())).reshape(-1)

    return fn, info


def pairwise_similarity(
    images: torch.Tensor,
    data_range: float = 1.0,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(MS-)SSIM of every unordered pair of ``images`` ``(K, 1, *S)``: ``K(K-1)/2`` values (one batched call)."""
    k = images.shape[0]
    if k < 2:
        return torch.zeros(0)
    if fn is None:
        fn, _ = similarity(images.ndim - 2, images.shape[2:], data_range)
    pairs = list(combinations(range(k), 2))
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    return fn(images[i], images[j])


def diversity_report(groups: torch.Tensor | Sequence[torch.Tensor], data_range: float = 1.0) -> dict[str, Any]:
    """Mean pairwise (MS-)SSIM among same-mask images, per mask and overall.

    Args:
        groups: ``(M, K, 1, *S)`` — ``K`` images (different seeds) for each of ``M`` masks — or a
            sequence of ``(K_m, 1, *S)`` tensors.
        data_range: Intensity range of the images.

    Returns:
        ``{"mean", "sd" (over masks), "per_mask", "n_masks", "n_pairs", "method", "scales", "weights",
        "kernel_size", "interpretation"}``; with no pair of images (one seed, or no mask) the mean is
        NaN and ``na`` says what was missing, instead of raising.
    """
    seq = list(groups.unbind(0)) if isinstance(groups, torch.Tensor) else list(groups)
    if not seq:
        return {
            "mean": float("nan"),
            "sd": float("nan"),
            "per_mask": [],
            "n_masks": 0,
            "n_pairs": 0,
            "na": needs(1, "mask"),
        }
    spatial = tuple(seq[0].shape[2:])
    fn, info = similarity(len(spatial), spatial, data_range)
    per_mask, n_pairs = [], 0
    for g in seq:
        vals = pairwise_similarity(g, data_range, fn)
        n_pairs += int(vals.numel())
        per_mask.append(float(vals.mean()) if vals.numel() else float("nan"))
    arr = np.asarray(per_mask)
    ok = arr[np.isfinite(arr)]
    na = {} if n_pairs else {"na": needs(2, "seeds per mask", max((int(g.shape[0]) for g in seq), default=0))}
    return {
        **na,
        "mean": float(ok.mean()) if ok.size else float("nan"),
        "sd": float(ok.std(ddof=1)) if ok.size > 1 else float("nan"),
        "per_mask": per_mask,
        "n_masks": len(seq),
        "n_pairs": n_pairs,
        **info,
        "interpretation": "1 = every seed gives the same image (no diversity); lower = more diverse",
    }
