"""Dataset layout discovery (medsynth.data.layouts.discover)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from medsynth.config.data import DataConfig
from medsynth.data.io import write_image
from medsynth.data.layouts import discover
from medsynth.errors import DataError


def _cfg(root: Path, **kw: object) -> DataConfig:
    return DataConfig.model_validate({"root": str(root), **kw})


def test_msd_with_training_list(synth) -> None:
    root = synth.msd(n=3)
    # a stray file in imagesTr that is not in the training list is ignored
    img, _ = synth.volume(9)
    write_image(root / "imagesTr" / "stray.nii.gz", img, synth.affine_3d)
    d = discover(_cfg(root))
    assert d.layout == "msd"
    assert [c.case_id for c in d.cases] == ["case_000", "case_001", "case_002"]
    for c in d.cases:
        assert c.image == (root / "imagesTr" / f"{c.case_id}.nii.gz").resolve()
        assert c.mask == (root / "labelsTr" / f"{c.case_id}.nii.gz").resolve()
        assert c.patient_id == c.case_id
        assert c.split is None
    assert "msd" in d.message


def test_nnunet_channel_suffix_without_training_list(synth) -> None:
    root = synth.msd(n=2, training_list=False, nnunet=True)
    assert not (root / "dataset.json").exists()
    d = discover(_cfg(root))
    assert d.layout == "msd"
    assert [c.case_id for c in d.cases] == ["case_000", "case_001"]  # _0000 stripped, _0001 ignored
    assert all(c.image.name.endswith("_0000.nii.gz") for c in d.cases)
    assert [c.mask.name for c in d.cases] == ["case_000.nii.gz", "case_001.nii.gz"]


def test_nnunet_other_channel_chosen_by_config(synth) -> None:
    root = synth.msd(n=2, training_list=False, nnunet=True)
    d = discover(_cfg(root, channel=1))
    assert all(c.image.name.endswith("_0001.nii.gz") for c in d.cases)
    assert [c.case_id for c in d.cases] == ["case_000", "case_001"]


def test_paired_images_and_labels_folders(synth) -> None:
    root = synth.paired_dirs(n=3)
    d = discover(_cfg(root))
    assert d.layout == "paired"
    assert "images/" in d.message and "labels/" in d.message
    assert [c.case_id for c in d.cases] == ["vol_0", "vol_1", "vol_2"]
    for c in d.cases:
        assert c.mask == root / "labels" / f"{c.case_id}.nii.gz"
        assert c.patient_id == c.case_id


def test_paired_png_in_patient_folders(synth) -> None:
    root = synth.png_patients(patients=("PA", "PB"), slices=3)
    d = discover(_cfg(root))
    assert d.layout == "paired"
    assert "_mask" in d.message
    assert len(d.cases) == 6
    assert {c.patient_id for c in d.cases} == {"PA", "PB"}
    for c in d.cases:
        assert c.case_id.startswith(c.patient_id + "_")
        assert c.image.parent.name == c.patient_id
        assert c.mask == c.image.with_name(f"{c.case_id}_mask.png")
    assert not any(c.case_id.endswith("_mask") for c in d.cases)  # masks are not cases


def test_paired_image_without_mask_has_no_mask(synth) -> None:
    root = synth.png_patients(patients=("PA",), slices=2)
    (root / "PA" / "PA_1_mask.png").unlink()
    cases = {c.case_id: c for c in discover(_cfg(root)).cases}
    assert cases["PA_1"].mask is None
    assert cases["PA_0"].mask is not None


def test_patient_regex(synth) -> None:
    root = synth.paired_dirs(n=3)
    d = discover(_cfg(root, patient_regex=r"vol_(\d)"))
    assert [c.patient_id for c in d.cases] == ["0", "1", "2"]


def test_csv_manifest_with_patient_and_split(synth, tmp_path: Path) -> None:
    data = synth.paired_dirs(tmp_path / "files", n=3)
    manifest = tmp_path / "files" / "manifest.csv"
    rows = [
        {"image": "images/vol_0.nii.gz", "mask": "labels/vol_0.nii.gz", "patient": "P1", "split": "train"},
        {"image": "images/vol_1.nii.gz", "mask": "labels/vol_1.nii.gz", "patient": "P1", "split": "train"},
        {"image": "images/vol_2.nii.gz", "mask": "labels/vol_2.nii.gz", "patient": "P2", "split": "test"},
    ]
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "mask", "patient", "split"])
        w.writeheader()
        w.writerows(rows)
    d = discover(_cfg(manifest))
    assert d.layout == "csv"
    assert "CSV" in d.message
    assert [(c.case_id, c.patient_id, c.split) for c in d.cases] == [
        ("vol_0", "P1", "train"),
        ("vol_1", "P1", "train"),
        ("vol_2", "P2", "test"),
    ]
    assert d.cases[0].image == (data / "images" / "vol_0.nii.gz").resolve()  # relative to the CSV
    assert d.cases[2].mask == (data / "labels" / "vol_2.nii.gz").resolve()


def test_csv_without_mask_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("image\na.nii.gz\n")
    with pytest.raises(DataError, match="'image' and 'mask'") as info:
        discover(_cfg(manifest))
    assert info.value.path == str(manifest)


@pytest.mark.parametrize(
    ("make", "expected"),
    [("msd", "layout msd"), ("paired_dirs", "layout paired: images/"), ("png_patients", "layout paired: masks")],
)
def test_auto_detection_message_names_the_layout(synth, make: str, expected: str) -> None:
    root = getattr(synth, make)()
    assert discover(_cfg(root)).message.startswith(expected)


def test_explicit_layout_is_reported_as_from_config(synth) -> None:
    root = synth.paired_dirs(n=1)
    d = discover(_cfg(root, layout="paired", images_dir="images", masks_dir="labels"))
    assert d.message == "layout paired (from config)"
    assert [c.case_id for c in d.cases] == ["vol_0"]


def test_unrelated_files_match_nothing(tmp_path: Path) -> None:
    root = tmp_path / "junk"
    root.mkdir()
    (root / "notes.txt").write_text("not images")
    (root / "table.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="layout matches nothing") as info:
        discover(_cfg(root))
    assert info.value.path == str(root)
    assert "imagesTr" in info.value.hint and "data.layout" in info.value.hint


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        discover(_cfg(tmp_path / "absent"))


def test_empty_images_tr(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    with pytest.raises(DataError, match="dataset is empty") as info:
        discover(_cfg(root))
    assert info.value.path == str(root)
    assert "no image files" in info.value.problem


def test_include_regex_filters_case_ids(synth) -> None:
    root = synth.msd(n=4)
    d = discover(_cfg(root, include=r"case_00[13]"))
    assert [c.case_id for c in d.cases] == ["case_001", "case_003"]


def test_include_matching_nothing_is_an_empty_dataset(synth) -> None:
    root = synth.msd(n=2)
    with pytest.raises(DataError, match="dataset is empty") as info:
        discover(_cfg(root, include="zzz"))
    assert "data.include" in info.value.problem
