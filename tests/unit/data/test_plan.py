"""Dataset fingerprint and automatic planning (medsynth plan) on tiny 2D PNG and 3D NIfTI datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsynth.cli import main
from medsynth.config import load_config
from medsynth.config.data import DataConfig
from medsynth.data.fingerprint import fingerprint, fingerprint_md
from medsynth.data.io import write_image
from medsynth.errors import OutputExistsError
from medsynth.planning import plan_config, plan_grid, write_plan


def _validates(plan_yaml: str, tmp_path: Path) -> object:
    path = tmp_path / "planned.yaml"
    path.write_text(plan_yaml)
    return load_config(path)  # the same validation as `medsynth config show -c planned.yaml`


def test_fingerprint_of_3d_nifti(synth) -> None:
    root = synth.msd(n=4)
    fp = fingerprint(DataConfig(root=str(root)))
    assert fp["layout"]["name"] == "msd" and "dataset.json" in fp["layout"]["why"]
    assert fp["ndim"] == 3 and fp["channels"] == 1 and fp["n_cases"] == 4 and not fp["sampled"]
    assert fp["shape"]["median"] == [12, 10, 8]
    assert fp["spacing"]["median"] == [1.0, 1.0, 2.0]
    assert fp["labels"]["values"] == [0, 1, 2]
    assert fp["labels"]["cases"] == {"0": 4, "1": 4, "2": 4}
    assert fp["labels"]["voxels"]["1"] == 4 * 3 * 4 * 4  # make_volume: label 1 is a 3x4x4 block
    assert fp["formats"]["images"] == {".nii.gz": 4}
    assert fp["n_patients"] == 4
    assert any("only 4 patients" in p for p in fp["problems"])
    md = fingerprint_md(fp)
    assert "| 2 | 96 | 4 |" in md  # label 2: 3x4x2 voxels in 4 cases


def test_fingerprint_samples_large_datasets(synth) -> None:
    root = synth.png_patients(patients=("P1", "P2", "P3", "P4"), slices=3)
    fp = fingerprint(DataConfig(root=str(root)), max_cases=5)
    assert fp["n_cases"] == 12 and fp["n_sampled"] == 5 and fp["sampled"]
    assert len(fp["cases"]) == 5
    assert fp["n_patients"] == 4  # patients come from the whole listing, not the sample


def test_fingerprint_lists_problems(synth, tmp_path: Path) -> None:
    root = synth.paired_dirs(n=3)
    write_image(root / "labels" / "stray.nii.gz", synth.volume(4)[1], synth.affine_3d)
    (root / "labels" / "vol_0.nii.gz").unlink()
    fp = fingerprint(DataConfig(root=str(root)))
    text = " | ".join(fp["problems"])
    assert "1 images have no mask" in text and "1 masks have no image" in text


def test_plan_3d_cpu_config_validates_and_fits_the_grid(synth, tmp_path: Path) -> None:
    root = synth.msd(n=12)
    fp = fingerprint(DataConfig(root=str(root)))
    plan = plan_config(fp, "cpu", budget_min=10)
    cfg = _validates(plan.yaml_text, tmp_path)
    pre = cfg.preprocess  # type: ignore[attr-defined]
    assert pre.spatial_dims == 3 and pre.spacing == [1.0, 1.0, 2.0]  # small volumes: native spacing kept
    assert all(s % 8 == 0 for s in pre.spatial_size)  # autoencoder (x4) x UNet (x2) downsampling
    assert pre.spatial_size[0] >= 12 and pre.spatial_size[2] >= 8
    assert cfg.data.labels == {0: "background", 1: "label_1", 2: "label_2"}  # type: ignore[attr-defined]
    assert cfg.experiment.tasks == ["segmentation"]
    assert "# grid" in plan.yaml_text and "# WARNING" in plan.yaml_text
    assert any("test split of 2" in w or "only 2 patients" in w for w in plan.warnings)


def test_plan_scales_steps_with_budget_and_batch_with_memory(synth) -> None:
    fp = fingerprint(DataConfig(root=str(synth.msd(n=4))))
    short, long = plan_config(fp, "cpu", budget_min=10), plan_config(fp, "cpu", budget_min=100)
    assert long.raw["diffusion"]["train"]["steps"] > short.raw["diffusion"]["train"]["steps"]
    small, big = plan_config(fp, "cuda", memory_gib=0.01), plan_config(fp, "cuda", memory_gib=80)
    assert small.raw["autoencoder"]["train"]["batch_size"] < big.raw["autoencoder"]["train"]["batch_size"]


def test_plan_grid_coarsens_large_volumes_to_the_budget() -> None:
    fp = {"spacing": {"median": [1.0, 1.0, 1.0]}, "shape": {"per_axis": [{"p95": 200.0}] * 3}}
    preset = {"ae": {"channels": [16, 32, 32]}, "unet": {"channels": [32, 64]}, "max_voxels": 48_000}
    spacing, size, why = plan_grid(fp, preset, 3)
    assert np.prod(size) <= 48_000 and all(s % 8 == 0 for s in size)
    assert spacing[0] > 5.0 and "coarsened" in why


def test_plan_2d_lesion_only_png(synth, tmp_path: Path) -> None:
    root = synth.png_patients(patients=("P1", "P2", "P3", "P4", "P5"), slices=4)  # lesions in half the slices
    fp = fingerprint(DataConfig(root=str(root)))
    assert fp["labels"]["values"] == [0, 255]
    plan = plan_config(fp, "cpu")
    cfg = _validates(plan.yaml_text, tmp_path)
    assert cfg.data.labels == {0: "background", 1: "lesion"} and cfg.data.label_remap == {255: 1}  # type: ignore[attr-defined]
    dl = cfg.preprocess.derived_label  # type: ignore[attr-defined]
    assert dl.enabled and dl.index == 2
    assert cfg.synthesis.lesion_label == 1  # type: ignore[attr-defined]
    assert cfg.controlnet.label_weights == {1: 4.0}  # type: ignore[attr-defined]
    assert cfg.qc.policy == "exclude"  # type: ignore[attr-defined]  # slices: blank ones are dropped
    assert cfg.preprocess.spatial_dims == 2  # type: ignore[attr-defined]


def test_plan_warns_when_the_test_split_cannot_be_measured(synth) -> None:
    fp = fingerprint(DataConfig(root=str(synth.msd(n=3))))
    plan = plan_config(fp, "cpu")
    assert any("n/a (needs >= 2)" in w for w in plan.warnings)


def test_write_plan_never_overwrites(synth, tmp_path: Path) -> None:
    plan = plan_config(fingerprint(DataConfig(root=str(synth.msd(n=3)))), "cpu")
    out = write_plan(plan, tmp_path / "p.yaml")
    with pytest.raises(OutputExistsError):
        write_plan(plan, out)


def test_cli_plan_writes_fingerprint_and_config(
    synth, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = synth.msd(n=5)
    out = tmp_path / "plan" / "tiny.yaml"
    monkeypatch.setattr("sys.argv", ["medsynth", "plan", str(root), "--out", str(out), "--budget-min", "5"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert f"config: {out}" in printed
    fp = json.loads((out.parent / "fingerprint.json").read_text(encoding="utf-8"))
    assert fp["n_cases"] == 5
    assert (out.parent / "fingerprint.md").read_text(encoding="utf-8").startswith("# Dataset fingerprint")
    raw = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert raw["data"]["root"] == str(root)
    load_config(out)
    # a second plan into the same file is refused before anything is written
    monkeypatch.setattr("sys.argv", ["medsynth", "plan", str(root), "--out", str(out), "--device", "gpu"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2


@pytest.mark.parametrize("name", ["msd-hippocampus", "lgg-flair"])
def test_plan_on_shared_datasets(require_shared, name: str, tmp_path: Path) -> None:
    root = require_shared(name)
    fp = fingerprint(DataConfig(root=str(root)), max_cases=16)
    for device in ("cpu", "cuda"):
        cfg = _validates(plan_config(fp, device).yaml_text, tmp_path)  # type: ignore[arg-type]
        assert cfg.preprocess.spatial_dims == (3 if name == "msd-hippocampus" else 2)  # type: ignore[attr-defined]
    if name == "lgg-flair":
        assert cfg.data.label_remap == {255: 1}  # type: ignore[attr-defined]


def test_plan_from_a_csv_manifest_of_brats_style_folders(synth, tmp_path: Path) -> None:
    root = tmp_path / "brats"
    rows = ["image,mask"]
    for i in range(4):
        img, msk = synth.volume(i)
        write_image(root / f"case_{i}" / "flair.nii.gz", img, synth.affine_3d)
        write_image(root / f"case_{i}" / "seg.nii.gz", msk, synth.affine_3d)
        rows.append(f"case_{i}/flair.nii.gz,case_{i}/seg.nii.gz")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    fp = fingerprint(DataConfig(root=str(manifest)))
    assert fp["layout"]["name"] == "csv" and fp["n_cases"] == 4
    assert {r["case_id"] for r in fp["cases"]} == {f"case_{i}__flair" for i in range(4)}
    plan = plan_config(fp, "cpu")
    assert plan.raw["name"] == "manifest"
    _validates(plan.yaml_text, tmp_path)


def test_fingerprint_counts_channels_of_4d_nifti(synth, tmp_path: Path) -> None:
    import nibabel as nib

    root = tmp_path / "mc"
    for i in range(3):
        img, msk = synth.volume(i)
        four = np.stack([img, img * 2], axis=-1)
        (root / "images").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(four, synth.affine_3d), str(root / "images" / f"v{i}.nii.gz"))
        write_image(root / "labels" / f"v{i}.nii.gz", msk, synth.affine_3d)
    fp = fingerprint(DataConfig(root=str(root)))
    assert fp["channels"] == 2 and fp["ndim"] == 3
    assert any("2 channels per case" in p for p in fp["problems"])
    plan = plan_config(fp, "cpu")
    assert plan.raw["data"]["channels"] == ["ch0", "ch1"] and "channel" not in plan.raw["data"]
    assert any("modelled jointly" in w for w in plan.warnings)
    _validates(plan.yaml_text, tmp_path)


def test_plan_names_channels_from_dataset_json(synth, tmp_path: Path) -> None:
    root = synth.multicontrast("nnunet", n=3)
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "FLAIR", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2}})
    )
    plan = plan_config(fingerprint(DataConfig(root=str(root))), "cpu")
    assert plan.raw["data"]["channels"] == ["flair", "t2"]
    cfg = _validates(plan.yaml_text, tmp_path)
    assert cfg.data.channels == ("flair", "t2")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["plan", "{tmp}/missing"], "{tmp}/missing: dataset root does not exist"),
        (["data", "check", "{bad}"], "cannot infer a label vocabulary"),
    ],
)
def test_cli_bad_input_is_one_error_line(
    synth,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    expected: str,
) -> None:
    bad = synth.paired_dirs(n=2)
    img, _ = synth.volume(0)
    write_image(bad / "labels" / "vol_1.nii.gz", (img * 3).astype(np.int16), synth.affine_3d)  # not a label map
    monkeypatch.chdir(tmp_path)
    args = [a.format(tmp=tmp_path, bad=bad) for a in argv]
    monkeypatch.setattr("sys.argv", ["medsynth", *args, "--out", str(tmp_path / "out" / "x.yaml")])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and expected.format(tmp=tmp_path) in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "x.yaml").exists()
