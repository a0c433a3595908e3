"""Mask sources (cache split, folder, CSV manifest) and mask edits (flip, elastic, transplant)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsynth.config.synthesis import SynthesisConfig
from medsynth.data.io import write_image
from medsynth.data.preprocess import run_preprocess
from medsynth.errors import ConfigError, DataError
from medsynth.synthesis.edits import apply_edit, default_lesion_label, elastic, flip, transplant
from medsynth.synthesis.masks import MaskItem, load_masks, masks_from_folder, masks_from_manifest, masks_from_split

LABELS = {0: "background", 1: "brain", 2: "tumour"}
BRAIN, TUMOUR = 1, 2


def _organ_mask(shape: tuple[int, ...], lesion_at: tuple[int, ...] | None = None, radius: float = 0.8) -> np.ndarray:
    """(1, *shape) uint8: an off-centre ellipsoid 'brain' (1), optionally a 3-voxel cube of tumour (2)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum((g - (0.1 if i == 0 else 0.0)) ** 2 for i, g in enumerate(grids))
    m = np.where(r2 <= radius**2, BRAIN, 0).astype(np.uint8)
    if lesion_at is not None:
        m[tuple(slice(c, c + 3) for c in lesion_at)] = TUMOUR
    return m[None]


def _item(item_id: str, mask: np.ndarray) -> MaskItem:
    d = mask.ndim - 1
    return MaskItem(item_id, mask, np.eye(d + 1), None, f"test:{item_id}")


SHAPES = {2: (16, 16), 3: (12, 12, 10)}


# ----- edits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
def test_flip_is_an_involution_on_axis_0_and_keeps_labels(dims: int) -> None:
    m = _organ_mask(SHAPES[dims], lesion_at=(2,) * dims)
    f, desc = flip(m)
    assert desc == {"name": "flip", "axis": 0}
    assert not np.array_equal(f, m)  # the mask is not left-right symmetric
    np.testing.assert_array_equal(f[0], m[0][::-1])
    np.testing.assert_array_equal(flip(f)[0], m)
    assert set(np.unique(f)) == set(np.unique(m))


@pytest.mark.parametrize("dims", [2, 3])
def test_elastic_is_deterministic_by_seed_and_changes_the_mask(dims: int) -> None:
    m = _organ_mask(SHAPES[dims], lesion_at=(5,) * dims)
    a, desc = elastic(m, np.random.default_rng(1), sigma=3.0, magnitude=3.0)
    b, _ = elastic(m, np.random.default_rng(1), sigma=3.0, magnitude=3.0)
    c, _ = elastic(m, np.random.default_rng(2), sigma=3.0, magnitude=3.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert desc["changed_voxels"] == np.count_nonzero(a != m) > 0
    assert a.shape == m.shape and a.dtype == np.uint8
    assert set(np.unique(a)) <= set(np.unique(m))
    unchanged, _ = elastic(m, np.random.default_rng(1), magnitude=0.0)
    np.testing.assert_array_equal(unchanged, m)


@pytest.mark.parametrize("dims", [2, 3])
def test_transplant_puts_the_donor_lesion_inside_the_recipient_organ(dims: int) -> None:
    shape = SHAPES[dims]
    recipient = _organ_mask(shape, radius=0.9)  # no lesion
    donor = _organ_mask(shape, lesion_at=(4,) * dims)
    donor[0][(8,) + (4,) * (dims - 1)] = TUMOUR  # a second lesion component, kept with the first ("all")
    n_donor = int((donor == TUMOUR).sum())
    region = recipient[0] > 0
    offsets = set()
    for seed in range(6):
        out, desc = transplant(recipient, donor, np.random.default_rng(seed), TUMOUR, donor_id="d")
        lesion = out[0] == TUMOUR
        assert desc["applied"] and desc["donor_id"] == "d" and desc["lesion_label"] == TUMOUR
        assert int(lesion.sum()) == n_donor == desc["voxels"]  # the recipient had none
        assert region[lesion].all()  # fully inside the organ region
        np.testing.assert_array_equal(out[0][~lesion], recipient[0][~lesion])  # nothing else changed
        assert set(np.unique(out)) <= set(LABELS)
        offsets.add(tuple(desc["offset"]))
        again, _ = transplant(recipient, donor, np.random.default_rng(seed), TUMOUR, donor_id="d")
        np.testing.assert_array_equal(out, again)
    assert len(offsets) > 1  # the position is random


def test_transplant_component_choice_and_lesion_that_fits_nowhere() -> None:
    recipient = _organ_mask((16, 16), radius=0.7)
    donor = _organ_mask((16, 16), lesion_at=(6, 6))  # 9 voxels
    donor[0][1, 1] = TUMOUR  # 1 voxel
    out, desc = transplant(recipient, donor, np.random.default_rng(0), TUMOUR, component="largest")
    assert desc["voxels"] == 9 and int((out == TUMOUR).sum()) == 9
    tiny = np.zeros((1, 16, 16), np.uint8)
    tiny[0, 7:9, 7:9] = BRAIN  # a 2x2 region cannot hold a 3x3 lesion
    kept, desc = transplant(tiny, donor, np.random.default_rng(0), TUMOUR, component="largest")
    assert desc["applied"] is False and "reason" in desc
    np.testing.assert_array_equal(kept, tiny)
    with pytest.raises(ValueError, match="no voxel of lesion label"):
        transplant(recipient, recipient, np.random.default_rng(0), TUMOUR)


def test_default_lesion_label_from_the_vocabulary() -> None:
    brats = {0: "background", 1: "necrotic tumour core", 2: "edema", 3: "enhancing Tumor"}
    assert default_lesion_label(brats) == 3
    assert default_lesion_label({0: "bg", 1: "Lesion", 2: "brain"}) == 1
    assert default_lesion_label(LABELS, configured=1) == 1
    with pytest.raises(ConfigError, match="lesion"):
        default_lesion_label({0: "background", 1: "anterior", 2: "posterior"})
    with pytest.raises(ConfigError, match="lesion_label 5"):
        default_lesion_label(LABELS, configured=5)


@pytest.mark.parametrize("spec", ["none", "flip", "elastic", "transplant", "flip+elastic", "elastic+transplant"])
def test_every_edit_keeps_labels_within_the_input_vocabulary(spec: str) -> None:
    """Random masks over random vocabularies: an edit never creates a label outside the input vocabulary."""
    cfg = SynthesisConfig(edits=[spec], elastic_sigma=2.0, elastic_magnitude=4.0)
    for seed in range(8):
        rng = np.random.default_rng(seed)
        vocab_keys = sorted({0, 2, *rng.choice([1, 3, 4, 7], size=2, replace=False).tolist()})
        vocab = {k: ("tumour" if k == 2 else f"label{k}") for k in vocab_keys}
        pool = []
        for j in range(3):
            m = rng.choice(vocab_keys, size=(1, 12, 12), p=None).astype(np.uint8)
            m[0, :2] = 0
            m[0, 4:7, 4:7] = 2  # a lesion in every mask
            pool.append(_item(f"m{j}", m))
        out, desc = apply_edit(spec, pool[0], pool, np.random.default_rng(seed), cfg, vocab)
        assert set(np.unique(out).tolist()) <= set(vocab)
        assert out.shape == pool[0].mask.shape and out.dtype == np.uint8
        assert desc["name"] == spec
        if "+" in spec:
            assert [s["name"] for s in desc["steps"]] == spec.split("+")


def test_apply_edit_is_deterministic_and_none_copies() -> None:
    pool = [_item("a", _organ_mask((16, 16))), _item("b", _organ_mask((16, 16), lesion_at=(6, 6)))]
    cfg = SynthesisConfig(edits=["flip+transplant"])
    a, da = apply_edit("flip+transplant", pool[0], pool, np.random.default_rng(3), cfg, LABELS)
    b, db = apply_edit("flip+transplant", pool[0], pool, np.random.default_rng(3), cfg, LABELS)
    np.testing.assert_array_equal(a, b)
    assert da == db and da["steps"][1]["donor_id"] == "b"
    assert int((a == TUMOUR).sum()) == 9
    same, desc = apply_edit("none", pool[0], pool, np.random.default_rng(0), cfg, LABELS)
    assert desc == {"name": "none"} and same is not pool[0].mask
    np.testing.assert_array_equal(same, pool[0].mask)
    never = SynthesisConfig(edits=["transplant"], transplant_probability=0.0)
    kept, desc = apply_edit("transplant", pool[0], pool, np.random.default_rng(0), never, LABELS)
    assert desc["applied"] is False
    np.testing.assert_array_equal(kept, pool[0].mask)
    no_lesion = [pool[0], _item("c", _organ_mask((16, 16)))]
    with pytest.raises(DataError, match="no source mask holds lesion label 2"):
        apply_edit("transplant", no_lesion[0], no_lesion, np.random.default_rng(0), cfg, LABELS)


def test_synthesis_config_validates_edits() -> None:
    assert SynthesisConfig(edits=["flip + elastic"]).edits == ["flip+elastic"]
    for bad in (["warp"], [], ["flip", "flip"], ["none+flip"]):
        with pytest.raises(ValueError):
            SynthesisConfig(edits=bad)
    with pytest.raises(ValueError, match="masks_path"):
        SynthesisConfig(source="folder")


# ----- sources -------------------------------------------------------------------------------
def _cfg_2d(synth, root: Path, **synthesis: object):  # type: ignore[no-untyped-def]
    raw = synth.raw(
        root,
        data={"labels": dict(LABELS), "label_remap": {255: TUMOUR}},
        preprocess={"spatial_dims": 2, "spatial_size": [16, 16]},
        synthesis=dict(synthesis),
    )
    return synth.config(raw)


def test_masks_from_a_cache_split(synth, tmp_path: Path) -> None:
    dataset = synth.msd(n=3)
    raw = synth.raw(dataset, preprocess={"spatial_dims": 2, "spatial_size": [16, 16]})
    cfg = synth.config(raw)
    cache = tmp_path / "cache"
    summary = run_preprocess(cfg, cache)
    items = masks_from_split(cache, "all")
    assert len(items) == summary.n_items > 0
    it = items[0]
    assert it.mask.shape == (1, 16, 16) and it.mask.dtype == np.uint8
    assert it.image is not None and it.image.shape == (1, 16, 16)
    assert it.affine.shape == (3, 3) and it.patient_id == "case_000"
    assert it.source.startswith("cache:") and it.item_id.startswith("case_000_")
    # a subset is spread over the split (first and last item kept), not its first items
    two = masks_from_split(cache, "all", max_masks=2)
    assert [m.item_id for m in two] == [items[0].item_id, items[-1].item_id]
    via_cfg = load_masks(cfg.model_copy(update={"synthesis": SynthesisConfig(split="all", max_masks=3)}), cache)
    spread = np.linspace(0, len(items) - 1, 3).round().astype(int)
    assert [m.item_id for m in via_cfg] == [items[i].item_id for i in spread]


def test_masks_from_a_folder_remap_geometry_and_errors(synth, tmp_path: Path) -> None:
    folder = tmp_path / "masks"
    affine = np.array([[0.0, -1.5, 10.0], [2.0, 0.0, -4.0], [0.0, 0.0, 1.0]])
    m = _organ_mask((16, 16), lesion_at=(6, 6))[0]
    m[m == TUMOUR] = 255  # raw value, remapped to the tumour label
    write_image(folder / "b.nii.gz", m, affine)
    write_image(folder / "sub" / "a.png", (m > 0).astype(np.uint8), np.diag([-1.0, -1.0, 1.0]))
    cfg = _cfg_2d(synth, tmp_path / "data", source="folder", masks_path=str(folder))
    items = load_masks(cfg)
    assert [i.item_id for i in items] == ["b", "sub__a"]
    b = items[0]
    assert b.mask.shape == (1, 16, 16) and b.mask.dtype == np.uint8 and b.patient_id is None
    assert set(np.unique(b.mask)) == {0, BRAIN, TUMOUR}
    np.testing.assert_allclose(b.affine, affine, atol=1e-6)
    assert masks_from_folder(folder, cfg, max_masks=1)[0].item_id == "b"

    # a mask of another size is padded to the model grid (as training pads) and keeps its own geometry
    write_image(folder / "c.nii.gz", np.ones((16, 12), np.uint8), np.eye(3))
    c = masks_from_folder(folder, cfg)[1]
    assert c.item_id == "c" and c.mask.shape == (1, 16, 16) and int(c.mask.sum()) == 16 * 12
    assert c.native is not None and c.native.shape == (16, 12) and c.native.file.endswith("c.nii.gz")
    (folder / "c.nii.gz").unlink()
    write_image(folder / "d.nii.gz", np.zeros((16, 16, 4), np.uint8), np.eye(4))
    with pytest.raises(DataError, match="3D") as info:
        masks_from_folder(folder, cfg)
    assert info.value.path.endswith("d.nii.gz")
    (folder / "d.nii.gz").unlink()
    write_image(folder / "e.nii.gz", np.full((16, 16), 7, np.uint8), np.eye(3))
    with pytest.raises(DataError, match=r"mask values \[7\]"):
        masks_from_folder(folder, cfg)
    with pytest.raises(DataError, match="does not exist"):
        masks_from_folder(tmp_path / "nowhere", cfg)


def test_masks_from_a_csv_manifest(synth, tmp_path: Path) -> None:
    m = _organ_mask((16, 16), lesion_at=(4, 4))[0]
    write_image(tmp_path / "m" / "x.nii.gz", m, np.eye(3))
    write_image(tmp_path / "m" / "y.nii.gz", m, np.eye(3))
    csv_path = tmp_path / "masks.csv"
    csv_path.write_text("mask,patient,intensity_lo,intensity_hi\nm/x.nii.gz,P7,10,900\nm/y.nii.gz,,,\n")
    cfg = _cfg_2d(synth, tmp_path / "data", source="manifest", masks_path=str(csv_path))
    items = load_masks(cfg)
    assert [(i.item_id, i.patient_id, i.intensity_range) for i in items] == [
        ("x", "P7", (10.0, 900.0)),
        ("y", None, None),
    ]
    assert items[0].source == f"manifest:{csv_path}:2"
    bad = tmp_path / "bad.csv"
    bad.write_text("image\nm/x.nii.gz\n")
    with pytest.raises(DataError, match="'mask' column"):
        masks_from_manifest(bad, cfg)
    dup = tmp_path / "dup.csv"
    dup.write_text("mask,id\nm/x.nii.gz,same\nm/y.nii.gz,same\n")
    with pytest.raises(DataError, match="duplicate mask ids"):
        masks_from_manifest(dup, cfg)
