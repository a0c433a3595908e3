"""FID/KID on feature vectors (vs MONAI's definitions) and MS-SSIM diversity (scale choice, 1 for identical)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from medsynth.evaluation.diversity import diversity_report, ms_ssim_scales, pairwise_similarity
from medsynth.evaluation.realism import (
    NOT_COMPARABLE,
    frechet_distance,
    kid,
    mmd2_unbiased,
    realism_report,
)

torch.set_num_threads(1)


def _feats(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift() -> None:
    f = _feats(300)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(f, f + s) for s in (0.25, 0.5, 1.0)]
    # a mean shift of s in every one of 8 dims adds exactly 8 s² to the Fréchet distance
    assert shifts == pytest.approx([8 * 0.25**2, 8 * 0.5**2, 8 * 1.0], rel=1e-4)
    assert frechet_distance(f, _feats(300, seed=1)) < 0.5 < frechet_distance(f, 2.0 * _feats(300, seed=1))


def test_kid_is_near_zero_for_the_same_distribution_and_grows_with_a_shift() -> None:
    a, b = _feats(200, seed=0), _feats(200, seed=1)
    same, _ = kid(a, b, subset_size=100, n_subsets=20)
    small, _ = kid(a, b + 0.5, subset_size=100, n_subsets=20)
    large, sd = kid(a, b + 1.0, subset_size=100, n_subsets=20)
    assert abs(same) < 0.05 < small < large and sd >= 0
    assert kid(a, b, seed=3) == kid(a, b, seed=3)


def test_linear_kernel_mmd_equals_monai_mmdmetric() -> None:
    """MONAI's MMDMetric is the unbiased MMD² with a LINEAR kernel (so it is not KID); ours reproduces it."""
    from monai.metrics import MMDMetric

    a, b = _feats(50, seed=2), _feats(50, seed=3) + 0.3
    monai = float(MMDMetric()(a, b))
    assert mmd2_unbiased(a, b, kernel="linear") == pytest.approx(monai, rel=1e-9)
    assert mmd2_unbiased(a, b, kernel="polynomial") != pytest.approx(monai, rel=1e-3)


def test_realism_report_carries_the_not_comparable_note() -> None:
    rep = realism_report(_feats(60), _feats(40, seed=1) + 1.0, f_reference=_feats(60, seed=2), kid_subsets=5)
    assert rep["note"] == NOT_COMPARABLE and "NOT comparable" in rep["note"]
    assert rep["fid"] > rep["reference_fid"] and rep["kid_mean"] > rep["reference_kid_mean"]
    assert (rep["n_real"], rep["n_synth"], rep["feature_dim"]) == (60, 40, 8)


@pytest.mark.parametrize(("size", "scales"), [(256, 5), (176, 5), (128, 4), (64, 3), (48, 3), (32, 2), (16, 1)])
def test_ms_ssim_scale_choice_passes_monai(size: int, scales: int) -> None:
    from monai.metrics import MultiScaleSSIMMetric

    assert ms_ssim_scales([size, size]) == scales
    if scales >= 2:  # the chosen number of scales really runs in MONAI, one more is refused
        x = torch.rand(1, 1, size, size)
        MultiScaleSSIMMetric(2, weights=[1.0 / scales] * scales)(x, x)
        if scales < 5:
            with pytest.raises((ValueError, RuntimeError)):
                MultiScaleSSIMMetric(2, weights=[1.0 / (scales + 1)] * (scales + 1))(x, x)


@pytest.mark.parametrize("shape", [(32, 32), (16, 16), (24, 24, 16)])
def test_diversity_is_one_for_identical_images_and_lower_for_different(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, *shape, generator=g)
    identical = base.expand(4, 1, *shape).clone()
    varied = (0.5 * base + 0.5 * torch.rand(4, 1, *shape, generator=g)).clamp(0, 1)
    assert pairwise_similarity(identical).numel() == 6
    rep_same = diversity_report(identical[None])
    rep_diff = diversity_report(torch.stack([varied, varied.flip(0)]))
    assert rep_same["mean"] == pytest.approx(1.0, abs=1e-5)
    assert rep_diff["mean"] < 0.9 and rep_diff["n_masks"] == 2 and rep_diff["n_pairs"] == 12
    expected = "ms-ssim" if min(shape) >= 32 else "ssim"
    assert rep_same["method"] == expected and rep_same["scales"] == ms_ssim_scales(shape)
