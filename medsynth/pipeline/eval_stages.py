"""The evaluation stages: validation, the downstream experiment and the pipeline's report."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medsynth.config.schema import MedsynthConfig
from medsynth.pipeline.declare import StageResult, StageRun
from medsynth.pipeline.sampling_stages import resolved_sampling

log = logging.getLogger(__name__)


def run_validate(run: StageRun) -> StageResult:
    """Plausibility, visibility, realism, diversity and memorisation of images from test masks."""
    from medsynth.evaluation.validate import REPORT_JSON, run_validation
    from medsynth.evaluation.validation_report import flat_metrics
    from medsynth.generator import load_generator

    cfg = resolved_sampling(run)
    gen = load_generator(cfg, run.path("autoencoder"), run.path("unet"), run.path("controlnet"), run.torch_device())
    features_run = None if cfg.validation.feature_weights else run.path("features")
    rep = run_validation(
        cfg, gen, run.path("preprocess"), run.path("segmenter"), features_run, run.out, run.tracker, run.progress
    )
    metrics = flat_metrics(rep)
    return StageResult(
        metrics=metrics,
        outputs={"report": str(run.out / REPORT_JSON)},
        headline=_validation_headline(cfg, metrics),
    )


def _validation_headline(cfg: MedsynthConfig, metrics: dict[str, float]) -> dict[str, float]:
    from medsynth.data.preprocess import output_labels
    from medsynth.evaluation.validate import lesion_label

    out = {
        k: v
        for k, v in metrics.items()
        if k in ("val/fid_in_domain", "val/kid_in_domain", "val/memorised_fraction", "val/diversity")
    }
    try:
        lesion = lesion_label(cfg)
    except Exception:
        lesion = None
    if lesion is not None:
        name = output_labels(cfg).get(lesion, str(lesion))
        for suffix in ("ratio", "contrast_ratio"):
            k = f"val/{name}_{suffix}"
            if k in metrics:
                out[k] = metrics[k]
    return out


def run_experiment(run: StageRun) -> StageResult:
    """The downstream augmentation grid: synthetic pool from training masks, then every cell.

    Cells already recorded under the same grid key are not retrained; the pool resumes per batch.
    """
    from medsynth.data.dataset import load_split
    from medsynth.errors import DataError
    from medsynth.evaluation.experiment import grid_cells, make_pool, run_grid
    from medsynth.generator import load_generator
    from medsynth.progress import LogProgress

    cfg = resolved_sampling(run)
    pre = run.path("preprocess")
    dev = run.torch_device()
    train = load_split(pre, "train")
    test = load_split(pre, "test")
    try:
        val = load_split(pre, "val")
    except DataError:
        val = None
    pool = None
    if any(c.ratio > 0 for c in grid_cells(cfg)):
        gen = load_generator(cfg, run.path("autoencoder"), run.path("unet"), run.path("controlnet"), dev)
        pool_progress = LogProgress(len(train) * cfg.experiment.pool_per_mask, "synthetic pool")
        pool = make_pool(gen, train, cfg, run.out / "pool", pool_progress)
    external = None
    if cfg.experiment.external_test:
        from medsynth.evaluation.external import load_external_test

        external = load_external_test(cfg, cfg.experiment.external_test)

    def cell_map(work: Any, cells: list[Any], on_done: Any) -> None:
        for rec in run.fan_out(work, cells):
            on_done(rec)

    grid_progress = LogProgress(len(grid_cells(cfg)), "experiment grid (cells)", every_s=30.0)
    res = run_grid(cfg, train, val, test, pool, run.out, run.child_runs, grid_progress, dev, cell_map, external)
    headline: dict[str, float] = {}
    for row in res.summary:
        if row.delta_vs_real is not None and not (row.arm == "real" and row.ratio == 0):  # vs real only
            pct = round(row.fraction * 100)
            headline[f"exp/delta_{row.task}_{row.metric}_{row.arm}_r{row.ratio}_f{pct}"] = float(row.delta_vs_real)
    growth = {f"exp/real_only_grows_{t}": float(g.grows) for t, g in res.growth.items() if g.grows is not None}
    return StageResult(
        metrics={"exp/n_cells": len(res.cells), "exp/n_trained": len(res.trained), **growth, **headline},
        outputs={
            "summary_md": str(res.summary_md),
            "summary_csv": str(res.summary_csv),
            "plot": str(res.plot),
            "cells": str(res.cells_path),
        },
        artifacts={"experiment": [str(res.summary_md), str(res.summary_csv), str(res.plot)]},
        headline={**headline, **growth},
    )


class AnalysisResult(StageResult):
    """Result of the analysis stage: coverage of the real test items by synthetic ones and flagged subgroups.

    Attributes:
        coverage: Fraction of real test items whose nearest neighbour among real train + synthetic items is
            synthetic and within the real-real radius (None: n/a).
        recall: Fraction of real test items with a synthetic item within the radius (None: n/a).
        precision: Fraction of synthetic items within the radius of a real test item (None: n/a).
        flagged: Subgroups flagged by the bias report (``"plausibility site=CS: Dice ratio < 0.95"``).
    """

    coverage: float | None = None
    recall: float | None = None
    precision: float | None = None
    flagged: list[str] = Field(default_factory=list)


def run_analysis(run: StageRun) -> AnalysisResult:
    """Latent map (UMAP + coverage) of real and synthetic items and the bias report per site / lesion size."""
    from medsynth.evaluation.analysis import BIAS_CSV, MAP_CSV, MAP_PNG, REPORT_JSON
    from medsynth.evaluation.analysis import run_analysis as analyse
    from medsynth.evaluation.analysis_summary import flat_metrics
    from medsynth.generator import load_generator

    cfg = resolved_sampling(run)
    gen = load_generator(cfg, run.path("autoencoder"), run.path("unet"), run.path("controlnet"), run.torch_device())
    features_run = None if cfg.validation.feature_weights else run.path("features")
    rep = analyse(
        cfg,
        gen,
        run.path("preprocess"),
        run.path("segmenter"),
        features_run,
        run.path("experiment"),
        run.out,
        run.tracker,
        run.progress,
        run.path("validate"),
    )
    metrics = flat_metrics(rep)
    cov = rep["latent_map"]
    flagged = [
        f"plausibility {r['grouping']}={r['group']}: {'; '.join(r['flags'])}" for r in rep["plausibility"] if r["flags"]
    ]
    flagged += [
        f"downstream {r['task']} {r['arm']} f{r['fraction']:g} r{r['ratio']} {r['grouping']}={r['group']}: "
        + "; ".join(r["flags"])
        for r in rep["downstream"]["rows"]
        if r["flags"]
    ]
    outputs = {"report": str(run.out / REPORT_JSON), "bias": str(run.out / BIAS_CSV), "map": str(run.out / MAP_CSV)}
    if (run.out / MAP_PNG).is_file():
        outputs["map_png"] = str(run.out / MAP_PNG)
    return AnalysisResult(
        metrics=metrics,
        outputs=outputs,
        headline={k: v for k, v in metrics.items() if k in ("analysis/coverage", "analysis/n_flagged_plausibility")},
        coverage=cov.get("coverage"),
        recall=cov.get("recall"),
        precision=cov.get("precision"),
        flagged=flagged,
        message=f"{cov.get('reading', '')} {len(flagged)} subgroup(s) flagged.",
    )


class ReportOptions(BaseModel):
    """Options of the report stage (set by the pipeline)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    pipeline_run_id: str | None = None
    """The pipeline execution (parent run) to report."""


def run_report(run: StageRun) -> StageResult:
    """The report of one pipeline execution, rendered from its tracked runs (same renderer as the whitepaper)."""
    from medsynth.report.whitepaper import build_whitepaper
    from medsynth.tracking.mlflow_store import tracking_uri

    cfg = run.cfg
    opts = run.options if isinstance(run.options, ReportOptions) else ReportOptions()
    if opts.pipeline_run_id is None:
        return StageResult(outputs={})
    name = cfg.tracking.experiment or cfg.name
    md = build_whitepaper(
        tracking_uri(cfg),
        [name],
        run.out,
        None,
        command=f"medsynth run ({cfg.name})",
        run_ids={name: opts.pipeline_run_id},
    )
    n_fig = len(list((run.out / "figures").rglob("*.png")))
    return StageResult(
        outputs={"report": str(md)}, metrics={"report/figures": n_fig}, artifacts={"report": [str(run.out)]}
    )
