"""Helpers shared by the Prefect flows: config from task parameters, stage summaries (thin; no science)."""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.tracking.stage import StageTracking


def config_from_json(cfg_json: dict[str, Any]) -> MedsynthConfig:
    """Rebuild the frozen config from the JSON dict passed between tasks."""
    return validate_config(cfg_json, "flow parameter", MedsynthConfig)


def publish_summary(cfg: MedsynthConfig, stage: str, summary: dict[str, Any], tracking: StageTracking) -> None:
    """A Prefect markdown artifact summarising a stage and pointing to its MLflow run.

    The stage run is tagged ``medsynth.cached`` (true when the stage was up to date and did no work), so
    reports find the run that computed the stage's outputs.
    """
    if "cached" in summary:
        tracking.set_tags({"medsynth.cached": str(bool(summary["cached"])).lower()})
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items() if not isinstance(v, dict | list))
    md = f"## {stage} ({cfg.name})\n\n| field | value |\n|---|---|\n{rows}\n\nTracking: {tracking.run_link()}\n"
    key = re.sub(r"[^a-z0-9-]+", "-", f"{cfg.name}-{stage}".lower()).strip("-")
    create_markdown_artifact(markdown=md, key=key, description=f"medsynth {stage} summary")


def numeric(summary: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a summary (to log as metrics)."""
    return {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}


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
