"""The data stages: QC check and preprocessing (adapters from a StageRun to ``medsynth.data``)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medsynth.config.schema import MedsynthConfig
from medsynth.pipeline.declare import StageResult, StageRun
from medsynth.pipeline.digests import dataset_ref

log = logging.getLogger(__name__)


def run_check(run: StageRun) -> StageResult:
    """QC report of every image/mask pair (fails the pipeline on bad cases under ``qc.policy=fail``)."""
    from medsynth.data.qc_report import OVERLAYS, REPORT_JSON, REPORT_MD, enforce_policy
    from medsynth.data.qc_report import run_check as qc_check

    report = qc_check(run.cfg, run.out, run.progress)
    result = StageResult(
        metrics={"qc/n_cases": report.n_cases, "qc/n_bad": report.n_bad},
        outputs={"report": str(run.out / REPORT_MD)},
        artifacts={"qc": [str(run.out / n) for n in (REPORT_JSON, REPORT_MD, OVERLAYS)]},
    )
    for folder, paths in result.artifacts.items():  # attach the report before a failing policy stops us
        for p in paths:
            run.tracker.log_artifact(Path(p), folder)
    enforce_policy(report)
    return result.model_copy(update={"artifacts": {}})


def _process_chunk(cfg: MedsynthConfig, staging: str, chunk: list[Any]) -> list[Any]:
    from medsynth.data import preprocess as pp

    return [pp.process_case(w, cfg, Path(staging)) for w in chunk]


class PreprocessOptions(BaseModel):
    """Options of the preprocess stage."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    chunk_size: int = 64
    """Cases per fanned-out task."""


def run_preprocess(run: StageRun) -> StageResult:
    """Preprocess the dataset into the on-disk cache (cases whose inputs are unchanged are reused)."""
    import shutil
    import time

    from medsynth.data import preprocess as pp

    t0 = time.monotonic()
    cfg = run.cfg
    plan = pp.plan(cfg, run.out)
    log.info("%s; %d cases, %d to process", plan.discovery_message, len(plan.work), len(plan.todo))
    chunk = run.options.chunk_size if isinstance(run.options, PreprocessOptions) else 64
    todo = plan.todo
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    staging = pp.staging_dir(plan.cache_dir)
    try:
        results = []
        for part in run.fan_out(functools.partial(_process_chunk, plan.cfg, str(staging)), chunks):
            results.extend(part)
            run.progress.advance(len(part))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    s = pp.commit(plan, results, staging, time.monotonic() - t0)
    manifest = pp.load_manifest(s.cache_dir)
    run_ds = dataset_ref(cfg.name, str(Path(cfg.data.root).resolve()), manifest["dataset"]["digest"], "training")
    log.info(
        "%d items (%d processed, %d cached, %d excluded) in %s",
        s.n_items,
        s.n_processed,
        s.n_cached,
        len(s.excluded),
        s.cache_dir,
    )
    return DatasetResult(
        metrics={
            "n_cases": s.n_cases,
            "n_items": s.n_items,
            "n_processed": s.n_processed,
            "n_cached": s.n_cached,
            "n_excluded": len(s.excluded),
        },
        outputs={"cache_dir": str(s.cache_dir), "manifest": str(s.manifest)},
        artifacts={"preprocess": [str(s.cache_dir / "splits.json")]},
        datasets=[run_ds],
        message=f"{s.n_cases} cases ({s.n_processed} processed, {s.n_cached} cached, {len(s.excluded)} excluded) -> "
        f"{s.n_items} items in {s.cache_dir} [{s.seconds:.1f}s]",
    )


class DatasetResult(StageResult):
    """A stage result that also records dataset inputs (name, source, digest, context) of its run."""

    datasets: list[dict[str, str]] = Field(default_factory=list)
