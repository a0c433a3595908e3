"""Helpers shared by the Prefect flows: config from task parameters, stage summaries (thin; no science)."""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig


def config_from_json(cfg_json: dict[str, Any]) -> MedsynthConfig:
    """Rebuild the frozen config from the JSON dict passed between tasks."""
    return validate_config(cfg_json, "flow parameter", MedsynthConfig)


def publish_summary(cfg: MedsynthConfig, stage: str, summary: dict[str, Any]) -> None:
    """A Prefect markdown artifact summarising a stage run (cached or not, its metrics, its MLflow run)."""
    result = summary.get("result") or {}
    rows = [("cached", summary.get("cached")), ("MLflow run", summary.get("run_id") or "(tracking off)")]
    rows += [("computed by", summary.get("computed_by")), ("model", summary.get("model_uri"))]
    rows += [(k, f"{v:.4g}") for k, v in (result.get("metrics") or {}).items()]
    rows += list((result.get("outputs") or {}).items())
    body = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    md = f"## {stage} ({cfg.name})\n\n| field | value |\n|---|---|\n{body}\n"
    key = re.sub(r"[^a-z0-9-]+", "-", f"{cfg.name}-{stage}".lower()).strip("-")
    create_markdown_artifact(markdown=md, key=key, description=f"medsynth {stage} summary")


def task_runner(cfg: MedsynthConfig) -> Any:
    """The Prefect task runner the config asks for (threads, or Dask through prefect-dask)."""
    oc = cfg.orchestration
    if oc.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if oc.dask_address:
            return DaskTaskRunner(address=oc.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": oc.max_workers,
                "threads_per_worker": oc.threads_per_worker,
                "processes": True,
                "dashboard_address": None,
            }
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=oc.max_workers)
