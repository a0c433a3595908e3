"""MLflow tracking: the only module that imports mlflow.

One experiment per config, one parent run per pipeline execution, a nested run per stage. Runs
record the flattened resolved config as params, metrics with steps, the resolved config file,
pictures and tables as artifacts, datasets as inputs (with their digest), and trained networks as
registered model versions whose files are safetensors + JSON (no pickled code).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
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
from medsynth.errors import ConfigError
from medsynth.provenance import provenance_tags

log = logging.getLogger(__name__)
MAX_PARAM = 6000
OUTPUT_TAG = "medsynth.output_root"


def output_root_tag(cfg: MedsynthConfig) -> str:
    """``<host>:<absolute output folder>`` of a config's runs: which runs a killed execution on this host left."""
    import socket

    return f"{socket.gethostname()}:{(Path(cfg.output_dir) / cfg.name).resolve()}"


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
        # no mlflow.set_tracking_uri: it also sets MLFLOW_TRACKING_URI for the whole process, so a later
        # config without a tracking URI would silently write to this one's store
        self.client = MlflowClient(self.uri)
        name = cfg.tracking.experiment or cfg.name
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = (
            exp.experiment_id if exp else self.client.create_experiment(name, artifact_location=artifact_location(cfg))
        )

    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> MlflowTracker:
        """Create a run (nested under ``parent_id`` when given)."""
        all_tags = {
            "medsynth.config": self.cfg.name,
            OUTPUT_TAG: output_root_tag(self.cfg),
            **provenance_tags(config_dict(self.cfg)),
            **(tags or {}),
        }
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

    def log_resolved_config(self, tracker: MlflowTracker) -> None:
        """Attach the resolved config file (YAML) to a run, under ``config/``."""
        path = save_resolved(self.cfg, Path(self.cfg.output_dir) / self.cfg.name)
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

        The ``generator`` bundle and the ``segmenter`` checkpoint are logged as MLflow pyfunc models
        (:mod:`medsynth.tracking.pyfunc`: ``mlflow.pyfunc.load_model(uri).predict(...)``); the other
        networks as plain checkpoint folders.

        Returns:
            ``models:/<name>/<version>``, or None when registration is off.
        """
        from medsynth.tracking.pyfunc import PYFUNC_KINDS, save_pyfunc  # mlflow.pyfunc: only when registering

        if network in PYFUNC_KINDS:
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = save_pyfunc(network, self.cfg, folder, Path(tmp) / network)
                tracker.log_artifact(model_dir, f"models/{network}")
        else:
            tracker.log_artifact(folder, f"models/{network}")
        if not self.cfg.tracking.register_models:
            return None
        name = registered_name(self.cfg, network)
        try:
            self.client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            self.client.create_registered_model(name, description=f"medsynth {network} trained from {self.cfg.name}")
        run = self.client.get_run(tracker.run_id)
        mv = self.client.create_model_version(
            name, source=f"{run.info.artifact_uri}/models/{network}", run_id=tracker.run_id
        )
        return f"models:/{name}/{mv.version}"


def registered_name(cfg: MedsynthConfig, network: str) -> str:
    """Registry name of a config's network: ``<model_prefix>-<config name>-<network>``."""
    return f"{cfg.tracking.model_prefix}-{cfg.name}-{network}"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` -> (name, version, None); ``models:/<name>@<alias>`` -> (name, None, alias).

    Raises:
        ConfigError: Any other form.
    """
    body = uri.removeprefix("models:/")
    if uri.startswith("models:/") and "@" in body and "/" not in body:
        name, alias = body.split("@", 1)
        if name and alias:
            return name, None, alias
    elif uri.startswith("models:/") and "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise ConfigError("command line", f"{uri}: expected models:/<name>/<version> or models:/<name>@<alias>")


def resolve_version(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(name, version) of a ``models:/`` URI; an alias is looked up in the registry.

    Raises:
        ConfigError: Malformed URI, or an unknown model, version or alias (named in the message).
    """
    name, version, alias = parse_model_uri(uri)
    try:
        if alias is not None:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError("command line", f"{uri}: not in the registry ({exc.message})") from None
    return name, str(version)


def download_model(uri: str, dst: str | Path, tracking: str | None = None) -> Path:
    """Download a registered model version (``models:/<name>/<version>`` or ``models:/<name>@<alias>``).

    Returns:
        The medsynth bundle inside it (``config.json`` + safetensors checkpoints): ``artifacts/bundle`` of a
        pyfunc model, or the folder itself for versions registered as plain folders.
    """
    from medsynth.tracking.pyfunc import bundle_in

    client = MlflowClient(tracking) if tracking else MlflowClient()
    name, version = resolve_version(client, uri)
    source = client.get_model_version_download_uri(name, version)
    out = Path(dst)
    if out.exists():  # an alias may have moved since the last download: never mix versions
        shutil.rmtree(out)
    out.mkdir(parents=True)
    path = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(out), tracking_uri=tracking)
    return bundle_in(path)


def model_versions(tracking: str, name: str) -> list[str]:
    """Versions of a registered model, newest first."""
    client = MlflowClient(tracking)
    return [
        str(v.version) for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version))
    ]


def set_model_alias(tracking: str, name: str, version: str, alias: str, tags: dict[str, str]) -> None:
    """Point ``models:/<name>@<alias>`` at ``version`` and tag that version."""
    client = MlflowClient(tracking)
    client.set_registered_model_alias(name, alias, version)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def mark_interrupted_runs(cfg: MedsynthConfig) -> int:
    """Mark the config's runs still RUNNING (tagged with its output folder) as KILLED; returns how many.

    Call it only while holding the config's output lock (:func:`medsynth.locking.config_run`): no live
    process can then own such a run.
    """
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:  # the default local store: nothing to mark (and nothing created) when it does not exist
        db = (Path(cfg.output_dir) / "mlflow.db").resolve()
        if not db.is_file():
            return 0
        uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment or cfg.name)
    if exp is None:
        return 0
    root = output_root_tag(cfg)
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    runs = [r for r in running if r.data.tags.get(OUTPUT_TAG) == root]
    for run in runs:
        client.set_tag(run.info.run_id, "medsynth.interrupted", "marked KILLED at the next start of this config")
        client.set_terminated(run.info.run_id, "KILLED")
    return len(runs)


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
