"""Prefect flow for synthesis: trained generator + masks → augmented dataset with provenance."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_from_json
from medsynth import stages


@task(name="synthesize", cache_policy=NO_CACHE)
def synthesize_task(cfg_json: dict[str, Any], out_dir: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Generate the augmented dataset (skipped when the pipeline's copy is up to date)."""
    return stages.run_synthesize(config_from_json(cfg_json), out_dir, overwrite=overwrite)


@flow(name="synthesize")
def synthesize_flow(cfg_json: dict[str, Any], out_dir: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Synthesise from the configured masks with the trained generator."""
    return synthesize_task(cfg_json, out_dir, overwrite)
