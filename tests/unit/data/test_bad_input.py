"""Bad input: each problem is one clear error naming the file (or key), and the cache is left untouched.

Every case goes through :func:`medsynth.data.preprocess.run_preprocess` with ``qc.policy: fail``;
afterwards the cache folder must hold no manifest, no case arrays and no staging folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medsynth.cli import main
from medsynth.config import load_config
from medsynth.data.io import write_image
from medsynth.data.preprocess import run_preprocess
from medsynth.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def dataset(synth) -> Path:
    """A valid 3-case MSD dataset (with dataset.json)."""
    return synth.msd(n=3)


def _fails(synth, root: Path, cache: Path, **sections: object) -> DataError:
    cfg = synth.config(synth.raw(root, **sections))
    with pytest.raises(DataError) as info:
        run_preprocess(cfg, cache)
    return info.value


def test_valid_dataset_passes(synth, dataset: Path, tmp_path: Path) -> None:
    # the baseline the bad-input tests alter: without the alteration, preprocessing succeeds
    s = run_preprocess(synth.config(synth.raw(dataset)), tmp_path / "cache")
    assert s.n_cases == 3 and s.excluded == []


def test_corrupt_image_file(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    bad = dataset / "imagesTr" / "case_001.nii.gz"
    bad.write_bytes(os.urandom(512))
    err = _fails(synth, dataset, tmp_path / "cache")
    assert err.path == str(bad.resolve())
    assert "cannot read file" in err.problem
    assert "qc.policy=exclude" in err.hint
    assert_cache_clean(tmp_path / "cache")


def test_shape_mismatch(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    mask_path = dataset / "labelsTr" / "case_002.nii.gz"
    write_image(mask_path, np.zeros((12, 10, 7), dtype=np.uint8), synth.affine_3d)
    err = _fails(synth, dataset, tmp_path / "cache")
    assert err.path == str(mask_path.resolve())
    assert "image shape (12, 10, 8) != mask shape (12, 10, 7)" in err.problem
    assert_cache_clean(tmp_path / "cache")


def test_geometry_mismatch(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    mask_path = dataset / "labelsTr" / "case_000.nii.gz"
    _, mask = synth.volume(0)
    shifted = synth.affine_3d.copy()
    shifted[:3, 3] += [5.0, 0.0, 0.0]
    write_image(mask_path, mask, shifted)
    err = _fails(synth, dataset, tmp_path / "cache")
    assert err.path == str(mask_path.resolve())
    assert "origin differs" in err.problem
    assert_cache_clean(tmp_path / "cache")


def test_spacing_mismatch(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    mask_path = dataset / "labelsTr" / "case_000.nii.gz"
    _, mask = synth.volume(0)
    write_image(mask_path, mask, np.diag([1.0, 1.0, 3.0, 1.0]))
    err = _fails(synth, dataset, tmp_path / "cache")
    assert err.path == str(mask_path.resolve())
    assert "spacing differs" in err.problem
    assert_cache_clean(tmp_path / "cache")


def test_mask_value_outside_vocabulary(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    mask_path = dataset / "labelsTr" / "case_001.nii.gz"
    _, mask = synth.volume(1)
    mask[0, 0, 0] = 7
    write_image(mask_path, mask, synth.affine_3d)
    err = _fails(synth, dataset, tmp_path / "cache")
    assert err.path == str(mask_path.resolve())
    assert "mask values [7] are not in the label vocabulary [0, 1, 2]" in err.problem
    assert_cache_clean(tmp_path / "cache")


def test_label_remap_fixes_255(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    mask_path = dataset / "labelsTr" / "case_001.nii.gz"
    _, mask = synth.volume(1)
    mask[mask == 1] = 255
    write_image(mask_path, mask, synth.affine_3d)
    err = _fails(synth, dataset, tmp_path / "bad-cache")
    assert "[255]" in err.problem and err.path == str(mask_path.resolve())
    assert_cache_clean(tmp_path / "bad-cache")

    remapped = synth.raw(dataset, data={"label_remap": {255: 1}})
    s = run_preprocess(synth.config(remapped), tmp_path / "cache")
    assert s.excluded == []
    with np.load(tmp_path / "cache" / "cases" / "case_001.npz") as z:
        assert set(np.unique(z["mask"]).tolist()) == {0, 1, 2}
        assert int((z["mask"] == 1).sum()) == int((mask == 255).sum())


def test_nan_in_image(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    img_path = dataset / "imagesTr" / "case_000.nii.gz"
    img, _ = synth.volume(0)
    img[3, 3, 3] = np.nan
    img[4, 4, 4] = np.inf
    write_image(img_path, img, synth.affine_3d)
    err = _fails(synth, dataset, tmp_path / "cache")
    assert err.path == str(img_path.resolve())
    assert "2 NaN/Inf voxels" in err.problem
    assert_cache_clean(tmp_path / "cache")


def test_constant_image(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    img_path = dataset / "imagesTr" / "case_002.nii.gz"
    write_image(img_path, np.zeros((12, 10, 8), dtype=np.float32), synth.affine_3d)
    err = _fails(synth, dataset, tmp_path / "cache")
    assert err.path == str(img_path.resolve())
    assert "constant" in err.problem
    assert_cache_clean(tmp_path / "cache")


def test_near_empty_image_is_flagged_only_when_asked(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    img_path = dataset / "imagesTr" / "case_001.nii.gz"
    noise = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32) * 5.0  # faint noise, no anatomy
    write_image(img_path, noise, synth.affine_3d)
    run_preprocess(synth.config(synth.raw(dataset)), tmp_path / "off")  # default: not checked
    err = _fails(synth, dataset, tmp_path / "cache", qc={"min_signal": 20.0})
    assert err.path == str(img_path.resolve()) and "near-empty" in err.problem
    assert_cache_clean(tmp_path / "cache")
    # a case with real signal passes the same threshold
    write_image(img_path, noise * 20.0, synth.affine_3d)
    run_preprocess(synth.config(synth.raw(dataset, qc={"min_signal": 20.0})), tmp_path / "on")


def test_empty_dataset(synth, tmp_path: Path, assert_cache_clean) -> None:
    root = tmp_path / "empty"
    (root / "imagesTr").mkdir(parents=True)
    err = _fails(synth, root, tmp_path / "cache")
    assert err.path == str(root)
    assert "dataset is empty" in err.problem
    assert_cache_clean(tmp_path / "cache")


def test_missing_mask(synth, tmp_path: Path, assert_cache_clean) -> None:
    root = synth.msd(n=3, training_list=False)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    err = _fails(synth, root, tmp_path / "cache")
    assert err.path == str(root / "imagesTr" / "case_001.nii.gz")
    assert "no mask found" in err.problem
    assert_cache_clean(tmp_path / "cache")


def test_mask_listed_but_absent(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    gone = dataset / "labelsTr" / "case_000.nii.gz"
    gone.unlink()
    err = _fails(synth, dataset, tmp_path / "cache")
    assert err.path == str(gone.resolve())
    assert "does not exist" in err.problem
    assert_cache_clean(tmp_path / "cache")


def test_layout_matches_nothing(synth, tmp_path: Path, assert_cache_clean) -> None:
    root = tmp_path / "junk"
    root.mkdir()
    (root / "readme.txt").write_text("no images here")
    err = _fails(synth, root, tmp_path / "cache")
    assert err.path == str(root)
    assert "layout matches nothing" in err.problem
    assert err.hint
    assert_cache_clean(tmp_path / "cache")


def test_config_typo_names_key_and_file(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    raw = synth.raw(dataset)
    raw["preprocess"]["intensty"] = {"method": "zscore"}
    path = synth.yaml(raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert "unknown key 'preprocess.intensty'" in info.value.problem
    assert_cache_clean(Path(raw["output_dir"]) / "tiny" / "preprocess")


def test_exclude_policy_lists_bad_case_and_processes_the_rest(synth, dataset: Path, tmp_path: Path) -> None:
    bad = dataset / "imagesTr" / "case_001.nii.gz"
    bad.write_bytes(os.urandom(512))
    cfg = synth.config(synth.raw(dataset, qc={"policy": "exclude"}))
    cache = tmp_path / "cache"
    s = run_preprocess(cfg, cache)
    assert s.n_cases == 3 and s.n_items == 2
    manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    assert [e["case_id"] for e in manifest["excluded"]] == ["case_001"]
    problem = manifest["excluded"][0]["problems"][0]
    assert problem["code"] == "unreadable"
    assert problem["file"] == str(bad.resolve())
    assert sorted(it["case_id"] for it in manifest["items"]) == ["case_000", "case_002"]
    assert sorted(p.name for p in cache.glob("cases/*.npz")) == ["case_000.npz", "case_002.npz"]
    # the exclusion is remembered by the cache: a re-run does no work and still lists it
    again = run_preprocess(cfg, cache)
    assert again.n_processed == 0
    assert [e["case_id"] for e in again.excluded] == ["case_001"]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_data_check_prints_one_error_line_and_hint(synth, tmp_path: Path) -> None:
    root = synth.png_patients(patients=("PA", "PB"), slices=2)
    bad = root / "PB" / "PB_1.png"
    bad.write_bytes(os.urandom(300))  # SimpleITK's error for this spans several lines
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medsynth.cli",
            "data",
            "check",
            str(root),
            "--labels",
            "0:bg,1:lesion",
            "--remap",
            "255:1",
            "--out",
            str(tmp_path / "qc"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {bad}: cannot read file")
    assert "1 bad cases in total" in lines[0]
    hint = proc.stderr.splitlines()[proc.stderr.splitlines().index(lines[0]) + 1]
    assert hint.startswith("hint: ") and "qc.policy=exclude" in hint
    assert (tmp_path / "qc" / "qc_report.json").is_file()  # the report is still written


def test_cli_main_config_typo_exit_code_2(
    synth, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = synth.raw(dataset)
    raw["preprocess"]["spatial_dimz"] = 3
    path = synth.yaml(raw)
    monkeypatch.setattr(sys, "argv", ["medsynth", "preprocess", "--config", str(path)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert lines == [f"error: {path}: unknown key 'preprocess.spatial_dimz'"]
    assert any(line.startswith("hint: ") for line in err.splitlines())


def test_cli_main_bad_data_exit_code_2(
    synth, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mask_path = dataset / "labelsTr" / "case_001.nii.gz"
    _, mask = synth.volume(1)
    mask[0, 0, 0] = 7
    write_image(mask_path, mask, synth.affine_3d)
    path = synth.yaml(synth.raw(dataset))
    from medsynth.config import load_config

    cfg = load_config(path, ["tracking.enabled=false"])
    cache = Path(cfg.output_dir) / cfg.name / "preprocess"
    monkeypatch.setattr(sys, "argv", ["medsynth", "preprocess", "-c", str(path), "--set", "tracking.enabled=false"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {mask_path.resolve()}: mask values [7]")
    assert "Traceback" not in err
    assert not (cache / "manifest.json").exists()


def test_spacing_entries_do_not_fit_the_data(synth, tmp_path: Path, assert_cache_clean) -> None:
    root = synth.png_patients(patients=("PA", "PB"), slices=1)
    raw = synth.raw(
        root,
        data={"labels": {0: "background", 1: "lesion"}, "label_remap": {255: 1}},
        preprocess={"spatial_dims": 2, "spatial_size": [16, 16], "spacing": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(ConfigError) as info:
        run_preprocess(synth.config(raw), tmp_path / "cache")
    assert "preprocess.spacing [1.0, 1.0, 1.0] has 3 entries but the data is 2D" in info.value.problem
    assert info.value.hint
    assert_cache_clean(tmp_path / "cache")


def test_cli_main_spacing_mismatch_is_one_line(
    synth, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = synth.png_patients(patients=("PA",), slices=1)
    raw = synth.raw(
        root,
        data={"labels": {0: "background", 1: "lesion"}, "label_remap": {255: 1}},
        preprocess={"spatial_dims": 2, "spatial_size": [16, 16]},
    )
    path = synth.yaml(raw)
    argv = ["medsynth", "preprocess", "-c", str(path), "--set", "preprocess.spacing=[1,1,1]"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert _error_lines(err) == ["error: config: preprocess.spacing [1.0, 1.0, 1.0] has 3 entries but the data is 2D"]
