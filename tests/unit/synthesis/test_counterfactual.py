"""Counterfactual edits with a real tiny (untrained) generator: latents kept outside the region, files in and out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medsynth.config.schema import MedsynthConfig
from medsynth.data.io import read_image, write_image
from medsynth.errors import ConfigError, DataError, OutputExistsError
from medsynth.generator import MaskGenerator
from medsynth.synthesis.counterfactual import counterfactual
from medsynth.synthesis.counterfactual_files import PROVENANCE, EditRequest, edit_files, read_batch

torch.set_num_threads(1)

SIDE = 16
PNG_AFFINE = np.diag([-1.0, -1.0, 1.0])


def _cfg(tiny_nets: dict[str, Any], **counterfactual: Any) -> MedsynthConfig:
    """LGG-like: tumour-only masks of 0/255, the brain derived from the image as label 2."""
    return MedsynthConfig.model_validate(
        {
            **tiny_nets,
            "data": {
                "root": "unused",
                "labels": {0: "background", 1: "tumour"},
                "label_remap": {255: 1},
                "mask_suffix": "_mask",
            },
            "preprocess": {
                "spatial_dims": 2,
                "spatial_size": [SIDE, SIDE],
                "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5, "within_foreground": True},
                "derived_label": {"enabled": True, "name": "brain", "index": 2, "threshold": "otsu"},
            },
            "counterfactual": {"steps": 3, "dilate": 1, **counterfactual},
        }
    )


def _pair(folder: Path, name: str, lesion: bool = True, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, SIDE), np.linspace(-1, 1, SIDE), indexing="ij")
    head = x**2 + y**2 <= 0.85
    image = np.where(head, 100 + rng.integers(0, 40, (SIDE, SIDE)), 0).astype(np.uint8)
    mask = np.zeros((SIDE, SIDE), np.uint8)
    if lesion:
        mask[6:10, 5:9] = 255
        image[6:10, 5:9] = 220
    return write_image(folder / f"{name}.png", image, PNG_AFFINE), write_image(
        folder / f"{name}_mask.png", mask, PNG_AFFINE
    )


def test_counterfactual_keeps_latents_outside_the_region_exactly(
    tiny_nets: dict[str, Any], make_generator: Any
) -> None:
    cfg = _cfg(tiny_nets)
    gen: MaskGenerator = make_generator(cfg)
    masks = torch.zeros(2, 1, SIDE, SIDE, dtype=torch.uint8)
    masks[:, :, 2:14, 2:14] = 2
    masks[:, :, 6:9, 5:8] = 1
    edited = masks.clone()
    edited[edited == 1] = 2
    images = torch.rand(2, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    out = counterfactual(gen, images, masks, edited, steps=3, dilate=1, seed=4)
    keep = (out.latent_region == 0).expand_as(out.z0)
    assert 0 < int(out.latent_region.sum()) < out.latent_region.numel()
    assert torch.equal(out.latents[keep], out.z0[keep])
    assert not torch.allclose(out.latents[~keep], out.z0[~keep])
    assert out.images.shape == images.shape and 0 <= float(out.images.min()) <= float(out.images.max()) <= 1
    again = counterfactual(gen, images, masks, edited, steps=3, dilate=1, seed=4)
    assert torch.equal(again.images, out.images)  # deterministic given the seed
    other = counterfactual(gen, images, masks, edited, steps=3, dilate=1, seed=5)
    assert torch.equal(other.latents[keep], out.latents[keep])  # the seed only reaches the region
    assert not torch.equal(other.latents[~keep], out.latents[~keep])


def test_counterfactual_needs_a_conditional_ddpm_generator(tiny_nets: dict[str, Any], make_generator: Any) -> None:
    cfg = _cfg(tiny_nets)
    gen: MaskGenerator = make_generator(cfg)
    uncond = MaskGenerator(gen.ae, gen.denoiser_net.unet, gen.objective, 1.0, 3, 2, gen.device, {})  # type: ignore[union-attr]
    m = torch.zeros(1, 1, SIDE, SIDE, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="mask-conditioned"):
        counterfactual(uncond, torch.zeros(1, 1, SIDE, SIDE), m, m, steps=2)


def test_edit_files_writes_the_input_format_and_keeps_the_outside(
    tiny_nets: dict[str, Any], make_generator: Any, tmp_path: Path
) -> None:
    cfg = _cfg(tiny_nets)
    gen = make_generator(cfg)
    img, msk = _pair(tmp_path / "in", "P1_3")
    out = tmp_path / "out"
    rec = edit_files(cfg, gen, [EditRequest(img, msk, "remove"), EditRequest(img, msk, "move:0,3")], out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "P1_3_remove.png",
            "P1_3_remove_mask.png",
            "P1_3_move0_3.png",
            "P1_3_move0_3_mask.png",
            PROVENANCE,
            "counterfactual.png",
        ]
    )
    src = read_image(img).array
    removed = read_image(out / "P1_3_remove.png")
    removed_mask = read_image(out / "P1_3_remove_mask.png", kind="mask").array
    assert removed.array.shape == src.shape and removed.array.dtype == src.dtype  # the input's format
    assert np.allclose(removed.affine, read_image(img).affine)
    assert not removed_mask.any()  # the tumour is gone; the derived brain label is not written
    moved_mask = read_image(out / "P1_3_move0_3_mask.png", kind="mask").array
    assert set(np.unique(moved_mask).tolist()) == {0, 255}  # raw label values (inverse of label_remap)
    assert moved_mask.sum() > 0 and not (moved_mask == read_image(msk, kind="mask").array).all()
    prov = json.loads((out / PROVENANCE).read_text())
    assert prov == rec and len(prov["items"]) == 2
    item = prov["items"][0]
    assert item["edit"] == "remove" and item["outside_kept"] == "source voxels" and item["region_voxels_native"] > 0
    # outside the edit region, the source voxels exactly
    outside = np.ones(src.shape, bool)
    outside[3:13, 2:12] = False  # generous box around the 4x4 tumour + dilation
    assert (removed.array[outside] == src[outside]).all()
    assert not (removed.array == src).all()


def test_edit_files_bad_input_names_the_file_and_writes_nothing(
    tiny_nets: dict[str, Any], make_generator: Any, tmp_path: Path
) -> None:
    cfg = _cfg(tiny_nets)
    gen = make_generator(cfg)
    img, msk = _pair(tmp_path / "in", "A")
    free_img, free_msk = _pair(tmp_path / "in", "B", lesion=False)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"missing\.png: file does not exist"):
        edit_files(
            cfg, gen, [EditRequest(img, msk, "remove"), EditRequest(tmp_path / "missing.png", msk, "remove")], out
        )
    with pytest.raises(DataError, match=r"B_mask\.png: edit 'remove': .*nothing to remove"):
        edit_files(cfg, gen, [EditRequest(free_img, free_msk, "remove")], out)
    with pytest.raises(DataError, match=r"A_mask\.png: edit 'move:40,0'"):
        edit_files(cfg, gen, [EditRequest(img, msk, "move:40,0")], out)
    small = write_image(tmp_path / "in" / "small_mask.png", np.zeros((8, 8), np.uint8), PNG_AFFINE)
    with pytest.raises(DataError, match=r"small_mask\.png"):
        edit_files(cfg, gen, [EditRequest(img, msk, f"mask:{small}")], out)
    assert not out.exists()  # nothing half-written
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        edit_files(cfg, gen, [EditRequest(img, msk, "remove")], out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # never overwritten


def test_read_batch_resolves_paths_and_names_bad_lines(tmp_path: Path) -> None:
    csv = tmp_path / "edits.csv"
    csv.write_text("image,mask,edit\na.png,a_mask.png,remove\nb.png,b_mask.png,mask:new.png\n")
    reqs = read_batch(csv)
    assert [r.edit for r in reqs] == ["remove", f"mask:{(tmp_path / 'new.png').resolve()}"]
    assert reqs[0].image == (tmp_path / "a.png").resolve() and reqs[1].where == f"{csv}:3"
    csv.write_text("image,mask,edit\na.png,a_mask.png,grow\n")
    with pytest.raises(DataError, match=r"edits\.csv: line 2: unknown counterfactual edit 'grow'"):
        read_batch(csv)
    csv.write_text("image,mask\na.png,a_mask.png\n")
    with pytest.raises(DataError, match="needs columns image, mask, edit"):
        read_batch(csv)
    with pytest.raises(DataError, match="does not exist"):
        read_batch(tmp_path / "nope.csv")


def test_feather_fades_inward_over_the_width_and_keeps_the_outside() -> None:
    from medsynth.synthesis.counterfactual_files import feather_weights

    region = np.zeros((40, 40), bool)
    region[8:32, 8:32] = True
    w = feather_weights(region, np.array([4.0, 4.0]), 2.0)  # 4 input voxels per model voxel: an 8-voxel band
    assert w.dtype == np.float32 and (w[~region] == 0).all()  # the input's own voxels outside, exactly
    assert w[20, 20] == 1.0 and w[8 + 8, 20] == 1.0  # fully regenerated from 2 model voxels inside the edge on
    ramp = w[8:17, 20]
    assert 0 < ramp[0] < 0.2 and (np.diff(ramp) >= 0).all() and ramp[-1] == 1.0  # a monotone fade, no hard edge
    assert np.array_equal(feather_weights(region, np.array([4.0, 4.0]), 0.0), region.astype(np.float32))
