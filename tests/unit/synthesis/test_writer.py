"""Writing a synthetic dataset: geometry, intensities, manifest, MSD read-back, no silent overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.config.data import DataConfig
from medsynth.data.io import read_image
from medsynth.data.labels import remap_and_validate
from medsynth.data.layouts import discover
from medsynth.errors import OutputExistsError
from medsynth.synthesis.writer import MANIFEST_ROW_KEYS, DatasetWriter, Provenance, SyntheticItem, write_dataset

LABELS = {0: "background", 1: "brain", 2: "tumour"}
PROV = Provenance({"controlnet/controlnet.safetensors": "ab" * 32}, "ddim", 3, 1.5, 0.0)
# non-trivial geometry: rotation, anisotropic spacing, translation
AFFINE_3D = np.array([[0.0, -1.5, 0.0, 20.0], [0.8, 0.0, 0.0, -31.5], [0.0, 0.0, 2.5, 7.25], [0.0, 0.0, 0.0, 1.0]])
AFFINE_2D = np.array([[0.0, -1.2, 5.0], [0.7, 0.0, -7.5], [0.0, 0.0, 1.0]])


def _items(shape: tuple[int, ...], affine: np.ndarray, n: int = 2) -> list[SyntheticItem]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        mask = np.zeros((1, *shape), np.uint8)
        mask[(0, *[slice(1, s - 1) for s in shape])] = 1
        mask[(0, *[slice(2, 4) for _ in shape])] = 2
        out.append(
            SyntheticItem(
                item_id=f"src{i}_none_0",
                image=rng.random((1, *shape)).astype(np.float32),
                mask=mask,
                affine=affine,
                source_id=f"src{i}",
                source_patient=f"P{i}" if i else None,
                edit={"name": "none"},
                seed=100 + i,
                source="test",
            )
        )
    return out


def _manifest(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize(("shape", "affine"), [((6, 5, 4), AFFINE_3D), ((8, 6), AFFINE_2D)])
def test_nifti_keeps_the_mask_geometry_and_maps_intensities(tmp_path: Path, shape, affine) -> None:  # type: ignore[no-untyped-def]
    items = _items(shape, affine)
    ranged = SyntheticItem(**{**items[1].__dict__, "intensity_range": (50.0, 250.0)})
    out = write_dataset(tmp_path / "syn", [items[0], ranged], LABELS, provenance=PROV)
    for item, row in zip([items[0], ranged], _manifest(out)["items"], strict=True):
        img = read_image(out / row["image"])
        msk = read_image(out / row["mask"], kind="mask")
        for back in (img, msk):
            assert back.affine.shape == affine.shape
            np.testing.assert_allclose(back.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(msk.array, item.mask[0])
        assert row["geometry_in_file"] is True
        np.testing.assert_allclose(np.asarray(row["affine"]), affine)
        if item.intensity_range is None:
            np.testing.assert_allclose(img.array, item.image[0], atol=1e-6)
            assert row["intensity_range"] is None and row["intensity_space"] == "model [0, 1]"
        else:
            np.testing.assert_allclose(img.array, 50.0 + 200.0 * item.image[0], rtol=1e-5)
            assert row["intensity_range"] == [50.0, 250.0] and row["intensity_space"] == "source"


def test_manifest_rows_are_complete_and_the_dataset_reads_back_as_msd(tmp_path: Path) -> None:
    items = _items((6, 5, 4), AFFINE_3D, n=3)
    out = write_dataset(tmp_path / "syn", items, LABELS, provenance=PROV, metadata={"note": "x"})
    manifest = _manifest(out)
    assert manifest["n_items"] == 3 and manifest["note"] == "x" and manifest["spatial_dims"] == 3
    assert manifest["labels"] == {"0": "background", "1": "brain", "2": "tumour"}
    for item, row in zip(items, manifest["items"], strict=True):
        assert set(MANIFEST_ROW_KEYS) <= set(row)
        assert row["id"] == item.item_id and row["source_id"] == item.source_id
        assert row["source_patient"] == item.source_patient and row["edit"] == {"name": "none"}
        assert row["seed"] == item.seed and row["sampler"] == "ddim" and row["steps"] == 3
        assert row["guidance_scale"] == 1.5 and row["model_hashes"] == PROV.model_hashes
        assert row["image"] == f"images/{item.item_id}.nii.gz" and row["mask"] == f"labels/{item.item_id}.nii.gz"
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == manifest["labels"] and meta["numTraining"] == 3 and meta["tensorImageSize"] == "3D"

    vocab = {int(k): v for k, v in meta["labels"].items()}
    data_cfg = DataConfig(root=str(out), labels=vocab)  # layout auto: must detect msd
    disc = discover(data_cfg)
    assert disc.layout == "msd"
    assert [c.case_id for c in disc.cases] == [i.item_id for i in items]
    for case in disc.cases:
        assert case.image.is_file() and case.mask is not None
        remap_and_validate(read_image(case.mask, kind="mask").array, data_cfg, case.mask)  # within the vocabulary
    assert [c.case_id for c in discover(data_cfg.model_copy(update={"layout": "msd"})).cases] == [
        i.item_id for i in items
    ]


def test_png_output_quantises_and_records_the_geometry(tmp_path: Path) -> None:
    png_affine = np.diag([-0.5, -2.0, 1.0])  # what a PNG can hold: spacing only
    item_ok = _items((8, 6), png_affine, n=1)[0]
    item_lost = SyntheticItem(**{**_items((8, 6), AFFINE_2D, n=2)[1].__dict__, "intensity_range": (0.0, 4000.0)})
    out = write_dataset(
        tmp_path / "png", [item_ok, item_lost], LABELS, provenance=PROV, output_format="png", png_dtype="uint16"
    )
    rows = _manifest(out)["items"]
    assert [r["image"] for r in rows] == ["images/src0_none_0.png", "images/src1_none_0.png"]
    img = read_image(out / rows[0]["image"])
    msk = read_image(out / rows[0]["mask"], kind="mask")
    np.testing.assert_allclose(img.affine, png_affine)
    np.testing.assert_allclose(msk.affine, png_affine)
    np.testing.assert_array_equal(img.array, np.floor(item_ok.image[0] * 65535 + 0.5))
    np.testing.assert_array_equal(msk.array, item_ok.mask[0])
    assert rows[0]["geometry_in_file"] is True
    assert rows[1]["geometry_in_file"] is False  # rotated/translated: only the manifest holds it
    np.testing.assert_allclose(np.asarray(rows[1]["affine"]), AFFINE_2D)
    assert rows[1]["intensity_range"] == [0.0, 4000.0] and rows[1]["intensity_space"].startswith("png uint16")
    assert discover(DataConfig(root=str(out), labels=LABELS)).layout == "msd"
    with pytest.raises(ValueError, match="PNG output is 2D only"):
        write_dataset(tmp_path / "png3d", _items((4, 4, 4), AFFINE_3D), LABELS, provenance=PROV, output_format="png")
    assert not (tmp_path / "png3d").exists() and _siblings(tmp_path / "png3d") == []


def test_refuses_to_overwrite_and_replaces_only_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError), DatasetWriter(out, LABELS, provenance=PROV):
        raise AssertionError("entered although the output exists")
    assert (
        sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        and (out / "keep.txt").read_text(encoding="utf-8") == "old"
    )
    assert _siblings(out) == []

    with pytest.raises(RuntimeError, match="boom"), DatasetWriter(out, LABELS, provenance=PROV, overwrite=True) as w:
        w.add(_items((4, 4), AFFINE_2D, n=1)[0])
        raise RuntimeError("boom")  # a failure mid-way keeps the old folder
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and _siblings(out) == []

    write_dataset(out, _items((4, 4), AFFINE_2D), LABELS, provenance=PROV, overwrite=True)
    assert not (out / "keep.txt").exists() and _manifest(out)["n_items"] == 2
    assert _siblings(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dataset(empty, _items((4, 4), AFFINE_2D), LABELS, provenance=PROV)  # an empty folder is fine
    assert (empty / "dataset.json").is_file()


def test_rejects_bad_items_and_empty_datasets(tmp_path: Path) -> None:
    item = _items((4, 4), AFFINE_2D, n=1)[0]
    with pytest.raises(ValueError, match="duplicate item id"):
        write_dataset(tmp_path / "a", [item, item], LABELS, provenance=PROV)
    bad_label = SyntheticItem(**{**item.__dict__, "mask": np.full((1, 4, 4), 5, np.uint8)})
    with pytest.raises(ValueError, match=r"labels \[5\]"):
        write_dataset(tmp_path / "b", [bad_label], LABELS, provenance=PROV)
    bad_id = SyntheticItem(**{**item.__dict__, "item_id": "../x"})
    with pytest.raises(ValueError, match="item id"):
        write_dataset(tmp_path / "c", [bad_id], LABELS, provenance=PROV)
    with pytest.raises(ValueError, match="no items"):
        write_dataset(tmp_path / "d", [], LABELS, provenance=PROV)
    assert list(tmp_path.iterdir()) == []  # nothing committed, no staging left behind
