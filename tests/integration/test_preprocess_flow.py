"""The Prefect preprocessing flow on a tiny phantom."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def test_preprocess_flow_on_phantom(prefect_harness: None, tmp_path: Path) -> None:
    from flows.preprocess import preprocess_flow

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

    first = preprocess_flow(str(path), [])
    manifest = Path(first["manifest"])
    assert manifest.is_file()
    assert manifest.parent == tmp_path / "out" / "flowtest" / "preprocess"
    assert (first["n_cases"], first["n_processed"], first["n_cached"], first["n_excluded"]) == (6, 6, 0, 0)
    data = json.loads(manifest.read_text(encoding="utf-8"))
    assert data["n_items"] == first["n_items"] == 6
    assert {it["patient_id"] for it in data["items"]} == {f"phantom_{i:03d}" for i in range(3)}
    assert all(it["shape"] == [32, 32] for it in data["items"])
    assert first["qc"]["n_bad"] == 0
    assert (tmp_path / "out" / "flowtest" / "qc" / "qc_report.json").is_file()

    second = preprocess_flow(str(path), [])
    assert (second["n_processed"], second["n_cached"]) == (0, 6)
    assert json.loads(manifest.read_text(encoding="utf-8"))["items"] == data["items"]
    assert not list(manifest.parent.glob(".staging-*"))
