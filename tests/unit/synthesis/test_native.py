"""Synthesis from masks as users have them: native size/labels in, training transforms, native geometry out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medsynth.config.schema import MedsynthConfig
from medsynth.data.io import read_image, write_image
from medsynth.data.preprocess import run_preprocess
from medsynth.errors import DataError
from medsynth.synthesis.masks import load_masks, masks_from_folder, masks_from_manifest, masks_from_split
from medsynth.synthesis.native import NativeGeometry, to_native
from medsynth.synthesis.run import synthesize

torch.set_num_threads(1)

PNG_AFFINE = np.diag([-1.0, -1.0, 1.0])


def lgg_like(tmp: Path, nets: dict[str, Any], **synthesis: Any) -> MedsynthConfig:
    """The LGG config's data/preprocess sections (tumour = 255, 4 mm, 64x64, derived 'brain') with tiny networks."""
    raw = {
        "name": "lgg-native",
        "output_dir": str(tmp / "out"),
        "data": {"root": str(tmp / "data"), "labels": {0: "background", 1: "tumour"}, "label_remap": {255: 1}},
        "preprocess": {
            "spatial_dims": 2,
            "spacing": [4.0, 4.0],
            "spatial_size": [64, 64],
            "derived_label": {"enabled": True, "name": "brain", "index": 2, "threshold": "otsu"},
        },
        **nets,
        "synthesis": {"n_grid": 0, **synthesis},
    }
    return MedsynthConfig.model_validate(raw)


def hippo_like(tmp: Path, nets: dict[str, Any], **synthesis: Any) -> MedsynthConfig:
    """A 3D config: RAS, 2 mm isotropic, 16^3 grid, labels 0/1/2."""
    raw = {
        "name": "hippo-native",
        "output_dir": str(tmp / "out"),
        "data": {"root": str(tmp / "data"), "labels": {0: "background", 1: "anterior", 2: "posterior"}},
        "preprocess": {"spatial_dims": 3, "orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "spatial_size": [16] * 3},
        **nets,
        "synthesis": {"n_grid": 0, **synthesis},
    }
    return MedsynthConfig.model_validate(raw)


def lgg_slice(side: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 256x256 uint8 'FLAIR' (bright head disc on black) and its tumour mask with raw value 255."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(*[np.linspace(-1, 1, side)] * 2, indexing="ij")
    head = (x / 0.8) ** 2 + (y / 0.7) ** 2 <= 1.0
    image = np.where(head, 90 + rng.integers(0, 60, (side, side)), 0).astype(np.uint8)
    mask = np.zeros((side, side), np.uint8)
    mask[150:190, 100:140] = 255
    image[mask > 0] = 240
    return image, mask


def _rows(out: Path) -> list[dict[str, Any]]:
    return list(json.loads((out / "manifest.json").read_text(encoding="utf-8"))["items"])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def test_native_png_mask_synthesises_in_its_own_geometry(
    tmp_path: Path, tiny_nets: dict[str, Any], make_generator: Any
) -> None:
    image, mask = lgg_slice()
    write_image(tmp_path / "in" / "TCGA_X_1_mask.png", mask, PNG_AFFINE)
    write_image(tmp_path / "in" / "TCGA_X_1.png", image, PNG_AFFINE)
    (tmp_path / "masks.csv").write_text("mask,image\nin/TCGA_X_1_mask.png,in/TCGA_X_1.png\n")
    cfg = lgg_like(tmp_path, tiny_nets, source="manifest", masks_path=str(tmp_path / "masks.csv"))
    items = load_masks(cfg)
    it = items[0]
    assert it.mask.shape == (1, 64, 64) and set(np.unique(it.mask)) == {0, 1, 2}  # 255 -> tumour, brain derived
    assert it.native is not None and it.native.shape == (256, 256) and it.native.spacing == (1.0, 1.0)
    assert it.source_range is not None and 0 < it.source_range[0] < it.source_range[1] <= 240
    # tumour area is preserved through the 4 mm resampling: 40x40 px of 1 mm = 10x10 px of 4 mm
    assert abs(int((it.mask == 1).sum()) - 100) <= 22

    gen = make_generator(cfg)
    out = synthesize(cfg, gen, items, tmp_path / "syn").out_dir
    row = _rows(out)[0]
    written = read_image(out / row["image"])
    written_mask = read_image(out / row["mask"], kind="mask")
    source = read_image(tmp_path / "in" / "TCGA_X_1_mask.png", kind="mask")
    assert written.array.shape == written_mask.array.shape == (256, 256)
    np.testing.assert_allclose(written_mask.affine, source.affine, atol=1e-5)
    assert row["geometry"] == "native" and row["native_geometry"]["shape"] == [256, 256]
    assert row["model_grid"]["shape"] == [64, 64] and row["source_intensity_range"] == list(it.source_range)
    tumour_back = written_mask.array == 1
    assert _dice(tumour_back, source.array == 255) > 0.85
    assert written.array.min() >= 0.0 and written.array.max() <= 1.0  # training scale

    model = synthesize(
        cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(update={"output_geometry": "model"})}),
        gen,
        items,
        tmp_path / "syn-model",
    ).out_dir
    mrow = _rows(model)[0]
    assert mrow["geometry"] == "model" and read_image(model / mrow["image"]).array.shape == (64, 64)
    assert mrow["native_geometry"] == row["native_geometry"]


def test_derived_label_needs_the_image_or_the_mask_holding_it(tmp_path: Path, tiny_nets: dict[str, Any]) -> None:
    image, mask = lgg_slice()
    write_image(tmp_path / "m" / "a.png", mask, PNG_AFFINE)
    cfg = lgg_like(tmp_path, tiny_nets)
    with pytest.raises(DataError, match=r"no 'brain' label \(index 2\).*derives") as info:
        masks_from_folder(tmp_path / "m", cfg)
    assert info.value.path.endswith("a.png") and "column 'image'" in info.value.hint
    with_brain = mask.copy()
    with_brain[(with_brain == 0) & (image > 0)] = 2  # a mask that already holds the label is fine
    write_image(tmp_path / "m" / "a.png", with_brain, PNG_AFFINE)
    assert set(np.unique(masks_from_folder(tmp_path / "m", cfg)[0].mask)) == {0, 1, 2}
    write_image(tmp_path / "other.png", image[:128], PNG_AFFINE)  # an image on another grid is refused
    (tmp_path / "bad.csv").write_text("mask,image\nm/a.png,other.png\n")
    with pytest.raises(DataError, match="differs from its mask") as info:
        masks_from_manifest(tmp_path / "bad.csv", cfg)
    assert info.value.path.endswith("other.png")


def test_nifti_mask_with_anisotropic_spacing_and_another_orientation(
    tmp_path: Path, tiny_nets: dict[str, Any], make_generator: Any
) -> None:
    # LPI-like grid: axes flipped and permuted, 0.9 x 1.7 x 3.1 mm, an oblique-free but non-RAS direction
    shape = (30, 18, 9)
    affine = np.array([[0.0, -1.7, 0.0, 20.0], [-0.9, 0.0, 0.0, 14.0], [0.0, 0.0, -3.1, 9.0], [0.0, 0.0, 0.0, 1.0]])
    mask = np.zeros(shape, np.uint8)
    mask[4:14, 3:10, 2:6] = 1
    mask[16:26, 6:14, 3:7] = 2
    write_image(tmp_path / "m" / "case7.nii.gz", mask, affine)
    cfg = hippo_like(tmp_path, tiny_nets, source="folder", masks_path=str(tmp_path / "m"))
    items = load_masks(cfg)
    it = items[0]
    assert it.mask.shape == (1, 16, 16, 16) and set(np.unique(it.mask)) == {0, 1, 2}
    np.testing.assert_allclose(np.abs(np.diag(it.affine)[:3]), [2.0, 2.0, 2.0], atol=1e-5)  # RAS, 2 mm
    assert np.all(np.diag(it.affine)[:3] > 0)
    out = synthesize(cfg, make_generator(cfg), items, tmp_path / "syn").out_dir
    row = _rows(out)[0]
    back = read_image(out / row["mask"], kind="mask")
    img = read_image(out / row["image"])
    src = read_image(tmp_path / "m" / "case7.nii.gz", kind="mask")
    assert back.array.shape == img.array.shape == shape
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-4)
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
    geo = NativeGeometry.from_json(row["native_geometry"])
    assert geo.spacing == pytest.approx((0.9, 1.7, 3.1)) and geo.shape == shape
    for label in (1, 2):  # each structure lands where it was: orientation undone, not just the size
        assert _dice(back.array == label, mask == label) > 0.6, label


def test_derived_label_from_a_given_image_equals_the_training_time_one(synth: Any, tmp_path: Path) -> None:
    data = synth.png_patients(patients=("P1", "P2", "P3", "P4"), slices=2)
    raw = synth.raw(
        data,
        data={"labels": {0: "background", 1: "tumour"}, "label_remap": {255: 1}, "mask_suffix": "_mask"},
        preprocess={
            "spatial_dims": 2,
            "spatial_size": [16, 16],
            "derived_label": {"enabled": True, "name": "brain", "index": 2},
        },
    )
    cfg = synth.config(raw)
    cache = tmp_path / "cache"
    run_preprocess(cfg, cache)
    cached = {it.item_id: it for it in masks_from_split(cache, "all")}
    case = "P2_0"
    (tmp_path / "one.csv").write_text(f"mask,image\n{data}/P2/{case}_mask.png,{data}/P2/{case}.png\n")
    it = masks_from_manifest(tmp_path / "one.csv", cfg)[0]
    ref = cached[case]
    assert np.any(ref.mask == 2) and np.any(ref.mask == 1)
    np.testing.assert_array_equal(it.mask, ref.mask)
    assert it.image is not None and ref.image is not None
    np.testing.assert_allclose(it.image, ref.image, atol=1e-6)
    np.testing.assert_allclose(it.affine, ref.affine, atol=1e-6)


def test_to_native_inverts_the_model_grid_on_a_shared_grid() -> None:
    affine = np.array([[0.0, -1.0, 5.0], [2.0, 0.0, -3.0], [0.0, 0.0, 1.0]])
    image = np.random.default_rng(0).random((12, 10)).astype(np.float32)
    mask = (image > 0.5).astype(np.uint8)
    im, mk = to_native(image, mask, affine, NativeGeometry((12, 10), affine))
    np.testing.assert_allclose(im, image, atol=1e-5)
    np.testing.assert_array_equal(mk, mask)
