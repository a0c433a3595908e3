"""External test sets: preprocessed into their own cache, scored by every cell, never trained on."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet
from medsynth.evaluation.external import external_cache_dir, load_external_test
from medsynth.evaluation.grid import CELLS_FILE, run_grid
from medsynth.evaluation.selection import PatientLeakError
from tests.unit.evaluation.test_experiment import LABELS, fake_pool, make_cfg, make_set

torch.set_num_threads(1)


def test_every_cell_scores_the_external_set_and_reports_it_separately(tmp_path: Path) -> None:
    train, val, test, ext = make_set("P", 6, 0), make_set("V", 2, 1), make_set("T", 3, 2), make_set("X", 3, 3)
    cfg = make_cfg(fractions=[1.0], ratios=[0, 1], arms=["real"], train={"steps": 10, "batch_size": 8})
    res = run_grid(cfg, train, val, test, fake_pool(train, 1), tmp_path, external=ext)
    for rec in res.cells:
        assert rec.external_scores is not None and len(rec.external_scores) == len(ext)
        assert rec.external_metrics is not None and "auroc" in rec.external_metrics
        assert not set(ext.patients) & {p for p in train.patients}  # by construction, and checked below
    assert all(r.external_mean is not None for r in res.summary)
    assert "external AUROC" in res.summary_md.read_text(encoding="utf-8")


@pytest.mark.parametrize("where", ["train", "pool", "val"])
def test_external_items_never_enter_training(tmp_path: Path, where: str) -> None:
    train, val, test = make_set("P", 6, 0), make_set("V", 2, 1), make_set("T", 3, 2)
    pool = fake_pool(train, 1)
    ext = make_set("X", 2, 3)
    shared = {"train": "P03", "pool": "P04", "val": "V01"}[where]
    if where == "pool":  # only the pool's provenance names the patient: a synthetic item made from it
        pool = type(pool)(
            pool.images, pool.masks, pool.source_items, ["X00", *pool.source_patients[1:]], pool.variants, pool.edits
        )
        shared = "X00"
        ext_l = ext
    else:
        ext_l = ArraySet(ext.images, ext.masks, ext.affines, ext.item_ids, [shared] * len(ext), LABELS)
    cfg = make_cfg(fractions=[1.0], ratios=[0, 1], arms=["real"])
    with pytest.raises(PatientLeakError, match=shared):
        run_grid(cfg, train, val, test, pool, tmp_path, external=ext_l)
    assert not (tmp_path / CELLS_FILE).exists()  # refused before any training


def test_load_external_test_preprocesses_into_its_own_cache(tmp_path: Path) -> None:
    from medsynth.data.phantom import write_phantom_dataset

    src = write_phantom_dataset(tmp_path / "ext", dim=2, n=3, seed=5, size=16, slices_per_patient=2)
    raw = {
        "name": "exttest",
        "output_dir": str(tmp_path / "out"),
        "data": {
            "root": str(tmp_path / "unused"),
            "mask_suffix": "_mask",
            "labels": {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter", 4: "lesion"},
        },
        "qc": {"policy": "fail", "n_overlays": 0},
        "preprocess": {"spatial_dims": 2, "spatial_size": [16, 16]},
    }
    cfg = validate_config(raw, "external test config", MedsynthConfig)
    ext = load_external_test(cfg, src)
    assert len(ext) > 0 and len(set(ext.patients)) == 3  # every patient is test data
    cache = external_cache_dir(cfg, src)
    assert (cache / "manifest.json").is_file() and cache.is_relative_to(tmp_path / "out" / "exttest" / "external")
    assert tuple(ext.images.shape[2:]) == (16, 16)
