"""Site adaptation end to end at toy size: two fake TCGA sites, the adaptation stage, `medsynth adapt`, synthesis.

The generator is trained on site AA only (``data.include`` excludes BB); the stage adapts it to BB from
k = 1 and 2 patients and compares none / LoRA / full on BB's other patients. Real classes, tiny networks,
a few optimiser steps: this checks the machinery (wiring, files, registry, errors), not the science.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("peft")


def _dataset(synth: Any, root: Path, patients: list[str]) -> Path:
    return synth.png_patients(root, patients=patients, slices=2)


@pytest.fixture
def site_config(synth: Any, tmp_path: Path, pipeline_config: Any) -> tuple[Path, dict[str, Any]]:
    data = _dataset(
        synth, tmp_path / "tcga", [f"TCGA_AA_{i:04d}" for i in range(4)] + [f"TCGA_BB_{i:04d}" for i in range(4)]
    )
    raw = pipeline_config(tmp_path)
    raw["phantom"] = {"enabled": False}
    raw["data"] = {
        "root": str(data),
        "mask_suffix": "_mask",
        "include": "^(?!TCGA_BB_)",  # the generator never sees site BB
        "labels": {0: "background", 1: "tumour"},
        "label_remap": {255: 1},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 0},
    }
    raw["preprocess"] = {"spatial_dims": 2, "spatial_size": [16, 16]}
    raw["segmenter"]["channels"] = [8, 16]
    raw["segmenter"]["strides"] = [2]
    raw["adaptation"] = {
        "enabled": True,
        "target_site": "BB",
        "k_patients": [1, 2],
        "rank": 2,
        "steps": 3,
        "batch_size": 2,
        "n_bootstrap": 10,
    }
    return data, raw


def test_the_adaptation_stage_compares_none_lora_and_full_on_the_held_out_site(
    site_config: tuple[Path, dict[str, Any]], synth: Any, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.fileio import sha256_file
    from medsynth.pipeline import run_with_upstream

    _, raw = site_config
    cfg = synth.config(raw)
    first = CliRunner().invoke(app, ["adaptation", "-c", str(synth.yaml(raw))])  # trains what it needs first
    assert first.exit_code == 0, first.output
    assert "adaptation: done" in first.output and "# Site adaptation to BB" in first.output
    out = run_with_upstream(cfg, "adaptation")  # the same stage from the library: up to date
    assert out["adaptation"].cached
    res = out["adaptation"].result
    assert res is not None
    root = tmp_path / "out" / "tiny"
    manifest = json.loads((root / "preprocess" / "manifest.json").read_text())
    assert {it["patient_id"][:7] for it in manifest["items"]} == {"TCGA_AA"}  # trained without BB
    rows = {(r["k"], r["method"]): r for r in res.rows}  # type: ignore[attr-defined]
    assert set(rows) == {(k, m) for k in (1, 2) for m in ("none", "lora", "full")}
    for k in (1, 2):
        assert rows[(k, "none")]["trainable_params"] == 0
        assert 0 < rows[(k, "lora")]["trainable_params"] < rows[(k, "full")]["trainable_params"]
        assert rows[(k, "lora")]["adapt_seconds"] > 0
        assert rows[(k, "lora")]["n_eval_patients"] == 2
        # the adapted generators draw other images than the base one (the adapter is applied)
        assert rows[(k, "none")]["fid"] is not None
        for m in ("lora", "full"):
            assert rows[(k, m)]["fid"] != rows[(k, "none")]["fid"], (k, m, rows)
    print((root / "adaptation" / "adaptation.md").read_text())
    report = json.loads((root / "adaptation" / "adaptation.json").read_text())
    assert report["site"] == "BB" and report["sites"] == {"AA": 4, "BB": 4}
    assert report["fid_real_floor"] is not None and report["fid_real_floor"] >= 0
    ev = set(report["patients"]["evaluation"])
    assert len(ev) == 2 and not ev & set(report["patients"]["adaptation"]["2"])
    assert set(report["patients"]["adaptation"]["1"]) < set(report["patients"]["adaptation"]["2"])
    with open(root / "adaptation" / "adaptation.csv", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    assert "| 2 | lora |" in (root / "adaptation" / "adaptation.md").read_text()
    for cell in ("k1-lora", "k2-full"):
        meta = json.loads((root / "adaptation" / "adapters" / cell / "adapter.json").read_text())
        assert meta["info"]["site"] == "BB" and meta["method"] == cell.split("-")[1]
        assert all(p.startswith("TCGA_BB_") for p in meta["info"]["patients"])

    # a run that stopped after its cells (stamp and adapters gone) resumes from the ledger: nothing is adapted again
    shutil.rmtree(root / "adaptation" / "adapters")
    (root / "adaptation" / "stage.json").unlink()
    resumed = run_with_upstream(cfg, "adaptation")
    assert not resumed["adaptation"].cached
    assert resumed["adaptation"].result.rows == res.rows  # type: ignore[union-attr]
    assert not (root / "adaptation" / "adapters").exists()

    # adapting never touched the base generator: its bundle still holds the ControlNet the stage trained
    bundle = root / "generator" / "bundle" / "controlnet" / "checkpoints"
    ptr = json.loads((bundle / "final.json").read_text())["path"]
    trained = json.loads((root / "controlnet" / "checkpoints" / "final.json").read_text())["path"]
    for f in ("controlnet.safetensors", "controlnet_ema.safetensors"):
        assert sha256_file(bundle / ptr / f) == sha256_file(root / "controlnet" / "checkpoints" / trained / f)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"target_site": "ZZ"}, "target_site 'ZZ' matches no patient .*sites: AA \\(4\\), BB \\(4\\)"),
        ({"k_patients": [4]}, "site BB has 4 patients, too few .* needs at least 5"),
    ],
)
def test_unknown_site_and_too_few_patients_are_one_line_errors(
    site_config: tuple[Path, dict[str, Any]], synth: Any, update: dict[str, Any], message: str
) -> None:
    from medsynth.adaptation.sites import split_site
    from medsynth.errors import ConfigError

    _, raw = site_config
    cfg = synth.config({**raw, "adaptation": {**raw["adaptation"], **update}})
    ac = cfg.adaptation
    with pytest.raises(ConfigError, match=message) as err:
        split_site(cfg.data, ac.site_pattern, ac.target_site, ac.k_patients, ac.seed)
    assert "\n" not in str(err.value)


def test_adapt_cli_writes_and_registers_an_adapter_that_synthesis_uses(
    site_config: tuple[Path, dict[str, Any]], synth: Any, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.errors import ConfigError

    _, raw = site_config
    raw = {**raw, "adaptation": {"enabled": False}}
    cfg_path = synth.yaml(raw)
    new = _dataset(synth, tmp_path / "newsite", ["TCGA_CC_0001", "TCGA_CC_0002"])
    runner = CliRunner()
    args = ["adapt", "-c", str(cfg_path), "--data", str(new), "--method", "lora", "--rank", "2", "--steps", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    folder = tmp_path / "out" / "tiny" / "adapt" / "newsite-lora-r2"
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["rank"] == 2 and meta["info"]["n_items"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert "model: models:/medsynth-tiny-adapter/1" in res.output  # registered beside medsynth-tiny-generator

    syn = tmp_path / "synthetic-cc"
    res = runner.invoke(app, ["synthesize", "-c", str(cfg_path), "--adapter", str(folder), "--out", str(syn)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((syn / "manifest.json").read_text())
    assert "adapter/lora" in json.dumps(manifest)  # the adapter's weights hash is in the provenance

    bad = runner.invoke(app, ["adapt", "-c", str(cfg_path), "--data", str(new), "--method", "none"])
    assert isinstance(bad.exception, ConfigError) and "--method must be lora or full" in str(bad.exception)
    bad = runner.invoke(app, ["adapt", "-c", str(cfg_path), "--data", str(tmp_path / "missing")])
    assert isinstance(bad.exception, ConfigError) and "no such dataset folder" in str(bad.exception)
