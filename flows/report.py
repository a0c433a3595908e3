"""Prefect flow for the report stage: the pipeline's own report, rendered from its tracked runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_from_json, publish_summary
from medsynth import stages
from medsynth.tracking.stage import tracked_stage


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg_json: dict[str, Any], parent_run_id: str | None) -> dict[str, Any]:
    """Render ``<output>/<name>/report/whitepaper.md`` from the pipeline's runs and attach it to a stage run."""
    cfg = config_from_json(cfg_json)
    if parent_run_id is None:
        return {"report": None, "reason": "tracking is off: the report is built from tracked runs"}
    with tracked_stage(cfg, "report", parent_run_id) as st:
        out = stages.run_report(cfg, parent_run_id)
        st.tracker.log_artifact(Path(out["report"]).parent, "report")
        publish_summary(cfg, "report", out, st)
    return out


@flow(name="report")
def report_flow(cfg_json: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Build the report of a pipeline execution (its parent run id) from the MLflow store."""
    return report_task(cfg_json, parent_run_id)
