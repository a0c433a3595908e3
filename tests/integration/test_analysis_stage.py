"""The analysis stage on the tiny phantom: latent map, coverage and bias report, tracked in MLflow, and the
whitepaper section rendered from its report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig


@pytest.mark.timeout(900)
def test_analysis_stage_writes_map_and_bias_report_and_tracks_them(pipeline_config: Any, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from medsynth.evaluation.latent_map import umap_available
    from medsynth.pipeline import run_with_upstream
    from medsynth.pipeline.eval_stages import AnalysisResult
    from medsynth.report.analysis import analysis_section
    from medsynth.report.collect import ExperimentResults
    from medsynth.tracking.query import PipelineRecord, RunRecord

    raw = pipeline_config(tmp_path)
    raw["experiment"]["tasks"] = ["segmentation"]
    raw["analysis"] = {
        "enabled": True,
        "site_pattern": r"phantom_\d\d(\d)",  # 5 phantom patients: 'sites' 0..4
        "min_items": 2,
        "min_patients": 1,
        "n_synthetic": 4,
        "umap": {"n_neighbors": 4},
    }
    cfg = validate_config(raw, "tiny", MedsynthConfig)
    outs = run_with_upstream(cfg, "analysis", device="cpu")
    res = outs["analysis"].result
    assert isinstance(res, AnalysisResult)
    out = Path(res.outputs["report"]).parent
    rep = json.loads((out / "analysis_report.json").read_text(encoding="utf-8"))
    cov = rep["latent_map"]
    assert cov["na"] is None and 0.0 <= cov["coverage"] <= cov["recall"] <= 1.0
    assert res.coverage == cov["coverage"] and res.metrics["analysis/coverage"] == cov["coverage"]
    assert cov["n_synthetic"] == 4 and cov["n_test"] == rep["n_items"]
    # every item of the map: real train, real test, synthetic; coordinates when umap-learn is installed
    with (out / "latent_map.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["set"] for r in rows} == {"real train", "real test", "synthetic"}
    assert all(r["site"] in {"0", "1", "2", "3", "4"} for r in rows)
    assert (out / "latent_map.png").is_file() == umap_available() == all(r["x"] for r in rows)
    # bias: the whole test set first, then sites and lesion-size groups (phantom lesions in every patient)
    plaus = rep["plausibility"]
    assert plaus[0]["group"] == "all" and {r["grouping"] for r in plaus} >= {"all", "site", "lesion size"}
    assert rep["downstream"]["na"] is None and rep["downstream"]["rows"]
    assert {r["task"] for r in rep["downstream"]["rows"]} == {"segmentation"}
    bias = (out / "bias.csv").read_text(encoding="utf-8")
    assert bias.startswith("part,task,arm") and "plausibility" in bias and "downstream" in bias
    # the 'all' row reproduces the validation stage's lesion Dice ratio (its own synthetic images, kept by it)
    assert (tmp_path / "out" / "tiny" / "validation" / "synthetic_test.npz").is_file()
    val = json.loads(Path(outs["validate"].result.outputs["report"]).read_text(encoding="utf-8"))  # type: ignore[union-attr]
    ratio = val["plausibility"]["per_label"]["lesion"]["ratio"]["value"]
    assert plaus[0]["dice_ratio"]["value"] == pytest.approx(ratio, abs=1e-6)
    # tracked: one MLflow run of the stage with its metrics and artifacts
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run = client.get_run(outs["analysis"].run_id)  # type: ignore[arg-type]
    assert run.data.tags["medsynth.stage"] == "analysis"
    assert run.data.metrics["analysis/coverage"] == pytest.approx(cov["coverage"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert {"analysis/bias.csv", "analysis/latent_map.csv", "analysis/analysis_report.json"} <= arts
    assert ("analysis/latent_map.png" in arts) == umap_available()
    # the CLI command derived from the declaration: the same stage, up to date
    from typer.testing import CliRunner

    from medsynth.cli import app

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    cli = CliRunner().invoke(app, ["analyse", "-c", str(cfg_path), "--device", "cpu"])
    assert cli.exit_code == 0 and "analysis: up to date (cached)" in cli.output, cli.output
    # without umap-learn (import blocked): the same coverage, the map n/a and no PNG left behind
    import sys

    from medsynth.evaluation.latent_map import UMAP_MISSING
    from medsynth.pipeline import run_stage

    saved = sys.modules.get("umap", "absent")
    sys.modules["umap"] = None  # type: ignore[assignment]
    try:
        again = run_stage(cfg, "analysis", device="cpu", track=False, force=True).result
    finally:
        if saved == "absent":
            del sys.modules["umap"]
        else:
            sys.modules["umap"] = saved  # type: ignore[assignment]
    assert isinstance(again, AnalysisResult) and again.coverage == res.coverage
    rep2 = json.loads((out / "analysis_report.json").read_text(encoding="utf-8"))
    assert rep2["latent_map"]["umap"] == UMAP_MISSING and not (out / "latent_map.png").exists()
    assert UMAP_MISSING in (out / "analysis_summary.md").read_text(encoding="utf-8")
    # the whitepaper section reads the report: the reading from the coverage numbers, the bias table
    rec = RunRecord(run.info.run_id, "analysis", "analysis", "FINISHED", 0, 1, {}, {}, {})
    pipe = PipelineRecord("uri", "tiny", "0", rec, {"analysis": rec}, [], [])
    text = "\n".join(analysis_section(ExperimentResults(pipe, {}, analysis=rep)))
    assert cov["reading"] in text and "| site |" in text
    assert f"coverage {cov['coverage']:.3f}" in text and "| lesion size |" in text
