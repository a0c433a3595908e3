"""Properties of the MONAI preprocessing chain (medsynth.data.transforms), checked with hypothesis."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medsynth.config.preprocess import PreprocessConfig
from medsynth.data.cases import Case
from medsynth.data.io import spacing_from_affine, write_image
from medsynth.data.preprocess import plan, process_case
from medsynth.data.transforms import IMAGE, MASK, pad_crop_transform, to_meta, volume_pipeline

ORIENTATIONS = ["RAS", "LPS", "LAS", "PIR", "SLA"]
dims = st.integers(4, 9)
spacings = st.floats(0.6, 2.0, allow_nan=False).map(lambda v: round(v, 2))


@st.composite
def volumes(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random image/mask pair with an axis-aligned (permuted, flipped) affine of random spacing."""
    shape = (draw(dims), draw(dims), draw(dims))
    seed = draw(st.integers(0, 2**16))
    n_labels = draw(st.integers(1, 4))
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, n_labels + 1, size=shape).astype(np.int64)
    mask.flat[0] = 0  # background is always present
    image = (rng.random(shape) * 100 + 1).astype(np.float32)
    lo = [draw(st.integers(0, s // 3)) for s in shape]
    image[: lo[0]] = 0.0  # an empty border for the foreground crop to remove
    image[:, : lo[1]] = 0.0
    perm = draw(st.permutations([0, 1, 2]))
    flips = [draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)]
    sp = [draw(spacings) for _ in range(3)]
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[:, perm] @ np.diag(np.array(flips) * np.array(sp))
    affine[:3, 3] = [draw(st.floats(-50, 50, allow_nan=False)) for _ in range(3)]
    return image, mask, affine


def _run(cfg: PreprocessConfig, image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> dict:
    d = volume_pipeline(cfg, 3)(
        {IMAGE: to_meta(image, affine, torch.float32), MASK: to_meta(mask, affine, torch.float32)}
    )
    return pad_crop_transform(cfg.spatial_size)(d)


@settings(max_examples=25, deadline=None)
@given(
    vol=volumes(),
    orientation=st.sampled_from(ORIENTATIONS),
    spacing=st.none() | st.lists(spacings, min_size=3, max_size=3),
    size=st.lists(st.integers(3, 12), min_size=3, max_size=3),
    foreground_crop=st.booleans(),
)
def test_geometry_chain_properties(
    vol: tuple[np.ndarray, np.ndarray, np.ndarray],
    orientation: str,
    spacing: list[float] | None,
    size: list[int],
    foreground_crop: bool,
) -> None:
    image, mask, affine = vol
    cfg = PreprocessConfig(
        spatial_dims=3, orientation=orientation, spacing=spacing, spatial_size=size, foreground_crop=foreground_crop
    )
    out = _run(cfg, image, mask, affine)
    img, msk = out[IMAGE], out[MASK]
    assert tuple(img.shape) == tuple(msk.shape) == (1, *size)
    img_aff, msk_aff = np.asarray(img.affine), np.asarray(msk.affine)
    np.testing.assert_allclose(img_aff, msk_aff, atol=1e-6)
    values = np.asarray(msk)
    np.testing.assert_array_equal(values, np.round(values))  # nearest neighbour: no blended labels
    assert set(np.unique(values).astype(int).tolist()) <= set(np.unique(mask).tolist())
    assert nib.aff2axcodes(img_aff) == tuple(orientation)
    expected = spacing if spacing is not None else sorted_spacing(affine, orientation)
    np.testing.assert_allclose(spacing_from_affine(img_aff), expected, rtol=1e-5)
    arr = np.asarray(img)
    assert float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0


def sorted_spacing(affine: np.ndarray, orientation: str) -> list[float]:
    """The native spacing listed in the order of the reoriented axes."""
    codes = nib.aff2axcodes(affine)
    axis_of = {c: i for i, c in enumerate(codes)}
    opposite = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
    native = spacing_from_affine(affine)
    return [native[axis_of.get(c, axis_of.get(opposite[c]))] for c in orientation]


@settings(max_examples=25, deadline=None)
@given(
    vol=volumes(),
    orientation=st.sampled_from(ORIENTATIONS),
    extra=st.lists(st.integers(0, 3), min_size=3, max_size=3),
)
def test_reorient_and_pad_keep_every_labelled_voxel_at_its_world_position(
    vol: tuple[np.ndarray, np.ndarray, np.ndarray], orientation: str, extra: list[int]
) -> None:
    image, mask, affine = vol
    cfg = PreprocessConfig(spatial_dims=3, orientation=orientation, spatial_size=[100, 100, 100])
    # reorient only, to learn the reoriented shape; then pad every axis by `extra`
    reoriented = volume_pipeline(cfg, 3)(
        {IMAGE: to_meta(image, affine, torch.float32), MASK: to_meta(mask, affine, torch.float32)}
    )
    size = [s + e for s, e in zip(reoriented[MASK].shape[1:], extra, strict=True)]
    out = pad_crop_transform(size)(reoriented)

    def world(m: np.ndarray, aff: np.ndarray, label: int) -> np.ndarray:
        idx = np.argwhere(m == label).astype(np.float64)
        pts = idx @ aff[:3, :3].T + aff[:3, 3]
        return np.asarray(sorted(map(tuple, np.round(pts, 4))))

    out_mask, out_aff = np.asarray(out[MASK][0]), np.asarray(out[MASK].affine)
    for label in np.unique(mask):
        if label == 0:
            continue  # padding adds background
        np.testing.assert_allclose(world(out_mask, out_aff, label), world(mask, affine, label), atol=1e-3)


@pytest.mark.parametrize("crop_mode", ["whole", "random_crops"])
def test_same_seed_gives_identical_output(synth, tmp_path: Path, crop_mode: str) -> None:
    root = synth.paired_dirs(n=1)
    img, _ = synth.volume(0)
    write_image(root / "images" / "vol_0.nii.gz", img * np.random.default_rng(5).random(img.shape), synth.affine_3d)
    pre = {"spacing": [0.8, 1.1, 1.5], "crop_mode": crop_mode, "crop_size": [6, 5, 4], "crops_per_volume": 3}
    cfg = synth.config(synth.raw(root, preprocess=pre))
    work = plan(cfg, tmp_path / "cache").work[0]
    assert isinstance(work.case, Case)
    a = process_case(work, cfg, tmp_path / "stage-a")
    b = process_case(work, cfg, tmp_path / "stage-b")
    with np.load(a.staged_files[0]) as za, np.load(b.staged_files[0]) as zb:
        for key in ("image", "mask", "affine"):
            np.testing.assert_array_equal(za[key], zb[key])
    assert [it["sha256"] for it in a.meta["items"]] == [it["sha256"] for it in b.meta["items"]]
    if crop_mode == "random_crops":  # another seed draws other crops
        other = synth.config(synth.raw(root, preprocess={**pre, "seed": 1}))
        c = process_case(plan(other, tmp_path / "cache").work[0], other, tmp_path / "stage-c")
        with np.load(a.staged_files[0]) as za, np.load(c.staged_files[0]) as zc:
            assert not np.array_equal(za["affine"], zc["affine"])
