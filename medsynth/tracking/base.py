"""The tracker interface library functions report to (no-op by default; MLflow in ``tracking.mlflow``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """What training loops and stages call to record an experiment."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record parameters (flat dict)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record metric values at a step."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach a file (picture, table, report) to the current run."""


class NullTracker:
    """A tracker that records nothing (the default of every library function)."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Ignore parameters."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Ignore metrics."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Ignore artifacts."""
