"""Collect what a report needs from one tracked pipeline execution: numbers, tables and figures.

Everything comes from the MLflow store (the parent run's resolved config, stage runs' metrics and
wall times, the validation report and experiment summary artifacts, sample grids), so a report is
reproducible from the store alone and every number carries the id of the run it came from.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medsynth.tracking.query import PipelineRecord, RunRecord, download_artifact, list_artifacts, load_pipeline

log = logging.getLogger(__name__)


FIGURES = {
    "controlnet": ("samples/controlnet", "controlnet"),
    "validate": ("validation", "validation"),
    "experiment": ("experiment", "experiment"),
    "analysis": ("analysis", "analysis"),
    "counterfactual": ("counterfactual", "counterfactual"),
}
"""Stage -> (artifact folder, local subfolder) whose PNG files a report copies."""


@dataclass
class ExperimentResults:
    """What a report shows of one pipeline execution.

    Attributes:
        record: The tracked runs.
        config: The resolved config of the parent run (nested dict).
        validation: The validation report (``validation_report.json``), None if the stage did not run.
        experiment_rows: Rows of the downstream summary (``summary.csv``), empty if it did not run.
        analysis: The analysis report (``analysis_report.json``: latent map, bias), None if the stage did not run.
        counterfactual: The counterfactual stage's report (``counterfactual.json``), None if it did not run.
        adaptation: The site-adaptation report (``adaptation.json``), None if the stage did not run.
        figures: Name -> local path (relative to the report folder) of each copied figure.
    """

    record: PipelineRecord
    config: dict[str, Any]
    validation: dict[str, Any] | None = None
    experiment_rows: list[dict[str, Any]] = field(default_factory=list)
    analysis: dict[str, Any] | None = None
    counterfactual: dict[str, Any] | None = None
    adaptation: dict[str, Any] | None = None
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Experiment (config) name."""
        return self.record.experiment

    def stage(self, name: str) -> RunRecord | None:
        """The run of a stage, if it was tracked."""
        return self.record.stages.get(name)

    def ordered_stages(self) -> list[RunRecord]:
        """Stage runs in pipeline order (the order the pipeline executed its stages)."""
        return list(self.record.stages.values())

    def cfg(self, dotted: str, default: Any = None) -> Any:
        """A value of the resolved config by dotted key (``autoencoder.train.steps``)."""
        cur: Any = self.config
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur


def _parse_cell(value: str) -> Any:
    if value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value in ("True", "False"):
        return value == "True"
    return value


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _find(uri: str, run: RunRecord, folder: str, filename: str, dst: Path) -> Path | None:
    """Download ``folder/filename`` of a run if it exists (None otherwise)."""
    wanted = f"{folder}/{filename}"
    if wanted not in list_artifacts(uri, run.run_id, folder):
        return None
    return download_artifact(uri, run.run_id, wanted, dst)


def _report(
    uri: str, rec: PipelineRecord, stage: str, folder: str, filename: str, scratch: Path
) -> dict[str, Any] | None:
    """A stage's JSON report artifact, None when the stage was not tracked or logged none."""
    run = rec.stages.get(stage)
    path = _find(uri, run, folder, filename, scratch) if run is not None else None
    return json.loads(path.read_text(encoding="utf-8")) if path else None


def collect(
    tracking_uri: str, experiment: str, out_dir: str | Path, run_id: str | None = None, fig_subdir: str = "figures"
) -> ExperimentResults:
    """Gather the numbers and figures of the latest finished pipeline run of ``experiment``.

    Figures are copied to ``<out_dir>/<fig_subdir>/<experiment>/`` (PNG only); JSON/CSV artifacts are
    read from a scratch folder and not kept.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: Experiment name (the config's name).
        out_dir: Report folder.
        run_id: A specific pipeline (parent) run; None takes the latest finished one.
        fig_subdir: Figure folder inside ``out_dir``.
    """
    rec = load_pipeline(tracking_uri, experiment, run_id)
    out = Path(out_dir)
    scratch = out / ".scratch" / experiment
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        cfg_path = _find(tracking_uri, rec.parent, "config", "config.resolved.yaml", scratch)
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path else {}
        res = ExperimentResults(rec, config)
        val = rec.stages.get("validate")
        if val is not None:
            path = _find(tracking_uri, val, "validation", "validation_report.json", scratch)
            res.validation = json.loads(path.read_text(encoding="utf-8")) if path else None
        exp = rec.stages.get("experiment")
        if exp is not None:
            path = _find(tracking_uri, exp, "experiment", "summary.csv", scratch)
            res.experiment_rows = _read_csv(path) if path else []
        res.analysis = _report(tracking_uri, rec, "analysis", "analysis", "analysis_report.json", scratch)
        res.counterfactual = _report(
            tracking_uri, rec, "counterfactual", "counterfactual", "counterfactual.json", scratch
        )
        res.adaptation = _report(tracking_uri, rec, "adaptation", "adaptation", "adaptation.json", scratch)
        fig_dir = out / fig_subdir / experiment
        shutil.rmtree(fig_dir, ignore_errors=True)
        fig_dir.mkdir(parents=True, exist_ok=True)
        for stage, (folder, sub) in FIGURES.items():
            run = rec.stages.get(stage)
            if run is None:
                continue
            for art in list_artifacts(tracking_uri, run.run_id, folder):
                if not art.lower().endswith(".png"):
                    continue
                local = download_artifact(tracking_uri, run.run_id, art, scratch / sub)
                name = f"{sub}_{Path(art).name}"
                shutil.copyfile(local, fig_dir / name)
                res.figures[f"{sub}/{Path(art).stem}"] = f"{fig_subdir}/{experiment}/{name}"
        log.info("collected %s: %d stage runs, %d figures", experiment, len(rec.stages), len(res.figures))
        return res
    finally:
        shutil.rmtree(out / ".scratch", ignore_errors=True)
