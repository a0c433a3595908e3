"""Prefect flow for synthesis: trained generator + masks → augmented dataset with provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_from_json, numeric, publish_summary
from medsynth import stages
from medsynth.tracking.stage import tracked_stage


@task(name="synthesize", cache_policy=NO_CACHE)
def synthesize_task(
    cfg_json: dict[str, Any], out_dir: str | None = None, overwrite: bool = False, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Generate the augmented dataset (skipped when the pipeline's copy is up to date)."""
    cfg = config_from_json(cfg_json)
    with tracked_stage(cfg, "synthesize", parent_run_id, section="synthesis") as st:
        out = stages.run_synthesize(cfg, out_dir, overwrite=overwrite, tracker=st.tracker)
        st.tracker.log_metrics(numeric(out))
        manifest = Path(out["out_dir"]) / "manifest.json"
        st.tracker.log_artifact(manifest, "synthesis")
        if manifest.is_file():
            from medsynth.fileio import sha256_file

            st.log_dataset(
                f"{cfg.name}-synthetic", str(Path(out["out_dir"]).resolve()), sha256_file(manifest), "synthetic"
            )
        publish_summary(cfg, "synthesize", out, st)
    return out


@flow(name="synthesize")
def synthesize_flow(
    cfg_json: dict[str, Any], out_dir: str | None = None, overwrite: bool = False, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Synthesise from the configured masks with the trained generator."""
    return synthesize_task(cfg_json, out_dir, overwrite, parent_run_id)
