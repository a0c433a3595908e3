"""Tracking of pipeline stages: a parent run per pipeline, a nested run per stage (ids, not objects)."""

from __future__ import annotations

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
    cfg: MedsynthConfig, stage: str, parent_run_id: str | None, section: str | None = None
) -> Iterator[StageTracking]:
    """A nested MLflow run for ``stage`` under the pipeline run, with the config section as params.

    Yields a no-op :class:`StageTracking` when tracking is off or there is no parent run. The run is
    marked FAILED when the block raises.
    """
    if not cfg.tracking.enabled or parent_run_id is None:
        yield StageTracking()
        return
    from medsynth.tracking.mlflow_store import MlflowSession, stage_run

    session = MlflowSession(cfg)
    with stage_run(session, stage, parent_run_id) as tracker:
        assert tracker is not None
        session.log_config(tracker, section=section)
        yield StageTracking(tracker, tracker.run_id, session)
