"""Prefect flow for data preparation: phantom (if configured) → QC check → preprocessing.

Thin over the library: each task calls one function of ``medsynth.data``. Per-case work fans out
over chunks of cases through the flow's task runner; the content-hash cache of
:mod:`medsynth.data.preprocess` makes re-runs do no work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import config_from_json, numeric, publish_summary
from medsynth.config.loader import load_config
from medsynth.data import preprocess as pp
from medsynth.data.qc_report import OVERLAYS, REPORT_JSON, REPORT_MD, enforce_policy, run_check
from medsynth.data.sources import ensure_dataset
from medsynth.tracking.stage import tracked_stage


@task(name="ensure-dataset", cache_policy=NO_CACHE)
def ensure_dataset_task(cfg_json: dict[str, Any]) -> str:
    """Generate the phantom dataset if the config asks for it and it is missing."""
    return str(ensure_dataset(config_from_json(cfg_json)))


@task(name="check", cache_policy=NO_CACHE)
def check_task(cfg_json: dict[str, Any], out_dir: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run the QC checks and write the report; fails on bad cases when the policy is 'fail'."""
    cfg = config_from_json(cfg_json)
    with tracked_stage(cfg, "check", parent_run_id, section="qc") as st:
        report = run_check(cfg, out_dir)
        summary = {"report": str(Path(out_dir) / REPORT_MD), "n_cases": report.n_cases, "n_bad": report.n_bad}
        st.tracker.log_metrics(numeric(summary))
        for name in (REPORT_JSON, REPORT_MD, OVERLAYS):
            st.tracker.log_artifact(Path(out_dir) / name, "qc")
        publish_summary(cfg, "check", summary, st)
        enforce_policy(report)
    return summary


@task(name="preprocess-cases", cache_policy=NO_CACHE)
def process_chunk_task(cfg_json: dict[str, Any], work: list[pp.CaseWork], staging: str) -> list[pp.CaseResult]:
    """Preprocess a chunk of cases into the staging folder."""
    cfg = config_from_json(cfg_json)
    return [pp.process_case(w, cfg, Path(staging)) for w in work]


@flow(name="preprocess", task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def preprocess_flow(
    config_path: str,
    overrides: list[str] | None = None,
    chunk_size: int = 64,
    run_check_stage: bool = True,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Check and preprocess the dataset of a config.

    Args:
        config_path: YAML config.
        overrides: Dotted ``key=value`` overrides.
        chunk_size: Cases per fanned-out task.
        run_check_stage: Write the full QC report (with overlays) before preprocessing.
        parent_run_id: MLflow parent run (the pipeline's) to nest the stage runs under.

    Returns:
        Summary: cache folder, manifest path, counts.
    """
    log = get_run_logger()
    cfg = load_config(config_path, overrides or [])
    cfg_json = cfg.model_dump(mode="json")
    ensure_dataset_task(cfg_json)
    base = Path(cfg.output_dir) / cfg.name
    qc = check_task(cfg_json, str(base / "qc"), parent_run_id) if run_check_stage else None
    with tracked_stage(cfg, "preprocess", parent_run_id, section="preprocess") as st:
        plan = pp.plan(cfg)
        todo = plan.todo
        log.info("%s; %d cases, %d to process", plan.discovery_message, len(plan.work), len(todo))
        staging = pp.staging_dir(plan.cache_dir)
        chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
        planned_json = plan.cfg.model_dump(mode="json")  # labels resolved from the data (issue 13)
        futures = [process_chunk_task.submit(planned_json, c, str(staging)) for c in chunks]
        results = [r for f in futures for r in f.result()]
        s = pp.commit(plan, results, staging)
        manifest = pp.load_manifest(s.cache_dir)
        summary = {
            "cache_dir": str(s.cache_dir),
            "manifest": str(s.manifest),
            "n_cases": s.n_cases,
            "n_items": s.n_items,
            "n_processed": s.n_processed,
            "n_cached": s.n_cached,
            "n_excluded": len(s.excluded),
        }
        st.tracker.log_metrics(numeric(summary))
        st.tracker.log_artifact(s.cache_dir / "splits.json", "preprocess")
        st.log_dataset(cfg.name, str(Path(cfg.data.root).resolve()), manifest["dataset"]["digest"], "training")
        publish_summary(cfg, "preprocess", summary, st)
    log.info(
        "%d items (%d processed, %d cached, %d excluded) in %s",
        s.n_items,
        s.n_processed,
        s.n_cached,
        len(s.excluded),
        s.cache_dir,
    )
    return {**summary, "qc": qc}
