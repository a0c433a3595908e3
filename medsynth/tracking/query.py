"""Read-only access to tracked pipeline runs (for reports): plain records, no MLflow objects leak out.

A pipeline execution is a parent run tagged ``medsynth.stage=pipeline`` with one nested run per stage
(``medsynth.stage=<stage>``) and, under the experiment stage, one run per grid cell. This module finds
the latest finished execution of an experiment, returns its runs as :class:`RunRecord` values and
downloads their artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from medsynth.errors import DataError


@dataclass(frozen=True)
class RunRecord:
    """One tracked run.

    Attributes:
        run_id: MLflow run id.
        name: Run name (the stage name for stage runs).
        stage: ``medsynth.stage`` tag (``pipeline``, ``autoencoder``, ..., ``experiment-cell``).
        status: FINISHED, FAILED, KILLED or RUNNING.
        start_ms: Start time (ms since the epoch).
        end_ms: End time (ms since the epoch), None while running.
        params: Logged parameters.
        metrics: Last value of each logged metric.
        tags: Run tags.
    """

    run_id: str
    name: str
    stage: str
    status: str
    start_ms: int
    end_ms: int | None
    params: dict[str, str] = field(repr=False)
    metrics: dict[str, float] = field(repr=False)
    tags: dict[str, str] = field(repr=False)

    @property
    def wall_s(self) -> float | None:
        """Wall time of the run in seconds (None while running)."""
        return None if self.end_ms is None else (self.end_ms - self.start_ms) / 1000.0


@dataclass(frozen=True)
class PipelineRecord:
    """A pipeline execution: its parent run, the stage runs under it, and where the store lives.

    Attributes:
        tracking_uri: The store the records came from.
        experiment: Experiment name (= config name unless overridden).
        experiment_id: MLflow experiment id.
        parent: The pipeline's parent run.
        stages: Stage name -> the run that computed that stage's current outputs (see :func:`_stage_runs`).
        cells: Runs of the experiment grid's cells (nested under the experiment stage run).
        models: Registered model versions created by the stage runs: ``models:/<name>/<version>``.
        stage_only: True when the stages were run one at a time (``medsynth <stage> -c ...``) and no pipeline run
            exists: ``parent`` is then the latest of those stage runs and ``stages`` the latest finished run of
            each stage.
    """

    tracking_uri: str
    experiment: str
    experiment_id: str
    parent: RunRecord
    stages: dict[str, RunRecord]
    cells: list[RunRecord]
    models: list[str]
    stage_only: bool = False


def _record(run: Run) -> RunRecord:
    tags = dict(run.data.tags)
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        stage=tags.get("medsynth.stage", ""),
        status=run.info.status,
        start_ms=int(run.info.start_time or 0),
        end_ms=int(run.info.end_time) if run.info.end_time else None,
        params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        tags=tags,
    )


def _children(client: MlflowClient, experiment_id: str, parent_id: str) -> list[Run]:
    runs: list[Run] = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000
    )
    return runs


def _stage_runs(client: MlflowClient, experiment_id: str, parent: Run) -> dict[str, RunRecord]:
    """Per stage, the run that computed the stage's current outputs.

    A cached re-run logs a stage run tagged ``medsynth.cached=true`` that links the run that computed
    the outputs (``medsynth.computed_by``); the stage's pictures and curves live there. Stores written
    before that link fall back to the latest FINISHED run that did the work (started before the
    pipeline ended), else the pipeline's own stage run.
    """
    end = parent.info.end_time or 2**62
    runs = [
        _record(r)
        for r in client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000)
    ]
    by_id = {r.run_id: r for r in runs}
    own = {
        r.stage or r.name: r
        for r in sorted(runs, key=lambda r: r.start_ms)
        if r.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    out: dict[str, RunRecord] = {}
    for stage, mine in own.items():
        link = mine.tags.get("medsynth.computed_by")
        if link and link in by_id:  # the run that computed this stage's outputs
            out[stage] = by_id[link]
            continue
        # stores written before the computed_by link: the latest run that did the work
        done = [
            r
            for r in runs
            if (r.stage or r.name) == stage and r.tags.get("medsynth.cached") != "true" and r.start_ms <= end
        ]
        out[stage] = max(done, key=lambda r: r.start_ms) if done else mine
    return out


def load_pipeline(tracking_uri: str, experiment: str, run_id: str | None = None) -> PipelineRecord:
    """The latest FINISHED pipeline execution of ``experiment`` (or the given parent run).

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///...`` or ``http://...``).
        experiment: Experiment name.
        run_id: A specific parent run; None picks the most recent finished pipeline run.

    Raises:
        DataError: The experiment or a finished pipeline run does not exist.
    """
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise DataError(
            tracking_uri,
            f"no MLflow experiment named {experiment!r}",
            hint="run the pipeline first (medsynth run <config>) or pass --tracking-uri",
        )
    if run_id is None:
        found = client.search_runs(
            [exp.experiment_id],
            filter_string="tags.`medsynth.stage` = 'pipeline' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            solo = _solo_stage_runs(client, exp.experiment_id)
            if not solo:
                raise DataError(
                    tracking_uri,
                    f"experiment {experiment!r} has no finished pipeline run and no finished stage run",
                    hint="let `medsynth run <config>` finish (a re-run after an interruption completes it)",
                )
            latest = max(solo.values(), key=lambda r: r.start_ms)
            return _assemble(client, tracking_uri, experiment, exp.experiment_id, latest, solo, stage_only=True)
        parent = found[0]
    else:
        parent = client.get_run(run_id)
    stages = _stage_runs(client, exp.experiment_id, parent)
    return _assemble(client, tracking_uri, experiment, exp.experiment_id, _record(parent), stages)


def _assemble(
    client: MlflowClient,
    tracking_uri: str,
    experiment: str,
    experiment_id: str,
    parent: RunRecord,
    stages: dict[str, RunRecord],
    stage_only: bool = False,
) -> PipelineRecord:
    """A :class:`PipelineRecord` with the grid's cell runs and the registered model versions of ``stages``."""
    cells: list[RunRecord] = []
    if "experiment" in stages:
        cells = [_record(r) for r in _children(client, experiment_id, stages["experiment"].run_id)]
        cells.sort(key=lambda r: r.name)
    models: list[str] = []
    run_ids = {r.run_id for r in stages.values()}
    for mv in client.search_model_versions(max_results=1000):
        if mv.run_id in run_ids:
            models.append(f"models:/{mv.name}/{mv.version}")
    return PipelineRecord(tracking_uri, experiment, experiment_id, parent, stages, cells, sorted(models), stage_only)


def _solo_stage_runs(client: MlflowClient, experiment_id: str) -> dict[str, RunRecord]:
    """Per stage, the latest finished top-level stage run (stages run one at a time, outside a pipeline).

    A cached stage run points at the run that computed its outputs (``medsynth.computed_by``), which is taken
    instead when it is in the store.
    """
    runs = [
        _record(r)
        for r in client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000)
    ]
    by_id = {r.run_id: r for r in runs}
    out: dict[str, RunRecord] = {}
    for r in sorted(runs, key=lambda r: r.start_ms):  # later runs of a stage replace earlier ones
        if not r.stage or r.stage in ("pipeline", "experiment-cell") or r.tags.get("mlflow.parentRunId"):
            continue
        link = r.tags.get("medsynth.computed_by")
        out[r.stage] = by_id[link] if link and link in by_id else r
    return out


def list_artifacts(tracking_uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Artifact paths (files, recursively) of a run under ``path``."""
    client = MlflowClient(tracking_uri)
    out: list[str] = []
    pending = [path]
    while pending:
        for info in client.list_artifacts(run_id, pending.pop()):
            if info.is_dir:
                pending.append(info.path)
            else:
                out.append(info.path)
    return sorted(out)


def download_artifact(tracking_uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    """Download one artifact (file or folder) of a run into ``dst``; returns the local path."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=tracking_uri
    )
    return Path(local)
