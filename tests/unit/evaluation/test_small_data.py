"""Small data degrades to "n/a (needs >= n)", never raises: every validation measurement on one item."""

from __future__ import annotations

import math

import numpy as np
import torch

from medsynth.evaluation.diversity import diversity_report
from medsynth.evaluation.plausibility import plausibility_report
from medsynth.evaluation.realism import realism_report
from medsynth.evaluation.stats import bootstrap_mean, bootstrap_ratio, format_estimate, paired_comparison
from medsynth.synthesis.memorisation import memorisation_audit


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, 8, generator=g)


def test_realism_with_one_image_per_set_is_na() -> None:
    rep = realism_report(torch.randn(1, 8), torch.randn(1, 8), torch.randn(1, 8), kid_subset_size=1)
    assert rep["fid"] is None and rep["kid_mean"] is None
    assert rep["na"].startswith("n/a (needs >= 2")
    assert rep["reference_fid"] is None and rep["reference_na"].startswith("n/a (needs >= 2")


def test_realism_with_enough_images_still_measures() -> None:
    rep = realism_report(torch.randn(6, 4), torch.randn(6, 4) + 3.0, torch.randn(6, 4), kid_subset_size=5)
    assert rep["fid"] > 1.0 and "na" not in rep and rep["reference_fid"] is not None


def test_diversity_with_one_seed_or_no_mask_is_na() -> None:
    one_seed = diversity_report([_images(1)])
    assert math.isnan(one_seed["mean"]) and one_seed["na"] == "n/a (needs >= 2 seeds per mask, has 1)"
    none = diversity_report([])
    assert none["n_masks"] == 0 and none["na"].startswith("n/a (needs >= 1 mask")


def test_memorisation_with_one_test_image_is_na() -> None:
    res = memorisation_audit(_images(2, 1), _images(3, 2), _images(1, 3))
    assert res.summary["fraction_flagged"] is None
    assert res.summary["na"] == "n/a (needs >= 2 real test images for the threshold, has 1)"
    assert math.isnan(res.fraction_flagged) and not res.flagged.any()


def test_bootstrap_of_one_patient_has_a_value_but_no_interval() -> None:
    est = bootstrap_mean([0.5, 0.7], ["p1", "p1"])
    assert est.value == 0.6 and math.isnan(est.lo) and math.isnan(est.hi)
    assert format_estimate(est.to_json()) == "0.600 [CI n/a (needs >= 2 patients, has 1)]"
    ratio = bootstrap_ratio([0.4], [0.8], ["p1"])
    assert ratio.value == 0.5 and math.isnan(ratio.lo)
    cmp = paired_comparison([0.4], [0.8], ["p1"])
    assert cmp["p_value"] is None


def test_plausibility_on_one_item() -> None:
    mask = torch.zeros(1, 1, 8, 8, 4, dtype=torch.long)
    mask[0, 0, 2:5, 2:5, 1:3] = 1
    rep = plausibility_report(mask, mask, mask, ["p1"], ["c1"], {0: "background", 1: "a"}, n_boot=10)
    dice = rep["per_label"]["a"]["dice_real"]
    assert dice["value"] == 1.0 and dice["lo"] is None
    assert np.isfinite(rep["per_label"]["a"]["ratio"]["value"])
