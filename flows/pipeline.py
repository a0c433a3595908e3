"""The full pipeline: every declared stage in order (``medsynth.pipeline.stages``), one MLflow parent run.

Stages pass paths, summaries and MLflow run ids, never arrays. The pipeline owns one MLflow parent
run; every stage records a nested run under it, and the parent run carries the headline numbers of
its stages (lesion Dice ratio, realism, memorised fraction, downstream deltas) so the MLflow runs
table compares pipelines side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.stage import run_stage_prefect
from medsynth.config.loader import load_config
from medsynth.config.schema import MedsynthConfig
from medsynth.fileio import write_json_atomic
from medsynth.locking import config_run
from medsynth.pipeline import stage_order, upstream_closure
from medsynth.tracking.stage import finish_pipeline, log_headline, start_pipeline


@flow(name="medsynth-pipeline")
def pipeline_flow(
    config_path: str, overrides: list[str] | None = None, stages: list[str] | None = None
) -> dict[str, Any]:
    """Run the stages of the pipeline for a config (all, or ``stages`` and what they need).

    Returns:
        The MLflow parent run id and each stage's summary (``cached``, ``result``, run ids).
    """
    cfg = load_config(config_path, overrides or [])
    with config_run(cfg):  # one run per output folder; recovers a killed run's leftovers
        return _pipeline(cfg, stages)


def _pipeline(cfg: MedsynthConfig, stages: list[str] | None) -> dict[str, Any]:
    cfg_json = cfg.model_dump(mode="json")
    if stages:
        wanted = {s.name for name in stages for s in upstream_closure(name)}
        order = [s for s in stage_order() if s.name in wanted]
    else:
        order = stage_order(pipeline_only=True)
    parent = start_pipeline(cfg)
    out: dict[str, Any] = {"mlflow_parent_run": parent}
    headline: dict[str, float] = {}
    try:
        for stage in order:
            if stage.name == "report":
                log_headline(cfg, parent, headline)
            options = {"pipeline_run_id": parent} if stage.name == "report" else None
            res = run_stage_prefect(stage.name, cfg_json, parent, options)
            out[stage.name] = res
            headline.update(((res.get("result") or {}).get("headline")) or {})
        log_headline(cfg, parent, headline)
    except BaseException:
        finish_pipeline(cfg, parent, "FAILED")
        raise
    summary = write_json_atomic(Path(cfg.output_dir) / cfg.name / "pipeline_summary.json", out)
    finish_pipeline(cfg, parent, "FINISHED", summary)
    return out
