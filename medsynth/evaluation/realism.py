"""Distribution distances between real and synthetic feature vectors: FID and KID.

* :func:`frechet_distance` is ``monai.metrics.FIDMetric`` (it takes feature vectors, ``(N, F)``).
* :func:`kid` is the Kernel Inception Distance of Bińkowski et al. (2018) implemented here: the
  unbiased MMD² estimator with the cubic polynomial kernel ``k(x, y) = (x·y / F + 1)³``, averaged over
  random subsets. ``monai.metrics.MMDMetric`` is NOT KID: it computes the same unbiased estimator
  with a *linear* kernel ``x·y`` on flattened tensors (i.e. only the squared distance of the mean
  embeddings, blind to any difference in spread) and requires both sets to have the same shape.
  :func:`mmd2_unbiased` with ``kernel="linear"`` reproduces MONAI's value (checked in the tests).

The features come from medsynth's own in-domain encoder (:mod:`medsynth.evaluation.features`) or a
user's local weights — never Inception on ImageNet — so the numbers are comparable only between
runs that use the same encoder and data, and never with FIDs published for Inception/RadImageNet
features (e.g. MAISI's 5-6). :data:`NOT_COMPARABLE` says so in every report.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch

from medsynth.na import needs

NOT_COMPARABLE = (
    "FID/KID computed on medsynth's in-domain feature encoder (or the user's local weights), not on "
    "Inception/ImageNet or RadImageNet features: compare only runs that use the same encoder and data; "
    "these values are NOT comparable to published Inception/RadImageNet FIDs."
)


MIN_SAMPLES = 2
"""FID needs a covariance and the unbiased MMD² a pair within each set: at least two vectors per set."""


def _as2d(f: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(f) if not isinstance(f, torch.Tensor) else f).detach().cpu().double()
    if t.ndim != 2:
        raise ValueError(f"features must be (N, F), got shape {tuple(t.shape)}")
    return t


def frechet_distance(f_real: torch.Tensor | np.ndarray, f_synth: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (``monai.metrics.FIDMetric``).

    Args:
        f_real: ``(N, F)`` features of real images.
        f_synth: ``(M, F)`` features of synthetic images (both sets need at least 2 rows).

    With fewer vectors than feature dimensions the covariances are singular (MONAI then adds 1e-6 to
    their diagonals) and the value is noisy: use well over ``F`` images (the default encoder has 64).
    """
    from monai.metrics import FIDMetric

    a, b = _as2d(f_real), _as2d(f_synth)
    if a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need >= 2 feature vectors of equal length, got {tuple(a.shape)} and {tuple(b.shape)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy's sqrtm(disp=...) inside MONAI
        value = float(FIDMetric()(b, a))
    return max(value, 0.0)  # tiny negative values are round-off of sqrtm


def _kernel(x: torch.Tensor, y: torch.Tensor, kernel: str, degree: int) -> torch.Tensor:
    dot = x @ y.T
    if kernel == "linear":
        return dot
    return (dot / x.shape[1] + 1.0) ** degree


def mmd2_unbiased(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    kernel: Literal["polynomial", "linear"] = "polynomial",
    degree: int = 3,
) -> float:
    """Unbiased MMD² between ``x`` ``(m, F)`` and ``y`` ``(n, F)`` (within-set kernel diagonals excluded)."""
    a, b = _as2d(x), _as2d(y)
    m, n = a.shape[0], b.shape[0]
    if m < 2 or n < 2:
        raise ValueError("MMD needs at least two samples in each set")
    kxx, kyy, kxy = _kernel(a, a, kernel, degree), _kernel(b, b, kernel, degree), _kernel(a, b, kernel, degree)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(
    f_real: torch.Tensor | np.ndarray,
    f_synth: torch.Tensor | np.ndarray,
    subset_size: int = 100,
    n_subsets: int = 50,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (polynomial-kernel unbiased MMD²): mean and sd over random subsets.

    Each subset draws ``min(subset_size, N, M)`` vectors without replacement from each set; the
    estimate is unbiased, so values near 0 (even slightly negative) mean "indistinguishable".
    """
    a, b = _as2d(f_real), _as2d(f_synth)
    k = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_subsets):
        ia = torch.from_numpy(rng.choice(a.shape[0], k, replace=False))
        ib = torch.from_numpy(rng.choice(b.shape[0], k, replace=False))
        vals.append(mmd2_unbiased(a[ia], b[ib]))
    v = np.asarray(vals)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def realism_report(
    f_real: torch.Tensor | np.ndarray,
    f_synth: torch.Tensor | np.ndarray,
    f_reference: torch.Tensor | np.ndarray | None = None,
    encoder: str = "medsynth in-domain encoder",
    kid_subset_size: int = 100,
    kid_subsets: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """FID and KID of synthetic vs real features, with an optional real-vs-real floor.

    Args:
        f_real: ``(N, F)`` features of real images (e.g. the test split).
        f_synth: ``(M, F)`` features of synthetic images.
        f_reference: Features of another real set (e.g. the training split): its FID/KID against
            ``f_real`` is the value two real samples reach — the floor to read the synthetic value against.
        encoder: Description of the feature encoder (recorded).
        kid_subset_size: Samples per KID subset.
        kid_subsets: KID subsets.
        seed: Seed of the KID subsets.

    Returns:
        ``{"fid", "kid_mean", "kid_std", "n_real", "n_synth", "feature_dim", "encoder", "note"}`` plus
        ``reference_fid``/``reference_kid_mean`` with ``f_reference``. With fewer than
        :data:`MIN_SAMPLES` vectors in a set the distances are None and ``na`` (``reference_na``)
        says why, instead of raising.
    """
    a, b = _as2d(f_real), _as2d(f_synth)
    short = min(a.shape[0], b.shape[0])
    enough = short >= MIN_SAMPLES and kid_subset_size >= MIN_SAMPLES
    km, ks = kid(a, b, kid_subset_size, kid_subsets, seed) if enough else (None, None)
    out: dict[str, Any] = {
        "fid": frechet_distance(a, b) if enough else None,
        "kid_mean": km,
        "kid_std": ks,
        "kid_kernel": "polynomial degree 3, (x.y/F + 1)^3, unbiased MMD^2",
        "n_real": int(a.shape[0]),
        "n_synth": int(b.shape[0]),
        "feature_dim": int(a.shape[1]),
        "encoder": encoder,
        "note": NOT_COMPARABLE,
    }
    if not enough:
        out["na"] = needs(MIN_SAMPLES, "real and synthetic images (and KID subset size)", min(short, kid_subset_size))
    if f_reference is not None:
        r = _as2d(f_reference)
        out["n_reference"] = int(r.shape[0])
        if enough and r.shape[0] >= MIN_SAMPLES:
            out["reference_fid"] = frechet_distance(a, r)
            out["reference_kid_mean"] = kid(a, r, min(kid_subset_size, r.shape[0]), kid_subsets, seed)[0]
        else:
            out["reference_fid"] = out["reference_kid_mean"] = None
            out["reference_na"] = needs(MIN_SAMPLES, "real test and real training images", min(short, r.shape[0]))
    return out
