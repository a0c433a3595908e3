"""A removed lesion counts as found again only where it was, above the voxel threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.evaluation.counterfactual import _found_in


def test_found_only_inside_the_removed_region_and_above_the_threshold() -> None:
    region = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    region[:, 0, 2:5, 2:5] = True  # 9 voxels each
    pred = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    pred[0, 0, 6:8, 0:8] = 2  # 16 lesion voxels, all outside the region: not found
    pred[1, 0, 2:4, 2:5] = 2  # 6 inside: found (> 5)
    pred[2, 0, 2, 2:5] = 2  # 3 inside: below the threshold
    pred[2, 0, 2, 5:8] = 1  # another label inside/near: ignored
    found, frac = _found_in(pred, region, lesion=2, min_voxels=5)
    assert found.tolist() == [0.0, 1.0, 0.0]
    np.testing.assert_allclose(frac, [0.0, 6 / 9, 3 / 9])
    with pytest.raises(ValueError, match="differ"):
        _found_in(pred[:, 0], region, lesion=2, min_voxels=5)
