"""MLflow tracking: the only module that imports mlflow.

One experiment per config, one parent run per pipeline execution, a nested run per stage. Runs
record the flattened resolved config as params, metrics with steps, the resolved config file,
pictures and tables as artifacts, datasets as inputs (with their digest), and trained networks as
registered model versions whose files are safetensors + JSON (no pickled code).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from medsynth.config.loader import config_dict, flatten, save_resolved
from medsynth.config.schema import MedsynthConfig

log = logging.getLogger(__name__)
MAX_PARAM = 6000


def tracking_uri(cfg: MedsynthConfig) -> str:
    """The tracking URI: config, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlflow.db``."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = (Path(cfg.output_dir) / "mlflow.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_location(cfg: MedsynthConfig) -> str | None:
    """Artifact root for a local store (beside the database); None lets a server decide."""
    if tracking_uri(cfg).startswith("sqlite:"):
        return (Path(cfg.output_dir) / "mlartifacts").resolve().as_uri()
    return None


class MlflowTracker:
    """A :class:`~medsynth.tracking.base.Tracker` writing to one MLflow run (thread-safe: explicit run id)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters (values stringified and truncated to MLflow's limit), in batches."""
        items = [Param(k, str(v)[:MAX_PARAM]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metric values at a step."""
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach a file or folder."""
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)


class MlflowSession:
    """Tracking of one pipeline execution: the experiment, its parent run and the stage runs."""

    def __init__(self, cfg: MedsynthConfig) -> None:
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)  # the fluent artifact helpers resolve against it
        # mlflow also exports it as $MLFLOW_TRACKING_URI, which tracking_uri() reads as the user's choice:
        # left there, the next config run in this process would log into THIS store
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        self.client = MlflowClient(self.uri)
        name = cfg.tracking.experiment or cfg.name
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = (
            exp.experiment_id if exp else self.client.create_experiment(name, artifact_location=artifact_location(cfg))
        )

    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> MlflowTracker:
        """Create a run (nested under ``parent_id`` when given)."""
        all_tags = {"medsynth.config": self.cfg.name, **(tags or {})}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return MlflowTracker(self.client, run.info.run_id)

    def end_run(self, tracker: MlflowTracker, status: str = "FINISHED") -> None:
        """Close a run with a status (FINISHED, FAILED, KILLED)."""
        self.client.set_terminated(tracker.run_id, status)

    def log_config(self, tracker: MlflowTracker, section: str | None = None, tmp_dir: Path | None = None) -> None:
        """Log the flattened resolved config (or one section) as params and the resolved file as an artifact."""
        data = config_dict(self.cfg)
        if section:
            data = {section: data.get(section, {})}
        tracker.log_params(flatten(data))
        folder = tmp_dir or Path(self.cfg.output_dir) / self.cfg.name
        path = save_resolved(self.cfg, folder)
        tracker.log_artifact(path, "config")

    def log_dataset(self, tracker: MlflowTracker, name: str, source: str, digest: str, context: str) -> None:
        """Record a dataset the run read (name, location and content digest) as a run input."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        ds = MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest[:36])
        inp = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(tracker.run_id, datasets=[inp])

    def register(self, tracker: MlflowTracker, network: str, folder: str | Path) -> str | None:
        """Log a checkpoint folder (safetensors + JSON) and register it as a model version.

        Returns:
            ``models:/<name>/<version>``, or None when registration is off.
        """
        tracker.log_artifact(folder, f"models/{network}")
        if not self.cfg.tracking.register_models:
            return None
        name = f"{self.cfg.tracking.model_prefix}-{self.cfg.name}-{network}"
        try:
            self.client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            self.client.create_registered_model(name, description=f"medsynth {network} trained from {self.cfg.name}")
        run = self.client.get_run(tracker.run_id)
        mv = self.client.create_model_version(
            name, source=f"{run.info.artifact_uri}/models/{network}", run_id=tracker.run_id
        )
        return f"models:/{name}/{mv.version}"


def download_model(uri: str, dst: str | Path, tracking: str | None = None) -> Path:
    """Download a registered model version (``models:/<name>/<version>``) into ``dst``."""
    client = MlflowClient(tracking) if tracking else MlflowClient()
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: expected models:/<name>/<version>")
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    source = client.get_model_version_download_uri(name, version)
    path = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst))
    return Path(path)


@contextmanager
def stage_run(session: MlflowSession | None, stage: str, parent_id: str | None) -> Iterator[MlflowTracker | None]:
    """A nested stage run that is marked FAILED if the block raises; yields None when tracking is off."""
    if session is None:
        yield None
        return
    tracker = session.start_run(stage, parent_id, {"medsynth.stage": stage})
    try:
        yield tracker
    except BaseException:
        session.end_run(tracker, "FAILED")
        raise
    session.end_run(tracker)
