"""The full pipeline flow. Stages present so far: data preparation (phantom, check, preprocess).

Later stages (training, synthesis, validation, experiments, report) are added as subflows here.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.preprocess import preprocess_flow


@flow(name="medsynth-pipeline")
def pipeline_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every stage of the pipeline for a config; returns a summary per stage."""
    return {"preprocess": preprocess_flow(config_path, overrides or [])}
