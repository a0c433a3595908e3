"""The full pipeline: check → preprocess → train (AE → latents → UNet → ControlNet) → synthesise → validate
→ downstream experiment → report.

Stages pass paths, summaries and MLflow run ids, never arrays. The pipeline owns one MLflow parent
run; every stage records a nested run under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import task_runner
from flows.experiment import run_experiment_flow
from flows.preprocess import preprocess_flow
from flows.report import report_flow
from flows.synthesize import synthesize_flow
from flows.train import train_flow
from flows.validate import validate_flow
from medsynth.config.loader import load_config
from medsynth.config.schema import MedsynthConfig
from medsynth.fileio import write_json_atomic
from medsynth.locking import config_run
from medsynth.tracking.stage import finish_pipeline, start_pipeline


@flow(name="medsynth-pipeline")
def pipeline_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every stage of the pipeline for a config; returns a summary per stage."""
    cfg = load_config(config_path, overrides or [])
    with config_run(cfg):  # one run per output folder; recovers a killed run's leftovers
        return _pipeline(cfg, config_path, overrides)


def _pipeline(cfg: MedsynthConfig, config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    cfg_json = cfg.model_dump(mode="json")
    parent = start_pipeline(cfg)
    out: dict[str, Any] = {"mlflow_parent_run": parent}
    try:
        pre = preprocess_flow.with_options(task_runner=task_runner(cfg))
        out["preprocess"] = pre(config_path, overrides or [], parent_run_id=parent)
        out["train"] = train_flow(cfg_json, parent)
        out["synthesize"] = synthesize_flow(cfg_json, parent_run_id=parent)
        out["validate"] = validate_flow(cfg_json, parent)
        out["experiment"] = run_experiment_flow(cfg_json, parent)
        out["report"] = report_flow(cfg_json, parent)
    except BaseException:
        finish_pipeline(cfg, parent, "FAILED")
        raise
    summary = write_json_atomic(Path(cfg.output_dir) / cfg.name / "pipeline_summary.json", out)
    finish_pipeline(cfg, parent, "FINISHED", summary)
    return out
