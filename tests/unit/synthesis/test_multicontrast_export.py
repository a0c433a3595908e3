"""Multi-contrast synthesis writes every channel; the nnU-Net v2 export has them all and passes nnunetv2's check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medsynth.data.dataset import load_split
from medsynth.data.io import read_image
from medsynth.data.preprocess import run_preprocess
from medsynth.synthesis.export import export_dataset
from medsynth.synthesis.masks import load_masks
from medsynth.synthesis.run import synthesize

torch.set_num_threads(1)


@pytest.fixture
def two_contrast(synth: Any, tmp_path: Path, tiny_nets: dict[str, Any], make_generator: Any) -> dict[str, Any]:
    """A 2D two-contrast nnU-Net dataset, its cache, and a synthetic dataset from its test masks."""
    data = synth.multicontrast("nnunet", n=5, dim=2)
    raw = synth.raw(
        data,
        data={"channels": ["flair", "t2"], "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0}},
        preprocess={"spatial_dims": 2, "spatial_size": [32, 32]},
        **tiny_nets,
        synthesis={"n_grid": 1},
    )
    cfg = synth.config(raw)
    cache = tmp_path / "cache"
    run_preprocess(cfg, cache)
    syn = synthesize(cfg, make_generator(cfg), load_masks(cfg, cache), tmp_path / "synthetic").out_dir
    return {"cfg": cfg, "cache": cache, "syn": syn}


def test_cache_and_synthetic_dataset_carry_both_channels(two_contrast: dict[str, Any]) -> None:
    assert tuple(load_split(two_contrast["cache"], None).images.shape[1:]) == (2, 32, 32)
    syn = two_contrast["syn"]
    manifest = json.loads((syn / "manifest.json").read_text(encoding="utf-8"))
    for row in manifest["items"]:
        assert row["images"] == [f"images/{row['id']}_0000.nii.gz", f"images/{row['id']}_0001.nii.gz"]
        assert row["channels"] == ["flair", "t2"] and row["image"] == row["images"][0]
        chans = [read_image(syn / f).array for f in row["images"]]
        assert chans[0].shape == chans[1].shape == read_image(syn / row["mask"], kind="mask").array.shape
        assert not np.array_equal(chans[0], chans[1])  # two decoded contrasts, not one copied
    ds = json.loads((syn / "dataset.json").read_text(encoding="utf-8"))
    assert ds["modality"] == {"0": "flair (synthetic)", "1": "t2 (synthetic)"}


def test_nnunetv2_export_has_every_channel_and_passes_nnunets_check(
    two_contrast: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.verify_dataset_integrity import (  # type: ignore[import-untyped]
        verify_dataset_integrity,
    )

    cfg, cache, syn = two_contrast["cfg"], two_contrast["cache"], two_contrast["syn"]
    for native in (False, True):
        out = tmp_path / f"Dataset502_TwoContrast{'native' if native else ''}"
        summary = export_dataset(
            cfg, out, "nnunetv2", synthetic_dir=syn, cache_dir=cache, with_real=True, native=native
        )
        verify_dataset_integrity(str(out), 1)  # raises on any problem nnU-Net v2 would have (channels included)
        ds = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
        assert ds["channel_names"] == {"0": "flair", "1": "t2"}
        assert ds["numTraining"] == summary.n_real + summary.n_synthetic and summary.n_real > 0
        labels = sorted(p.name for p in (out / "labelsTr").iterdir())
        images = sorted(p.name for p in (out / "imagesTr").iterdir())
        stems = [n.removesuffix(".nii.gz") for n in labels]
        assert images == sorted(f"{s}_{k:04d}.nii.gz" for s in stems for k in range(2))
        real = next(s for s in stems if s.startswith("case_"))
        c0, c1 = (read_image(out / "imagesTr" / f"{real}_{k:04d}.nii.gz").array for k in range(2))
        m = read_image(out / "labelsTr" / f"{real}.nii.gz", kind="mask").array
        if (m == 2).any() and (m == 1).any():  # the t2 channel shows label 2 bright, label 1 dark; flair does not
            assert float(c1[m == 2].mean()) > float(c1[m == 1].mean()) * 1.5
            assert float(c0[m == 2].mean()) < float(c0[m == 1].mean()) * 1.5


def test_native_export_maps_each_channel_back_to_its_own_source_scale(
    two_contrast: dict[str, Any], tmp_path: Path
) -> None:
    """``--native``: every synthetic contrast goes back to its source case's scale for that contrast."""
    import csv

    cfg, cache, syn = two_contrast["cfg"], two_contrast["cache"], two_contrast["syn"]
    out = tmp_path / "native"
    export_dataset(cfg, out, "folder", synthetic_dir=syn, cache_dir=cache, native=True)
    with (out / "provenance.csv").open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "synthetic"]
    assert rows and all(r["intensity_space"] == "source" for r in rows)
    cache_items = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))["items"]
    case_of = {str(it["item_id"]): str(it["case_id"]) for it in cache_items}
    for r in rows:
        case = json.loads((cache / "cases" / f"{case_of[r['source_id']]}.json").read_text(encoding="utf-8"))["case"]
        sources = [read_image(Path(p)).array for p in [case["image"], *case["extra_images"]]]
        for k, src in enumerate(sources):
            fg = src[src > 0]
            lo, hi = np.percentile(fg, 0.5), np.percentile(fg, 99.5)
            x = read_image(out / "images" / f"{r['case_id']}_{k:04d}.nii.gz").array
            inside = x[x > 0]
            assert inside.size > 0
            # on this contrast's source scale [lo, hi] (the two contrasts' scales differ), not on [0, 1]
            assert lo - 1e-3 <= float(inside.min()) and float(inside.max()) <= hi + 1e-3, (k, lo, hi)
            assert float(inside.max()) > 0.5 * hi


def test_writer_writes_one_png_per_channel_and_refuses_a_wrong_channel_count(tmp_path: Path) -> None:
    from dataclasses import replace

    from medsynth.synthesis.writer import DatasetWriter, Provenance, SyntheticItem

    prov = Provenance({"x": "0" * 64}, "ddim", 2, 1.0)
    mask = np.zeros((1, 8, 6), np.uint8)
    mask[0, 2:5, 2:4] = 1
    image = np.stack([np.full((8, 6), 0.25), np.full((8, 6), 0.75)]).astype(np.float32)
    item = SyntheticItem("a", image, mask, np.diag([0.7, 1.2, 1.0]), "src", None, {}, 0, intensity_range=(0.0, 900.0))
    out = tmp_path / "png"
    with DatasetWriter(out, {0: "bg", 1: "x"}, provenance=prov, output_format="png", channel_names=["t1", "t2"]) as w:
        row = w.add(item)
        with pytest.raises(ValueError, match="expected 2 channels"):
            w.add(replace(item, item_id="b", image=image[:1]))
    assert row["images"] == ["images/a_0000.png", "images/a_0001.png"] and row["intensity_range"] is None
    values = [int(read_image(out / p).array.max()) for p in row["images"]]
    assert values == [64, 191]  # round(0.25 * 255), round(0.75 * 255): each channel its own file, in order
