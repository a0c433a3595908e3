"""Counterfactual lesion edits on hand-made masks: remove, move, scale, a new mask, the edit region."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.config.counterfactual import CounterfactualConfig, parse_counterfactual_edit
from medsynth.synthesis.lesion_edits import apply_lesion_edit, edit_region, move_lesion, remove_lesion, scale_lesion

BG, CSF, WM, LES = 0, 1, 3, 4


def _mask() -> np.ndarray:
    """12x12: head (white matter) in rows/cols 1..10, a CSF strip in column 1..2, a 2x3 lesion at (5..6, 4..6)."""
    m = np.zeros((1, 12, 12), np.uint8)
    m[0, 1:11, 1:11] = WM
    m[0, 1:11, 1:3] = CSF
    m[0, 5:7, 4:7] = LES
    return m


def test_remove_fills_with_the_given_label_or_the_nearest_tissue() -> None:
    m = _mask()
    out, desc = remove_lesion(m, LES, fill_label=WM)
    assert not (out == LES).any() and desc["voxels"] == 6
    assert (out[m != LES] == m[m != LES]).all()  # nothing else changes
    assert (out[0, 5:7, 4:7] == WM).all()
    near = m.copy()
    near[0, 5:7, 3:4] = LES  # the lesion now reaches column 3, next to the CSF strip (columns 1-2)
    out2, _ = remove_lesion(near, LES)  # no fill label: each voxel takes its nearest tissue
    assert (out2[0, 5:7, 3] == CSF).all() and (out2[0, 5:7, 5:7] == WM).all()
    with pytest.raises(ValueError, match="nothing to remove"):
        remove_lesion(out, LES)


def test_remove_uses_the_nearest_label_per_voxel() -> None:
    m = np.zeros((1, 8, 8), np.uint8)
    m[0, 1:7, 1:4] = CSF
    m[0, 1:7, 4:7] = WM
    m[0, 3:5, 3:5] = LES  # straddles the two tissues
    out, _ = remove_lesion(m, LES)
    assert (out[0, 3:5, 3] == CSF).all() and (out[0, 3:5, 4] == WM).all()


def test_move_shifts_the_lesion_and_fills_its_old_place() -> None:
    m = _mask()
    out, desc = move_lesion(m, (2, -1), LES, fill_label=WM)
    assert desc["shift"] == [2, -1] and desc["dropped_voxels"] == 0
    assert np.argwhere(out[0] == LES).tolist() == (np.argwhere(m[0] == LES) + np.array([2, -1])).tolist()
    assert out[0, 5, 6] == WM  # the old place that the moved lesion does not cover
    # moved partly onto background: those voxels are dropped and counted
    out, desc = move_lesion(m, (5, 0), LES, fill_label=WM)
    assert desc["dropped_voxels"] == 3 and (out == LES).sum() == 3
    with pytest.raises(ValueError, match="anatomy"):
        move_lesion(m, (20, 0), LES)


def test_scale_grows_and_shrinks_about_the_centre() -> None:
    m = np.zeros((1, 16, 16), np.uint8)
    m[0, 1:15, 1:15] = WM
    m[0, 6:10, 6:10] = LES
    big, d = scale_lesion(m, 2.0, LES, fill_label=WM)
    assert d["voxels_before"] == 16 and d["voxels"] == 64
    ys, xs = np.nonzero(big[0] == LES)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 11, 4, 11)
    small, d = scale_lesion(m, 0.5, LES, fill_label=WM)
    assert d["voxels"] == 4 and (small[0, 6:10, 6:10] != BG).all()
    with pytest.raises(ValueError):
        scale_lesion(m, 0.0, LES)


def test_apply_lesion_edit_and_a_new_mask() -> None:
    m = _mask()
    assert (apply_lesion_edit("scale:1", m, LES, WM)[0] == m).all()
    new = _mask()
    new[0, 8, 8] = LES
    out, desc = apply_lesion_edit("mask:x.png", m, LES, new_mask=new)
    assert (out == new).all() and desc["changed_voxels"] == 1
    with pytest.raises(ValueError, match="model grid"):
        apply_lesion_edit("mask:x.png", m, LES, new_mask=new[:, :6])


def test_edit_region_is_the_dilated_difference() -> None:
    m = _mask()
    out, _ = move_lesion(m, (0, 3), LES, fill_label=WM)
    r0 = edit_region(m, out, 0)
    assert r0.shape == m.shape and (r0[0] == (m[0] != out[0])).all()
    r2 = edit_region(m, out, 2)
    assert r2.sum() > r0.sum() and (r2 | ~r0).all()
    assert not edit_region(m, m, 3).any()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("remove", ("remove", ())), ("move:3,-2", ("move", (3.0, -2.0))), ("scale:1.5", ("scale", (1.5,)))],
)
def test_parse_edits(spec: str, expected: tuple[str, tuple[float, ...]]) -> None:
    assert parse_counterfactual_edit(spec) == expected


@pytest.mark.parametrize("spec", ["grow", "move:1.5,0", "move:0,0", "scale:0", "scale:-1", "mask:"])
def test_bad_edits_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_counterfactual_edit(spec)


def test_config_refuses_a_mask_edit_in_its_list() -> None:
    with pytest.raises(ValueError):
        CounterfactualConfig(edits=["mask:new.png"])
    assert CounterfactualConfig(edits=["move: 2, 0"]).edits == ["move:2,0"]
