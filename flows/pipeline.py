"""The full pipeline flow: data preparation → generative training (→ synthesis, validation, ...).

Stages pass paths and summaries, never arrays. Later stages are added here as subflows.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.preprocess import preprocess_flow
from flows.synthesize import synthesize_flow
from flows.train import train_flow
from medsynth.config.loader import load_config


@flow(name="medsynth-pipeline")
def pipeline_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every stage of the pipeline for a config; returns a summary per stage."""
    cfg = load_config(config_path, overrides or [])
    out: dict[str, Any] = {"preprocess": preprocess_flow(config_path, overrides or [])}
    cfg_json = cfg.model_dump(mode="json")
    out["train"] = train_flow(cfg_json)
    out["synthesize"] = synthesize_flow(cfg_json)
    return out
