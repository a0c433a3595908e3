"""The Prefect preprocessing flow on a tiny phantom."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def test_preprocess_flow_on_phantom(prefect_harness: None, tmp_path: Path) -> None:
    from flows.pipeline import pipeline_flow

    cfg = {
        "name": "flowtest",
        "output_dir": str(tmp_path / "out"),
        "phantom": {"enabled": True, "dim": 2, "n": 3, "size": 32, "slices_per_patient": 2, "seed": 1},
        "data": {
            "root": str(tmp_path / "phantom"),
            "mask_suffix": "_mask",
            "labels": {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter", 4: "lesion"},
        },
        "qc": {"policy": "fail", "n_overlays": 0},
        "preprocess": {"spatial_dims": 2, "spatial_size": [32, 32]},
    }
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    first = pipeline_flow(str(path), [], stages=["check", "preprocess"])
    assert set(first) == {"mlflow_parent_run", "check", "preprocess"}
    pre = first["preprocess"]["result"]
    manifest = Path(pre["outputs"]["manifest"])
    assert manifest.is_file()
    assert manifest.parent == tmp_path / "out" / "flowtest" / "preprocess"
    m = pre["metrics"]
    assert (m["n_cases"], m["n_processed"], m["n_cached"], m["n_excluded"]) == (6, 6, 0, 0)
    data = json.loads(manifest.read_text(encoding="utf-8"))
    assert data["n_items"] == m["n_items"] == 6
    assert {it["patient_id"] for it in data["items"]} == {f"phantom_{i:03d}" for i in range(3)}
    assert all(it["shape"] == [32, 32] for it in data["items"])
    assert first["check"]["result"]["metrics"]["qc/n_bad"] == 0
    assert (tmp_path / "out" / "flowtest" / "qc" / "qc_report.json").is_file()

    second = pipeline_flow(str(path), [], stages=["preprocess"])
    assert second["preprocess"]["cached"]  # same data, same config: the stage is up to date
    third = pipeline_flow(str(path), ["preprocess.foreground_margin=3"], stages=["preprocess"])
    m3 = third["preprocess"]["result"]["metrics"]
    assert not third["preprocess"]["cached"] and m3["n_processed"] == 6  # a preprocessing setting changed
    assert json.loads(manifest.read_text(encoding="utf-8"))["items"] == data["items"]
    assert not list(manifest.parent.glob(".staging-*"))
