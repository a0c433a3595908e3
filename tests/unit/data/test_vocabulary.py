"""Label vocabulary resolution: declared, read from dataset.json (MSD / nnU-Net v2), or inferred from masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.data.io import write_image
from medsynth.data.preprocess import load_manifest, run_preprocess
from medsynth.data.qc_report import enforce_policy, run_check
from medsynth.data.vocabulary import data_labels, infer_vocabulary, labels_declared, resolve_labels
from medsynth.errors import DataError


def _raw_undeclared(synth, root: Path, **data: object) -> dict[str, object]:
    raw = synth.raw(root)
    raw["data"] = {k: v for k, v in raw["data"].items() if k != "labels"}  # type: ignore[union-attr]
    raw["data"].update(data)  # type: ignore[union-attr]
    return raw


def test_undeclared_labels_are_inferred_as_the_union_of_mask_values(synth, tmp_path: Path) -> None:
    root = synth.paired_dirs(n=3)
    cfg = synth.config(_raw_undeclared(synth, root))
    assert not labels_declared(cfg.data)
    vocab = infer_vocabulary(cfg.data)
    assert vocab.source == "inferred"
    assert vocab.labels == {0: "background", 1: "label_1", 2: "label_2"}
    assert "3 masks" in vocab.detail and "[0, 1, 2]" in vocab.detail
    report = run_check(cfg, tmp_path / "qc")
    assert report.n_bad == 0
    assert report.labels == {0: "background", 1: "label_1", 2: "label_2"}
    md = (tmp_path / "qc" / "qc_summary.md").read_text(encoding="utf-8")
    assert "labels inferred from 3 masks" in md
    assert "| 2 | label_2 |" in md
    stored = json.loads((tmp_path / "qc" / "qc_report.json").read_text(encoding="utf-8"))
    assert stored["labels_source"]["source"] == "inferred"


def test_inferred_labels_reach_the_cache_and_later_stages(synth, tmp_path: Path) -> None:
    root = synth.paired_dirs(n=3)
    cfg = synth.config(_raw_undeclared(synth, root))
    run_preprocess(cfg, None)
    manifest = load_manifest(Path(cfg.output_dir) / cfg.name / "preprocess")
    assert manifest["data_labels"] == {"0": "background", "1": "label_1", "2": "label_2"}
    assert manifest["labels"] == manifest["data_labels"]
    # a later stage, given the same undeclared config, reads the cache's vocabulary
    for case in (root / "labels").iterdir():
        case.unlink()  # no rescanning: the masks are gone, the manifest answers
    assert data_labels(cfg) == {0: "background", 1: "label_1", 2: "label_2"}


def test_binary_0_255_masks_are_inferred_as_foreground_with_remap(synth, tmp_path: Path) -> None:
    root = synth.png_patients(slices=2)
    raw = {"name": "png", "output_dir": str(tmp_path / "out"), "data": {"root": str(root)}}
    cfg = synth.config(raw)
    new, vocab = resolve_labels(cfg)
    assert vocab.labels == {0: "background", 1: "foreground"}
    assert new.data.label_remap == {255: 1} and labels_declared(new.data)
    assert "0/255" in vocab.detail
    assert run_check(cfg, tmp_path / "qc").n_bad == 0


@pytest.mark.parametrize(
    "labels",
    [
        {"0": "background", "1": "Anterior", "2": "Posterior"},  # MSD
        {"background": 0, "Anterior": 1, "Posterior": 2, "whole": [1, 2]},  # nnU-Net v2 (+ a region, skipped)
    ],
)
def test_dataset_json_labels_are_read(synth, labels: dict[str, object]) -> None:
    root = synth.msd(n=2)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    (root / "dataset.json").write_text(json.dumps({**meta, "labels": labels}))
    cfg = synth.config(_raw_undeclared(synth, root))
    vocab = infer_vocabulary(cfg.data)
    assert vocab.source == "dataset.json"
    assert vocab.labels == {0: "background", 1: "Anterior", 2: "Posterior"}


def test_dataset_json_vocabulary_mismatch_names_file_values_and_how_to_declare(synth, tmp_path: Path) -> None:
    root = synth.msd(n=2)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    (root / "dataset.json").write_text(json.dumps({**meta, "labels": {"0": "background", "1": "a"}}))
    cfg = synth.config(_raw_undeclared(synth, root))
    report = run_check(cfg, tmp_path / "qc")
    assert report.n_bad == 2
    with pytest.raises(DataError) as info:
        enforce_policy(report)
    err = info.value
    assert err.path.endswith("labelsTr/case_000.nii.gz")
    assert "mask values [2] are not in the label vocabulary [0, 1]" in err.problem
    assert "data.labels" in err.hint and "--labels" in err.hint


def test_declared_labels_are_not_overridden_by_the_data(synth, tmp_path: Path) -> None:
    root = synth.paired_dirs(n=2)
    cfg = synth.config(synth.raw(root, data={"labels": {0: "background", 1: "a"}}))
    assert labels_declared(cfg.data)
    new, vocab = resolve_labels(cfg)
    assert new is cfg and vocab.source == "config"
    assert run_check(cfg, tmp_path / "qc").n_bad == 2  # value 2 is outside the declared vocabulary


def test_non_label_masks_are_one_clear_error(synth, tmp_path: Path) -> None:
    root = synth.paired_dirs(n=2)
    img, _ = synth.volume(0)
    write_image(root / "labels" / "vol_1.nii.gz", (img * 3).astype(np.int16), synth.affine_3d)
    cfg = synth.config(_raw_undeclared(synth, root))
    with pytest.raises(DataError) as info:
        infer_vocabulary(cfg.data)
    assert "cannot infer a label vocabulary" in info.value.problem
    assert "data.labels" in info.value.hint


def test_csv_manifest_of_mixed_formats_infers_labels(synth, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    rows = ["image,mask"]
    for i, ext in enumerate((".nii.gz", ".nrrd", ".mha")):
        img, msk = synth.volume(i)
        write_image(root / f"img{i}{ext}", img, synth.affine_3d)
        write_image(root / f"seg{i}{ext}", msk, synth.affine_3d)
        rows.append(f"img{i}{ext},seg{i}{ext}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    raw = {"name": "mixed", "output_dir": str(tmp_path / "out"), "data": {"root": str(root / "m.csv")}}
    report = run_check(synth.config(raw), tmp_path / "qc")
    assert report.n_bad == 0 and report.labels == {0: "background", 1: "label_1", 2: "label_2"}


def test_cli_data_check_on_shared_hippocampus_with_no_options(
    require_shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from medsynth.cli import main

    root = require_shared("msd-hippocampus")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["medsynth", "data", "check", str(root), "--out", str(tmp_path / "qc")])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "220 cases, 0 bad" in out
    assert "labels: 0=background, 1=label_1, 2=label_2" in out


def test_undeclared_labels_survive_a_json_round_trip(synth, tmp_path: Path) -> None:
    """Stages and Prefect tasks pass configs as JSON: "resolve from the data" must not become a default vocabulary."""
    root = synth.paired_dirs(n=2)
    cfg = synth.config(_raw_undeclared(synth, root))
    again = synth.config(cfg.model_dump(mode="json"))
    assert not labels_declared(again.data)
    assert infer_vocabulary(again.data).labels == {0: "background", 1: "label_1", 2: "label_2"}
