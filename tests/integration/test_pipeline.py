"""The whole pipeline flow on a tiny phantom: stages, caching, MLflow structure, registry round trip,
and the same pipeline reporting to a real ``mlflow server`` over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

STAGES = {
    "check",
    "preprocess",
    "autoencoder",
    "latents",
    "unet",
    "controlnet",
    "generator",
    "synthesize",
    "segmenter",
    "features",
    "validate",
    "experiment",
    "report",
}
NETWORKS = {"autoencoder", "unet", "controlnet", "generator", "segmenter"}


def _write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _artifacts(client: Any, run_id: str, path: str = "") -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _check_store(client: Any, experiment: str, parent_id: str) -> None:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[parent_id]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["autoencoder.train.steps"] == "4"  # flattened resolved config
    children = {r.data.tags["medsynth.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == STAGES
    exp_id = children["experiment"].info.run_id
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == exp_id]
    assert cells and all(r.data.tags["medsynth.stage"] == "experiment-cell" for r in cells)
    assert all({"task", "fraction", "ratio", "seed", "arm"} <= set(r.data.params) for r in cells)
    by_task: dict[str, list[Any]] = {}
    for r in cells:
        by_task.setdefault(r.data.params["task"], []).append(r)
    assert set(by_task) == {"presence", "segmentation"}  # both downstream tasks on 2D data
    assert all("test_auroc" in r.data.metrics for r in by_task["presence"])
    assert all({"chosen_step", "stopped_step"} <= set(r.data.metrics) for r in cells)
    assert any(a.endswith("_vs_fraction.png") for a in _artifacts(client, exp_id))
    ae = children["autoencoder"]
    assert len(client.get_metric_history(ae.info.run_id, "ae/train_loss")) >= 1  # metrics with steps
    assert "ae/val_psnr" in ae.data.metrics
    assert any(a.endswith(".png") for a in _artifacts(client, ae.info.run_id, "samples"))
    assert any(a.endswith("config.resolved.yaml") for a in _artifacts(client, ae.info.run_id, "config"))
    qc = _artifacts(client, children["check"].info.run_id)
    assert {"qc/qc_report.json", "qc/qc_summary.md", "qc/qc_overlays.png"} <= set(qc)
    val = _artifacts(client, children["validate"].info.run_id)
    assert "validation/validation_report.json" in val and "validation/closest_pairs.png" in val
    assert "val/lesion_dice_synth" in children["validate"].data.metrics
    assert children["preprocess"].inputs.dataset_inputs  # the data the run saw, with its digest
    assert children["preprocess"].inputs.dataset_inputs[0].dataset.digest
    assert "report/whitepaper.md" in _artifacts(client, children["report"].info.run_id)
    assert parent.data.tags["medsynth.env.device"]  # where it ran
    names = {m.name for m in client.search_registered_models()}
    assert {f"medsynth-{experiment}-{n}" for n in NETWORKS} <= names


def test_pipeline_runs_every_stage_and_tracks_it(tiny_run: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    first = tiny_run["first"]
    assert not first["autoencoder"]["cached"]
    assert first["validate"]["result"]["outputs"]["report"].endswith("validation_report.json")
    db = tiny_run["root"] / "out" / "mlflow.db"
    _check_store(MlflowClient(f"sqlite:///{db}"), "tiny", first["mlflow_parent_run"])


def test_rerun_is_cached_and_trains_nothing(tiny_run: dict[str, Any]) -> None:
    second = tiny_run["second"]
    for stage in STAGES:
        assert second[stage]["cached"], stage
        assert second[stage]["computed_by"] == tiny_run["first"][stage]["run_id"], stage
        assert second[stage]["result"] == tiny_run["first"][stage]["result"], stage  # the computing run's result
    first_pre = tiny_run["first"]["preprocess"]["result"]["metrics"]
    assert first_pre["n_processed"] == first_pre["n_cases"] > 0
    assert tiny_run["t_second"] < tiny_run["t_first"]


def test_cached_stage_runs_link_the_run_that_computed_them(tiny_run: dict[str, Any]) -> None:
    """Second pipeline in the MLflow store: every stage run cached, linked, with the computing run's metrics;
    params are the stage's own config sections only; the parent run carries the headline metrics."""
    from mlflow import MlflowClient

    from medsynth.pipeline import get_stage

    client = MlflowClient(f"sqlite:///{tiny_run['root'] / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_id = {r.info.run_id: r for r in runs}
    for label in ("first", "second"):
        parent_id = tiny_run[label]["mlflow_parent_run"]
        children = {
            r.data.tags["medsynth.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id
        }
        assert set(children) == STAGES
        parent = by_id[parent_id]
        assert any(k.startswith("val/") and k.endswith("_ratio") for k in parent.data.metrics), parent.data.metrics
        assert "val/memorised_fraction" in parent.data.metrics and "val/fid_in_domain" in parent.data.metrics
        assert any(k.startswith("exp/delta_") for k in parent.data.metrics)
        for stage, run in children.items():
            sections = get_stage(stage).reads
            assert all(any(p.startswith(f"{s}.") for s in sections) for p in run.data.params), (stage, run.data.params)
            computed = by_id[run.data.tags["medsynth.computed_by"]]
            assert computed.data.tags["medsynth.cached"] == "false"
            if label == "second":
                assert run.data.tags["medsynth.cached"] == "true", stage
                assert computed.data.tags["mlflow.parentRunId"] == tiny_run["first"]["mlflow_parent_run"]
                assert run.data.metrics == computed.data.metrics, stage
            assert run.data.metrics, stage  # every stage run shows numbers
    # one name per number: no metric is logged under a second, unprefixed name
    ae = by_id[tiny_run["first"]["autoencoder"]["run_id"]]
    assert "ae/val_psnr" in ae.data.metrics and "val_psnr" not in ae.data.metrics


def test_report_is_built_from_the_runs_that_did_the_work(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    """`medsynth report` after a cached re-run: numbers and pictures come from the first run's stage runs."""
    import json

    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.evaluation.stats import format_estimate

    res = CliRunner().invoke(app, ["report", "-c", str(tiny_run["cfg"]), "--out", str(tmp_path / "wp")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "wp" / "whitepaper.md").read_text(encoding="utf-8")
    assert (tmp_path / "wp" / "whitepaper.html").is_file()
    import re

    grid = re.search(r"(\d+) grid cells \(", text)  # the grid's size, also when its cells came from the ledger
    assert grid is not None and int(grid.group(1)) > 0
    client = MlflowClient(f"sqlite:///{tiny_run['root'] / 'out' / 'mlflow.db'}")
    first, second = tiny_run["first"]["mlflow_parent_run"], tiny_run["second"]["mlflow_parent_run"]
    assert f"`{second[:8]}`" in text  # the latest finished pipeline
    exp = client.get_experiment_by_name("tiny")
    first_val = [
        r
        for r in client.search_runs([exp.experiment_id], "tags.`medsynth.stage` = 'validate'")
        if r.data.tags.get("mlflow.parentRunId") == first
    ]
    assert first_val and f"`{first_val[0].info.run_id[:8]}`" in text  # the run that computed the report
    report = json.loads(Path(tiny_run["first"]["validate"]["result"]["outputs"]["report"]).read_text(encoding="utf-8"))
    lesion = report["plausibility"]["per_label"]["lesion"]
    assert format_estimate(lesion["dice_synth"]) in text and format_estimate(lesion["ratio"]) in text
    contrast = report["contrast"]["lesion"]  # visibility: lesion contrast on real vs synthetic images
    assert contrast["n_cases"] == lesion["n_cases_present"]
    assert format_estimate(contrast["contrast_synth"]) in text and format_estimate(contrast["visible"]) in text
    val_run = client.get_run(first_val[0].info.run_id)
    assert val_run.data.metrics["val/lesion_contrast_ratio"] == pytest.approx(contrast["ratio"]["value"])
    figures = {p.name for p in (tmp_path / "wp" / "figures" / "tiny").iterdir()}
    assert {"controlnet_controlnet.png", "validation_closest_pairs.png"} <= figures
    assert any(n.startswith("experiment_") for n in figures)
    for line in text.splitlines():
        if line.startswith("!["):
            assert (tmp_path / "wp" / line.split("](")[1].rstrip(")")).is_file(), line


def test_registered_generator_reproduces_images(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    from medsynth.config import load_config
    from medsynth.data.io import read_image
    from medsynth.pipeline import run_stage
    from medsynth.pipeline.sampling_stages import SynthesizeOptions, synthesize_from_model

    cfg = load_config(tiny_run["cfg"])
    uri = tiny_run["first"]["generator"]["model_uri"]
    assert uri and uri.startswith("models:/medsynth-tiny-generator/")
    synthesize_from_model(cfg, uri, tmp_path / "from_model")
    out = run_stage(cfg, "synthesize", options=SynthesizeOptions(out=tmp_path / "from_runs"), track=False)
    assert not out.cached and out.result is not None
    files_a = sorted((tmp_path / "from_model" / "images").iterdir())
    files_b = sorted((tmp_path / "from_runs" / "images").iterdir())
    assert [f.name for f in files_a] == [f.name for f in files_b] and files_a
    for fa, fb in zip(files_a, files_b, strict=True):
        np.testing.assert_array_equal(read_image(fa).array, read_image(fb).array)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pipeline_reports_to_a_real_mlflow_server(prefect_harness: None, tmp_path: Path, pipeline_config: Any) -> None:
    """A real `mlflow server` on loopback; the pipeline logs over HTTP; the client reads it back."""
    from mlflow import MlflowClient

    from flows.pipeline import pipeline_flow

    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "art"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 90
        while True:
            try:
                client.search_experiments()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        cfg = pipeline_config(tmp_path, name="tinyhttp", tracking={"uri": uri})
        out = pipeline_flow(str(_write(tmp_path / "http.yaml", cfg)), [])
        _check_store(client, "tinyhttp", out["mlflow_parent_run"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_experiment_grid_fans_out_on_a_local_dask_cluster(tiny_run: dict[str, Any]) -> None:
    """New grid cells (another seed) run as Prefect tasks on a local Dask cluster (prefect-dask)."""
    from flows.stage import run_stage_prefect
    from medsynth.config import load_config

    cfg = load_config(
        tiny_run["cfg"], ["experiment.seeds=[0,1]", "orchestration.task_runner=dask", "orchestration.max_workers=2"]
    )
    out = run_stage_prefect("experiment", cfg.model_dump(mode="json"), None)
    metrics = out["result"]["metrics"]
    assert metrics["exp/n_trained"] > 0  # the seed-1 cells, on Dask
    assert metrics["exp/n_trained"] < metrics["exp/n_cells"]  # the seed-0 cells recorded by the pipeline run
    # each cell records the process that trained it: the Dask cells ran in worker processes, the pipeline's
    # cells (thread runner) in this one
    lines = Path(out["result"]["outputs"]["cells"]).read_text(encoding="utf-8").splitlines()
    recs = [json.loads(line)["record"] for line in lines if line]
    pids: dict[int, set[int]] = {int(r["seed"]): set() for r in recs}
    for r in recs:
        pids[int(r["seed"])].add(r["worker"]["pid"])
    assert pids[0] == {os.getpid()}
    assert pids[1] and os.getpid() not in pids[1], pids
