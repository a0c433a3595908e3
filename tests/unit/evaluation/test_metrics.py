"""Per-label Dice (hand-made masks, empty cases, agreement with MONAI), false-positive rate, Wasserstein, contrast."""

from __future__ import annotations

import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medsynth.evaluation.metrics import (
    dice_per_label,
    false_positive_rate,
    label_contrast,
    per_label_wasserstein,
)

torch.set_num_threads(1)


def _mask(shape: tuple[int, ...], *boxes: tuple[int, tuple[slice, ...]]) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for lab, sl in boxes:
        m[sl] = lab
    return m


def test_dice_identical_disjoint_and_known_overlap() -> None:
    # identical: 1; disjoint: 0
    a = _mask((8, 8), (1, (slice(0, 2), slice(0, 2))))
    b = _mask((8, 8), (1, (slice(5, 7), slice(5, 7))))
    res = dice_per_label(np.stack([a, a])[:, None], np.stack([a, b])[:, None], [0, 1])
    assert res.labels == (1,)
    assert res.dice[:, 0].tolist() == [1.0, 0.0]
    # known overlap: |P| = 4, |T| = 5, |P∩T| = 3  ->  2*3 / (4 + 5)
    p = np.zeros((1, 1, 10), np.uint8)
    t = np.zeros((1, 1, 10), np.uint8)
    p[0, 0, 0:4] = 1
    t[0, 0, 1:6] = 1
    res = dice_per_label(p, t, {0: "bg", 1: "x"})
    assert res.dice[0, 0] == pytest.approx(2 * 3 / (4 + 5), abs=0, rel=1e-12)


def test_dice_empty_cases_are_explicit() -> None:
    # case 0: label 2 in neither -> NaN + flag; case 1: label 2 predicted only -> 0 (a false positive)
    t = np.zeros((2, 1, 6, 6), np.uint8)
    p = np.zeros_like(t)
    t[:, 0, :2, :2] = 1
    p[:, 0, :2, :2] = 1
    p[1, 0, 4:, 4:] = 2
    res = dice_per_label(p, t, {0: "bg", 1: "a", 2: "b"})
    j = res.column(2)
    assert math.isnan(res.dice[0, j]) and res.both_empty[0, j]
    assert res.dice[1, j] == 0.0 and not res.both_empty[1, j]
    assert not res.target_present[:, j].any()
    assert res.present(2).size == 0  # no case counts towards the mean Dice of label 2
    s = res.summary()
    assert math.isnan(s[2]["mean_dice"])
    assert s[2]["n_both_empty"] == 1 and s[2]["n_false_positive_empty_target"] == 1
    assert s[1]["mean_dice"] == 1.0 and s[1]["n_target_present"] == 2
    assert not np.isnan(res.dice[:, res.column(1)]).any()


@pytest.mark.parametrize("dims", [2, 3])
def test_dice_matches_monai_on_random_masks(dims: int) -> None:
    from monai.metrics import DiceMetric, compute_dice

    rng = np.random.default_rng(dims)
    shape = (6, 1, *([12] * dims))
    t = torch.from_numpy(rng.integers(0, 4, shape))
    p = torch.from_numpy(np.where(rng.random(shape) < 0.7, t.numpy(), rng.integers(0, 4, shape)))
    t[0][t[0] == 3] = 0  # label 3 absent from case 0's target ...
    p[0][p[0] == 3] = 0  # ... and from its prediction: both empty
    t[1][t[1] == 2] = 0  # label 2 absent from case 1's target but predicted: a false positive
    ours = dice_per_label(p, t, [0, 1, 2, 3], include_background=True)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False, num_classes=4)
    metric(y_pred=p, y=t)
    monai_full = metric.aggregate().numpy()
    monai_fn = compute_dice(p, t, include_background=True, ignore_empty=True, num_classes=4).numpy()
    present = ours.target_present
    np.testing.assert_allclose(ours.dice[present], monai_full[present], rtol=1e-6)
    np.testing.assert_allclose(ours.dice[present], monai_fn[present], rtol=1e-6)
    assert np.isnan(monai_fn[~present]).all()  # MONAI (ignore_empty) gives no value for an empty target ...
    fp = ~present & ~ours.both_empty
    np.testing.assert_array_equal(ours.dice[fp], monai_full[fp])  # ... we give 0 for a false positive
    assert np.isnan(ours.dice[ours.both_empty]).all() and (monai_full[ours.both_empty] == 1).all()
    assert ours.both_empty[0, 3] and fp[1, 2]


def test_false_positive_rate_with_voxel_threshold() -> None:
    t = np.zeros((4, 1, 8, 8), np.uint8)
    t[0, 0, :3, :3] = 1  # only case 0 holds label 1
    p = np.zeros_like(t)
    p[1, 0, 0, 0] = 1  # 1 voxel: below the threshold of 2
    p[2, 0, :2, :2] = 1  # 4 voxels: a false positive
    out = false_positive_rate(p, t, {0: "bg", 1: "tumour"}, min_voxels=2)
    assert out[1] == {"rate": pytest.approx(1 / 3), "n_cases": 3, "n_false_positive": 1}
    assert false_positive_rate(p, t, [1], min_voxels=0)[1]["n_false_positive"] == 2


@pytest.mark.parametrize("bins", [256, None])
def test_per_label_wasserstein_zero_for_identical_and_positive_for_shift(bins: int | None) -> None:
    rng = np.random.default_rng(0)
    img = rng.random((5, 1, 16, 16)).astype(np.float32)
    msk = rng.integers(0, 3, (5, 1, 16, 16)).astype(np.uint8)
    same = per_label_wasserstein(img, msk, img.copy(), msk.copy(), {0: "bg", 1: "a", 2: "b"}, bins=bins)
    assert all(v["wasserstein"] == pytest.approx(0.0, abs=1e-12) for v in same.values())
    assert same[1]["n_real"] == same[1]["n_synth"] == int((msk == 1).sum())
    shifted = per_label_wasserstein(img, msk, img + 0.2 * (msk == 2), msk, [0, 1, 2], bins=bins)
    assert shifted[0]["wasserstein"] == pytest.approx(0.0, abs=1e-12)
    assert shifted[2]["wasserstein"] == pytest.approx(0.2, abs=0.01)  # a pure shift moves every quantile by 0.2
    absent = per_label_wasserstein(img, msk, img, np.zeros_like(msk), [1])
    assert math.isnan(float(absent[1]["wasserstein"])) and absent[1]["n_synth"] == 0


def test_label_contrast_hand_made() -> None:
    # case 0: tumour (1) at 0.9 inside brain (2) at 0.4, background 0.0 -> +0.5; case 1 has no tumour
    masks = np.stack([_mask((1, 6, 6), (2, np.s_[:, 1:5, 1:5]), (1, np.s_[:, 2:4, 2:4]))] * 2)
    masks[1][masks[1] == 1] = 2
    images = np.where(masks == 1, 0.9, np.where(masks == 2, 0.4, 0.0)).astype(np.float32)
    c = label_contrast(images, masks, 1, reference=[2])
    assert c[0] == pytest.approx(0.5) and math.isnan(c[1])
    # default reference (other foreground) is the brain here too; a reference absent from the case gives NaN
    assert label_contrast(images, masks, 1)[0] == pytest.approx(0.5)
    assert math.isnan(label_contrast(images, masks, 1, reference=[3])[0])
    with pytest.raises(ValueError, match="differ in shape"):
        label_contrast(images[:, :, :3], masks, 1)


@settings(max_examples=25, deadline=None)
@given(
    offset=st.floats(-2, 2),
    gain=st.floats(0.1, 3),
    bump=st.floats(-1, 1),
    seed=st.integers(0, 2**16),
)
def test_label_contrast_properties(offset: float, gain: float, bump: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, 3, size=(3, 1, 8, 8)).astype(np.uint8)
    masks[:, :, 0, 0], masks[:, :, 0, 1] = 1, 2  # every case holds both labels
    images = rng.random((3, 1, 8, 8))
    base = label_contrast(images, masks, 1, [2])
    # a global offset changes nothing; a gain scales it; brightening the structure adds exactly the bump
    assert np.allclose(label_contrast(images + offset, masks, 1, [2]), base, atol=1e-9)
    assert np.allclose(label_contrast(images * gain, masks, 1, [2]), base * gain, atol=1e-9)
    assert np.allclose(label_contrast(images + bump * (masks == 1), masks, 1, [2]), base + bump, atol=1e-9)
