"""Tracking of pipeline stages: a parent run per pipeline, a nested run per stage (ids, not objects)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsynth.config.schema import MedsynthConfig
from medsynth.tracking.base import NullTracker, Tracker


@dataclass
class StageTracking:
    """What a stage gets: a tracker (no-op when tracking is off) and, when on, its run id and session."""

    tracker: Tracker = field(default_factory=NullTracker)
    run_id: str | None = None
    session: Any = None

    def register(self, network: str, folder: str | Path) -> str | None:
        """Log a checkpoint folder and register it as a model version (``models:/...``) when tracking."""
        if self.session is None:
            return None
        out: str | None = self.session.register(self.tracker, network, folder)
        return out

    def log_dataset(self, name: str, source: str, digest: str, context: str) -> None:
        """Record a dataset input of the stage run (no-op when tracking is off)."""
        if self.session is not None:
            self.session.log_dataset(self.tracker, name, source, digest, context)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag the stage run (no-op when tracking is off)."""
        if self.session is not None:
            self.tracker.set_tags(tags)  # type: ignore[attr-defined]

    def mirror_metrics(self, run_id: str | None, fallback: dict[str, float], step: int | None = None) -> None:
        """Show the metrics of the run that computed a cached stage (its latest values) on this run.

        Falls back to ``fallback`` (the stage's stored result) when that run is not in this store.
        """
        if self.session is None:
            return
        metrics = dict(fallback)
        if run_id:
            # another store, or a deleted run: the stored result stands
            with contextlib.suppress(Exception):
                metrics = {**metrics, **self.session.client.get_run(run_id).data.metrics}
        self.tracker.log_metrics(metrics, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params on the stage run (no-op when tracking is off)."""
        self.tracker.log_params(params)

    def run_link(self) -> str:
        """A human-readable pointer to the run (a UI URL for an HTTP server, else the run id)."""
        if self.session is None or self.run_id is None:
            return "(tracking off)"
        uri = str(self.session.uri)
        if uri.startswith("http"):
            return f"{uri.rstrip('/')}/#/experiments/{self.session.experiment_id}/runs/{self.run_id}"
        return f"MLflow run {self.run_id} in {uri}"


def environment_tags() -> dict[str, str]:
    """Where a run executes: platform, CPU count, torch version and threads, accelerator (``medsynth.env.*``)."""
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "medsynth.env.platform": platform.platform(),
        "medsynth.env.python": platform.python_version(),
        "medsynth.env.cpus": str(os.cpu_count()),
        "medsynth.env.torch": torch.__version__,
        "medsynth.env.torch_threads": str(torch.get_num_threads()),
        "medsynth.env.device": device,
    }


def start_pipeline(cfg: MedsynthConfig, name: str | None = None) -> str | None:
    """Create the parent run of one pipeline execution and log the whole resolved config; None if off."""
    if not cfg.tracking.enabled:
        return None
    from medsynth.tracking.mlflow_store import MlflowSession

    session = MlflowSession(cfg)
    tracker = session.start_run(
        name or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}", tags={"medsynth.stage": "pipeline", **environment_tags()}
    )
    session.log_config(tracker)
    return tracker.run_id


def finish_pipeline(
    cfg: MedsynthConfig, run_id: str | None, status: str = "FINISHED", summary_file: str | Path | None = None
) -> None:
    """Close the parent run (attaching a summary file if given)."""
    if run_id is None:
        return
    from medsynth.tracking.mlflow_store import MlflowSession, MlflowTracker

    session = MlflowSession(cfg)
    tracker = MlflowTracker(session.client, run_id)
    if summary_file is not None:
        tracker.log_artifact(summary_file, "summary")
    session.end_run(tracker, status)


@contextmanager
def tracked_stage(
    cfg: MedsynthConfig, stage: str, parent_run_id: str | None, params: dict[str, Any] | None = None
) -> Iterator[StageTracking]:
    """An MLflow run for ``stage`` (nested under the pipeline run when ``parent_run_id`` is given).

    Logs ``params`` (the stage's own config sections, flattened) and the provenance tags. Yields a
    no-op :class:`StageTracking` when tracking is off. The run is marked FAILED when the block raises.
    """
    if not cfg.tracking.enabled:
        yield StageTracking()
        return
    from medsynth.tracking.mlflow_store import MlflowSession, stage_run

    session = MlflowSession(cfg)
    with stage_run(session, stage, parent_run_id) as tracker:
        assert tracker is not None
        if params:
            tracker.log_params(params)
        session.log_resolved_config(tracker)
        if parent_run_id is None:
            tracker.set_tags(environment_tags())
        yield StageTracking(tracker, tracker.run_id, session)


class ChildRunFactory:
    """A picklable factory of tracked child runs (one per grid cell) under a stage run.

    It holds only the config and a run id, so it travels to Dask worker processes, which open their
    own connection to the tracking store.
    """

    def __init__(self, cfg: MedsynthConfig, stage_run_id: str | None, stage: str = "experiment-cell") -> None:
        self.cfg_json = cfg.model_dump(mode="json")
        self.stage_run_id, self.stage = stage_run_id, stage

    @contextmanager
    def __call__(self, name: str, params: dict[str, Any]) -> Iterator[Tracker]:
        """Open the child run (a no-op tracker when tracking is off or there is no stage run)."""
        from medsynth.config.loader import validate_config

        cfg = validate_config(self.cfg_json, "child run", MedsynthConfig)
        if self.stage_run_id is None or not cfg.tracking.enabled:
            yield NullTracker()
            return
        from medsynth.tracking.mlflow_store import MlflowSession, stage_run

        with stage_run(MlflowSession(cfg), name, self.stage_run_id) as tracker:
            assert tracker is not None
            tracker.set_tags({"medsynth.stage": self.stage, **{f"cell.{k}": str(v) for k, v in params.items()}})
            yield tracker


def log_headline(cfg: MedsynthConfig, run_id: str | None, metrics: dict[str, float]) -> None:
    """Log the pipeline's headline numbers on its parent run (compare pipelines in the runs table)."""
    if run_id is None or not metrics:
        return
    from medsynth.tracking.mlflow_store import MlflowSession, MlflowTracker

    MlflowTracker(MlflowSession(cfg).client, run_id).log_metrics(metrics)
