"""Case ids are unique in every layout (CSV included); masks without images and images without masks are listed."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from medsynth.config.data import DataConfig
from medsynth.data.io import write_image
from medsynth.data.layouts import discover, unique_ids
from medsynth.data.preprocess import load_manifest, run_preprocess
from medsynth.data.qc_report import enforce_policy, run_check
from medsynth.errors import DataError


def _cfg(root: Path, **kw: object) -> DataConfig:
    return DataConfig.model_validate({"root": str(root), **kw})


def _brats(synth, root: Path, n: int = 3) -> Path:
    """One folder per case, identical file names in each: ``case_i/flair.nii.gz`` + ``case_i/seg.nii.gz``."""
    for i in range(n):
        img, msk = synth.volume(i)
        write_image(root / f"case_{i}" / "flair.nii.gz", img, synth.affine_3d)
        write_image(root / f"case_{i}" / "seg.nii.gz", msk, synth.affine_3d)
    return root


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_unique_ids_qualifies_only_colliding_stems() -> None:
    assert unique_ids(["a", "b", "a"], [["x"], ["y"], ["z"]]) == ["x__a", "b", "z__a"]


def test_csv_with_identical_file_names_per_case_folder(synth, tmp_path: Path) -> None:
    root = _brats(synth, tmp_path / "brats")
    rows = [{"image": f"case_{i}/flair.nii.gz", "mask": f"case_{i}/seg.nii.gz"} for i in range(3)]
    d = discover(_cfg(_write_csv(root / "manifest.csv", rows)))
    assert [c.case_id for c in d.cases] == ["case_0__flair", "case_1__flair", "case_2__flair"]
    assert [c.mask.parent.name for c in d.cases if c.mask] == ["case_0", "case_1", "case_2"]


def test_csv_collisions_are_qualified_by_patient_when_given(synth, tmp_path: Path) -> None:
    root = _brats(synth, tmp_path / "brats", n=2)
    rows = [{"image": f"case_{i}/flair.nii.gz", "mask": f"case_{i}/seg.nii.gz", "patient": f"P{i}"} for i in range(2)]
    d = discover(_cfg(_write_csv(root / "m.csv", rows)))
    assert [(c.case_id, c.patient_id) for c in d.cases] == [("P0__flair", "P0"), ("P1__flair", "P1")]


def test_csv_symlinks_are_named_by_the_link_not_the_target(synth, tmp_path: Path) -> None:
    root = _brats(synth, tmp_path / "brats", n=2)
    links = tmp_path / "links"
    links.mkdir()
    for i in range(2):
        os.symlink(root / f"case_{i}" / "flair.nii.gz", links / f"sub{i}.nii.gz")
        os.symlink(root / f"case_{i}" / "seg.nii.gz", links / f"sub{i}_seg.nii.gz")
    rows = [{"image": f"sub{i}.nii.gz", "mask": f"sub{i}_seg.nii.gz"} for i in range(2)]
    d = discover(_cfg(_write_csv(links / "m.csv", rows)))
    assert [c.case_id for c in d.cases] == ["sub0", "sub1"]


def test_csv_listing_one_image_twice_names_both_lines(synth, tmp_path: Path) -> None:
    root = _brats(synth, tmp_path / "brats", n=1)
    row = {"image": "case_0/flair.nii.gz", "mask": "case_0/seg.nii.gz"}
    manifest = _write_csv(root / "m.csv", [row, row])
    with pytest.raises(DataError) as info:
        discover(_cfg(manifest))
    assert info.value.path == str(manifest)
    assert "lines 2 and 3" in info.value.problem


def test_paired_same_stem_in_two_folders_gets_folder_qualified_ids(synth, tmp_path: Path) -> None:
    root = tmp_path / "p"
    for site in ("siteA", "siteB"):
        img, msk = synth.volume(0)
        write_image(root / "images" / site / "x.nii.gz", img, synth.affine_3d)
        write_image(root / "labels" / site / "x.nii.gz", msk, synth.affine_3d)
    d = discover(_cfg(root))
    assert [c.case_id for c in d.cases] == ["siteA__x", "siteB__x"]
    assert [c.mask.parent.name for c in d.cases if c.mask] == ["siteA", "siteB"]  # each with its own mask


def test_orphan_mask_is_listed_and_fails_under_policy_fail(synth, tmp_path: Path) -> None:
    root = synth.paired_dirs(n=2)
    _, msk = synth.volume(5)
    orphan = root / "labels" / "vol_9.nii.gz"
    write_image(orphan, msk, synth.affine_3d)
    d = discover(_cfg(root))
    assert d.orphan_masks == [orphan]
    assert len(d.cases) == 2
    cfg = synth.config(synth.raw(root))
    report = run_check(cfg, tmp_path / "qc")
    assert report.n_bad == 0 and report.orphan_masks == [orphan]
    assert "vol_9.nii.gz" in (tmp_path / "qc" / "qc_summary.md").read_text(encoding="utf-8")
    with pytest.raises(DataError) as info:
        enforce_policy(report)
    assert info.value.path == str(orphan) and "no matching image" in info.value.problem
    with pytest.raises(DataError):
        run_preprocess(cfg, tmp_path / "cache")
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_orphan_mask_and_maskless_image_are_dropped_and_listed_under_exclude(synth, tmp_path: Path) -> None:
    root = synth.paired_dirs(n=3)
    (root / "images" / "vol_2.nii.gz").unlink()  # vol_2's mask is now an orphan
    (root / "labels" / "vol_1.nii.gz").unlink()  # vol_1 has no mask
    cfg = synth.config(synth.raw(root, qc={"policy": "exclude", "n_overlays": 0}))
    report = run_check(cfg, tmp_path / "qc")
    enforce_policy(report)  # exclude: no error
    assert [q.case.case_id for q in report.bad] == ["vol_1"]
    assert report.bad[0].problems[0][0] == "missing_mask"
    s = run_preprocess(cfg, tmp_path / "cache")
    manifest = load_manifest(tmp_path / "cache")
    assert [e["case_id"] for e in s.excluded] == ["vol_1"]
    assert manifest["orphan_masks"] == [str(root / "labels" / "vol_2.nii.gz")]
    assert {it["case_id"] for it in manifest["items"]} == {"vol_0"}


def test_msd_label_without_image_is_an_orphan(synth, tmp_path: Path) -> None:
    root = synth.msd(n=2, training_list=False)
    _, msk = synth.volume(3)
    write_image(root / "labelsTr" / "case_007.nii.gz", msk, synth.affine_3d)
    d = discover(_cfg(root))
    assert [p.name for p in d.orphan_masks] == ["case_007.nii.gz"]


def test_multi_contrast_csv_is_read_one_channel_at_a_time(synth, tmp_path: Path) -> None:
    root = _brats(synth, tmp_path / "brats", n=2)
    for i in range(2):
        img, _ = synth.volume(i)
        write_image(root / f"case_{i}" / "t1.nii.gz", img * 2, synth.affine_3d)
    rows = [
        {"image_0": f"case_{i}/flair.nii.gz", "image_1": f"case_{i}/t1.nii.gz", "mask": f"case_{i}/seg.nii.gz"}
        for i in range(2)
    ]
    manifest = _write_csv(root / "m.csv", rows)
    assert [c.image.name for c in discover(_cfg(manifest)).cases] == ["flair.nii.gz"] * 2
    assert [c.image.name for c in discover(_cfg(manifest, channel=1)).cases] == ["t1.nii.gz"] * 2
    with pytest.raises(DataError, match="no column 'image_2'"):
        discover(_cfg(manifest, channel=2))
    from medsynth.data.fingerprint import fingerprint

    assert fingerprint(_cfg(manifest))["channels"] == 2
