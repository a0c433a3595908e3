"""The shipped configs on small subsets of the real data sets in ../shared/data (skipped where absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.data.io import spacing_from_affine

pytestmark = pytest.mark.shared_data
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture
def shared_env(require_shared, monkeypatch: pytest.MonkeyPatch):
    """Point ${MEDSYNTH_SHARED} at the shared folder (configs resolve it relative to nothing else)."""

    def use(name: str) -> Path:
        path = require_shared(name)
        monkeypatch.setenv("MEDSYNTH_SHARED", str(path.parents[1]))
        return path

    return use


def test_lgg_subset_check_and_preprocess(shared_env, tmp_path: Path) -> None:
    shared_env("lgg-flair")
    config = str(CONFIGS / "lgg-2d-128.yaml")  # configs/lgg-2d.yaml at 128 x 128
    sets = ["--set", "data.include=TCGA_CS_49", "--set", f"output_dir={tmp_path}"]
    out = _invoke("data", "check", config, *sets, "--set", "qc.n_overlays=0")
    assert "60 cases, 3 bad" in out
    report = json.loads((tmp_path / "lgg-2d-128" / "qc" / "qc_report.json").read_text(encoding="utf-8"))
    assert report["n_cases"] == 60 and report["n_bad"] == 3
    black = sorted(c["case_id"] for c in report["cases"] if not c["ok"])
    assert all(c["problems"][0]["code"] == "constant" for c in report["cases"] if not c["ok"])

    out = _invoke("preprocess", "--config", config, *sets)
    assert "60 cases (60 processed, 0 cached, 3 excluded)" in out
    cache = tmp_path / "lgg-2d-128" / "preprocess"
    manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(e["case_id"] for e in manifest["excluded"]) == black  # black slices excluded and listed
    items = manifest["items"]
    assert len(items) == 57
    assert all(it["shape"] == [128, 128] for it in items)
    assert manifest["labels"] == {"0": "background", "1": "tumour", "2": "brain"}
    labels: set[int] = set()
    for f in sorted({it["file"] for it in items})[:20]:
        with np.load(cache / f) as z:
            assert z["image"].shape == (1, 1, 128, 128)
            assert float(z["image"].min()) >= 0.0 and float(z["image"].max()) <= 1.0
            labels |= set(np.unique(z["mask"]).tolist())
            assert spacing_from_affine(z["affine"][0]) == pytest.approx((2.0, 2.0))
    assert labels <= {0, 1, 2}
    assert sum(int(it["label_counts"].get("1", 0)) > 0 for it in items) >= 15  # tumour present
    assert all(set(it["label_counts"]) <= {"0", "1", "2"} for it in items)
    split_of: dict[str, set[str]] = {}
    for it in items:
        assert it["patient_id"] == it["case_id"].rsplit("_", 1)[0]  # patient = folder
        split_of.setdefault(it["patient_id"], set()).add(it["split"])
    assert len(split_of) == 3 and all(len(s) == 1 for s in split_of.values())  # patient-level split


def test_hippocampus_subset_preprocess(shared_env, tmp_path: Path) -> None:
    shared_env("msd-hippocampus")
    args = [
        "preprocess",
        "-c",
        str(CONFIGS / "hippocampus-3d-1mm.yaml"),
        "--set",
        "data.include=hippocampus_00",
        "--set",
        f"output_dir={tmp_path}",
    ]
    out = _invoke(*args)
    assert "5 cases (5 processed, 0 cached, 0 excluded) -> 5 items" in out
    cache = tmp_path / "hippocampus-3d-1mm" / "preprocess"
    manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["excluded"] == []
    for it in manifest["items"]:
        assert it["shape"] == [48, 64, 48]
        assert set(it["label_counts"]) == {"0", "1", "2"}
        with np.load(cache / it["file"]) as z:
            assert z["image"][it["index"]].shape == (1, 48, 64, 48)
            assert set(np.unique(z["mask"]).tolist()) == {0, 1, 2}
            assert spacing_from_affine(z["affine"][it["index"]]) == pytest.approx((1.0, 1.0, 1.0), abs=1e-4)
    out = _invoke(*args)
    assert "preprocess: up to date (cached)" in out  # same data, same settings: the stage does not run
