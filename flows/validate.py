"""Prefect flow for validation: reference segmenter + feature encoder (real data) → validation report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_from_json, numeric, publish_summary
from flows.train import transient
from medsynth import stages
from medsynth.tracking.stage import tracked_stage


@task(name="train-segmenter", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def segmenter_task(cfg_json: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Train the reference segmenter on the real training split (skipped when up to date)."""
    cfg = config_from_json(cfg_json)
    with tracked_stage(cfg, "segmenter", parent_run_id, section="segmenter") as st:
        out = stages.run_segmenter(cfg, tracker=st.tracker)
        st.tracker.log_metrics(numeric(out))
        out["model_uri"] = None if out.get("cached") else st.register("segmenter", out["checkpoint"])
        publish_summary(cfg, "segmenter", out, st)
    return out


@task(name="train-feature-encoder", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def features_task(cfg_json: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Train the in-domain feature encoder (skipped when up to date or user weights are given)."""
    cfg = config_from_json(cfg_json)
    with tracked_stage(cfg, "features", parent_run_id) as st:
        out = stages.run_features(cfg, tracker=st.tracker)
        st.tracker.log_metrics(numeric(out))
        publish_summary(cfg, "features", out, st)
    return out


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(cfg_json: dict[str, Any], upstream: list[Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Generate from test masks and write the validation report."""
    cfg = config_from_json(cfg_json)
    with tracked_stage(cfg, "validate", parent_run_id, section="validation") as st:
        out = stages.run_validate(cfg, tracker=st.tracker)
        if out.get("cached"):
            st.tracker.log_artifact(Path(out["report"]), "validation")
        st.tracker.log_metrics(numeric(out))
        publish_summary(cfg, "validate", out, st)
    return out


@flow(name="validate")
def validate_flow(cfg_json: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Train the real-data references, then validate the generator's images from test masks."""
    seg = segmenter_task(cfg_json, parent_run_id)
    feats = features_task(cfg_json, parent_run_id)
    rep = validate_task(cfg_json, [seg, feats], parent_run_id)
    return {"segmenter": seg, "features": feats, "validate": rep}
