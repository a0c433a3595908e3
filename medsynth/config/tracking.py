"""Experiment tracking settings (MLflow)."""

from __future__ import annotations

from pydantic import Field

from medsynth.config.base import StrictModel


class TrackingConfig(StrictModel):
    """Where runs, metrics, artifacts and models are recorded."""

    enabled: bool = Field(True, description="Record the pipeline in MLflow.")
    uri: str | None = Field(
        None,
        description="Tracking URI (e.g. http://mlflow:5000). None: $MLFLOW_TRACKING_URI, else an embedded "
        "SQLite store at <output_dir>/mlflow.db (nothing to start).",
    )
    experiment: str | None = Field(None, description="Experiment name (None: the config's name).")
    register_models: bool = Field(True, description="Register trained networks in the Model Registry.")
    model_prefix: str = Field("medsynth", description="Registered model names are '<prefix>-<config name>-<network>'.")
