"""``medsynth export``: the augmented dataset as nnU-Net v2 (checked by nnunetv2 itself), MSD or a folder."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from medsynth.config.schema import MedsynthConfig
from medsynth.data.io import read_image, write_image
from medsynth.data.layouts import discover
from medsynth.data.preprocess import run_preprocess
from medsynth.errors import DataError, OutputExistsError
from medsynth.synthesis.export import export_dataset
from medsynth.synthesis.masks import load_masks
from medsynth.synthesis.run import synthesize

torch.set_num_threads(1)


def _config(synth: Any, data: Path, nets: dict[str, Any], **synthesis: Any) -> MedsynthConfig:
    raw = synth.raw(
        data,
        data={"labels": {0: "background", 1: "tumour"}, "label_remap": {255: 1}, "mask_suffix": "_mask"},
        preprocess={
            "spatial_dims": 2,
            "spatial_size": [16, 16],
            "derived_label": {"enabled": True, "name": "brain", "index": 2},
        },
        **nets,
        synthesis={"n_grid": 0, **synthesis},
    )
    return synth.config(raw)  # type: ignore[no-any-return]


@pytest.fixture
def augmented(synth: Any, tmp_path: Path, tiny_nets: dict[str, Any], make_generator: Any) -> dict[str, Any]:
    """A preprocessed tiny 2D dataset and a synthetic dataset from native-size masks (one with its image)."""
    data = synth.png_patients(patients=("P1", "P2", "P3", "P4", "P5"), slices=2)
    new = tmp_path / "new"
    img, msk = synth.slice(7, shape=(22, 18))
    write_image(new / "n1_mask.png", msk, synth.png_affine)
    write_image(new / "n1.png", img, synth.png_affine)
    oblique = np.array([[0.0, 0.7, 3.0], [1.3, 0.0, -2.0], [0.0, 0.0, 1.0]])  # swapped axes, 0.7 x 1.3 mm
    with_brain = np.where(img > 0, 2, 0).astype(np.uint8)
    with_brain[msk > 0] = 255
    write_image(new / "n2.nii.gz", with_brain, oblique)
    (tmp_path / "masks.csv").write_text("mask,image\nnew/n1_mask.png,new/n1.png\nnew/n2.nii.gz,\n")
    cfg = _config(synth, data, tiny_nets, source="manifest", masks_path=str(tmp_path / "masks.csv"))
    cache = tmp_path / "cache"
    summary = run_preprocess(cfg, cache)
    syn = synthesize(cfg, make_generator(cfg), load_masks(cfg, cache), tmp_path / "synthetic").out_dir
    return {"cfg": cfg, "cache": cache, "syn": syn, "data": data, "new": new, "n_items": summary.n_items}


def _provenance(out: Path) -> list[dict[str, str]]:
    with open(out / "provenance.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_nnunetv2_export_passes_nnunets_own_integrity_check(augmented: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.verify_dataset_integrity import (  # type: ignore[import-untyped]
        verify_dataset_integrity,
    )

    cfg, cache, syn = augmented["cfg"], augmented["cache"], augmented["syn"]
    for native in (False, True):
        out = tmp_path / f"Dataset501_Tiny{'native' if native else ''}"
        summary = export_dataset(
            cfg, out, "nnunetv2", synthetic_dir=syn, cache_dir=cache, with_real=True, native=native
        )
        verify_dataset_integrity(str(out), 1)  # raises on any problem nnU-Net v2 would have
        ds = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
        assert ds["labels"] == {"background": 0, "tumour": 1, "brain": 2} and ds["file_ending"] == ".nii.gz"
        assert ds["channel_names"] == {"0": "MRI"} and ds["numTraining"] == summary.n_real + summary.n_synthetic
        assert summary.n_synthetic == 2 and summary.n_real > 0
        rows = _provenance(out)
        assert {r["kind"] for r in rows} == {"real", "synthetic"}
        assert all(r["split"] == "train" for r in rows if r["kind"] == "real")  # test cases stay held out
        assert (out / "imagesTr" / f"{rows[0]['case_id']}_0000.nii.gz").is_file()
    # --native: each synthetic case on its source mask's grid, real cases as their original files
    native_rows = {r["case_id"]: r for r in _provenance(out)}
    n2 = next(r for r in native_rows.values() if r["source_id"] == "n2")
    back = read_image(out / n2["label"], kind="mask")
    src = read_image(augmented["new"] / "n2.nii.gz", kind="mask")
    assert back.array.shape == src.array.shape == (22, 18)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    n1 = next(r for r in native_rows.values() if r["source_id"] == "n1_mask")
    assert n1["intensity_space"] == "source" and read_image(out / n1["image"]).array.max() > 1.5  # PNG scale
    real = next(r for r in native_rows.values() if r["kind"] == "real")
    original = read_image(augmented["data"] / real["case_id"].split("_")[0] / f"{real['case_id']}.png")
    np.testing.assert_array_equal(read_image(out / real["image"]).array, original.array)
    real_mask = read_image(out / real["label"], kind="mask").array
    assert set(np.unique(real_mask)) <= {0, 1, 2} and np.any(real_mask == 2)  # derived 'brain' kept


def test_msd_and_folder_exports_read_back_and_keep_the_model_grid(augmented: dict[str, Any], tmp_path: Path) -> None:
    cfg, cache, syn = augmented["cfg"], augmented["cache"], augmented["syn"]
    msd = export_dataset(cfg, tmp_path / "msd", "msd", synthetic_dir=syn, cache_dir=cache, with_real=True).out_dir
    assert len(discover(cfg.data.model_copy(update={"root": str(msd), "layout": "msd"})).cases) == len(_provenance(msd))
    folder = export_dataset(cfg, tmp_path / "plain", "folder", synthetic_dir=syn).out_dir
    rows = _provenance(folder)
    assert [r["kind"] for r in rows] == ["synthetic", "synthetic"]
    for r in rows:  # synthesis wrote native files; the default export is the model grid, training scale
        im = read_image(folder / r["image"]).array
        assert im.shape == (16, 16) and im.min() >= 0.0 and im.max() <= 1.0
        assert read_image(folder / r["label"], kind="mask").array.shape == (16, 16)


def test_pseudonymised_export_names_no_source_id(augmented: dict[str, Any], tmp_path: Path) -> None:
    """``privacy.pseudonymise_ids``: file names and provenance carry keyed pseudonyms, the table stays outside."""
    from medsynth.privacy import Pseudonymiser

    cfg, cache, syn = augmented["cfg"], augmented["cache"], augmented["syn"]
    plain = _provenance(
        export_dataset(cfg, tmp_path / "plain", "folder", synthetic_dir=syn, cache_dir=cache, with_real=True).out_dir
    )
    p = Pseudonymiser(b"secret")
    out = export_dataset(
        cfg, tmp_path / "anon", "folder", synthetic_dir=syn, cache_dir=cache, with_real=True, pseudonymise=p
    ).out_dir
    rows = _provenance(out)
    assert len(rows) == len(plain)
    originals = {r["case_id"] for r in plain} | {r["source_id"] for r in plain} | {r["source_patient"] for r in plain}
    originals.discard("")
    text = (out / "provenance.csv").read_text(encoding="utf-8") + (out / "dataset.json").read_text(encoding="utf-8")
    names = " ".join(str(f.relative_to(out)) for f in out.rglob("*"))
    for original in originals:  # no source id, patient or path survives in any file name or provenance column
        assert original not in text and original not in names, original
    assert {r["case_id"] for r in rows} == {p(r["case_id"]) for r in plain}
    assert all(r["source"] in ("", "(pseudonymised)") for r in rows)
    # the way back is the pseudonymiser's table, never a file of the export
    assert set(p.table().values()) >= {r["case_id"] for r in rows}


def test_export_refuses_before_writing_anything(augmented: dict[str, Any], tmp_path: Path) -> None:
    cfg, cache, syn = augmented["cfg"], augmented["cache"], augmented["syn"]
    taken = tmp_path / "taken"
    (taken / "x").mkdir(parents=True)
    with pytest.raises(OutputExistsError) as info:
        export_dataset(cfg, taken, "nnunetv2", synthetic_dir=syn)
    assert "never overwrites" in info.value.hint
    with pytest.raises(DataError, match="unknown export format"):
        export_dataset(cfg, tmp_path / "a", "zip", synthetic_dir=syn)

    edited = tmp_path / "edited"
    shutil.copytree(syn, edited)
    manifest = json.loads((edited / "manifest.json").read_text(encoding="utf-8"))
    train_id = next(
        it["item_id"]
        for it in json.loads((cache / "manifest.json").read_text(encoding="utf-8"))["items"]
        if it["split"] == "train"
    )
    manifest["items"][1]["id"] = train_id.lower()  # collides on a case-insensitive file system
    (edited / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "never"
    with pytest.raises(DataError, match="collides"):
        export_dataset(cfg, out, "nnunetv2", synthetic_dir=edited, cache_dir=cache, with_real=True)
    manifest["items"][1]["id"] = "../escape"
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="cannot be file names"):
        export_dataset(cfg, out, "nnunetv2", synthetic_dir=edited)
    manifest["labels"] = {"0": "background", "1": "tumour", "3": "brain"}
    manifest["items"][1]["id"] = "fine"
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="consecutive"):
        export_dataset(cfg, out, "nnunetv2", synthetic_dir=edited)
    assert not out.exists() and not list(tmp_path.glob(".never.*"))
    # a file that fails while writing (after the plan passed) leaves nothing behind either
    manifest["labels"] = {"0": "background", "1": "tumour", "2": "brain"}
    (edited / "manifest.json").write_text(json.dumps(manifest))
    (edited / manifest["items"][1]["image"]).unlink()
    with pytest.raises(DataError, match="does not exist"):
        export_dataset(cfg, out, "msd", synthetic_dir=edited)
    assert not out.exists() and not list(tmp_path.glob(".never.*"))


def test_native_export_of_cache_split_sources_uses_the_case_files(
    synth: Any, tmp_path: Path, tiny_nets: dict[str, Any], make_generator: Any
) -> None:
    data = synth.png_patients(patients=("P1", "P2", "P3", "P4", "P5"), slices=2)
    cfg = _config(synth, data, tiny_nets, source="split", split="test", max_masks=2)
    cache = tmp_path / "cache"
    run_preprocess(cfg, cache)
    syn = synthesize(cfg, make_generator(cfg), load_masks(cfg, cache), tmp_path / "syn").out_dir
    out = export_dataset(cfg, tmp_path / "native", "folder", synthetic_dir=syn, cache_dir=cache, native=True).out_dir
    for r in _provenance(out):
        pid = r["source_id"].split("_")[0]
        src = read_image(data / pid / f"{r['source_id']}_mask.png", kind="mask")
        back = read_image(out / r["label"], kind="mask")
        assert back.array.shape == src.array.shape == (16, 12)
        np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
        assert r["intensity_space"] == "source" and read_image(out / r["image"]).array.max() > 1.5


def test_cli_export_writes_and_then_refuses_in_one_line(
    augmented: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from medsynth.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(augmented["cfg"].model_dump(mode="json"), sort_keys=False))
    out = tmp_path / "cli-export"
    argv = ["medsynth", "export", "-c", str(config), "--format", "folder", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--synthetic", str(augmented["syn"])])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "export/n_real = 0" in printed and "export/n_synthetic = 2" in printed
    assert len(_provenance(out)) == 2
    with pytest.raises(SystemExit) as info:  # a second export into the same folder: one line, exit 2
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: {out}: output already exists" in err
    assert "never overwrites" in err
