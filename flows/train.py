"""Prefect flow for the generative stages: autoencoder → latents → diffusion UNet → ControlNet.

Each task wraps one function of :mod:`medsynth.stages`. Caching is by each stage's input key
(config section + content hashes of its inputs), stored *with the stage's outputs*: a stage whose
final checkpoint carries the same key returns at once, and a killed stage resumes from its last
checkpoint with that key. Keeping the key next to the outputs (rather than in Prefect's result
store) means deleted or moved outputs are never reported as cached, and the CLI shares the cache.
Transient failures (e.g. I/O) are retried once; bad input (a ``MedsynthError``) is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_from_json, numeric, publish_summary
from medsynth import stages
from medsynth.errors import MedsynthError
from medsynth.tracking.stage import tracked_stage


def transient(task_: Any, run: Any, state: Any) -> bool:
    """Retry condition: retry anything but medsynth's own input/config errors."""
    try:
        state.result()
    except MedsynthError:
        return False
    except Exception:
        return True
    return False


def _train(
    stage: str,
    network: str,
    section: str,
    fn: Callable[..., dict[str, Any]],
    cfg_json: dict[str, Any],
    parent_run_id: str | None,
) -> dict[str, Any]:
    cfg = config_from_json(cfg_json)
    with tracked_stage(cfg, stage, parent_run_id, section=section) as st:
        out = fn(cfg, tracker=st.tracker)
        st.tracker.log_metrics(numeric(out))
        # a stage skipped as up to date keeps its registered version; only new weights are registered
        out["model_uri"] = None if out.get("cached") else st.register(network, out["checkpoint"])
        publish_summary(cfg, stage, out, st)
    return out


@task(name="train-autoencoder", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def autoencoder_task(cfg_json: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Train the autoencoder (or return at once when already trained from the same inputs)."""
    return _train("autoencoder", "autoencoder", "autoencoder", stages.run_autoencoder, cfg_json, parent_run_id)


@task(name="encode-latents", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def latents_task(
    cfg_json: dict[str, Any], upstream: dict[str, Any], parent_run_id: str | None = None
) -> dict[str, Any]:
    """Encode the latent cache."""
    cfg = config_from_json(cfg_json)
    with tracked_stage(cfg, "latents", parent_run_id) as st:
        out = stages.run_encode(cfg)
        publish_summary(cfg, "latents", out, st)
    return out


@task(name="train-unet", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def unet_task(cfg_json: dict[str, Any], upstream: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Train the diffusion UNet."""
    return _train("unet", "unet", "diffusion", stages.run_unet, cfg_json, parent_run_id)


@task(name="train-controlnet", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def controlnet_task(
    cfg_json: dict[str, Any], upstream: dict[str, Any], parent_run_id: str | None = None
) -> dict[str, Any]:
    """Train the ControlNet."""
    return _train("controlnet", "controlnet", "controlnet", stages.run_controlnet, cfg_json, parent_run_id)


@task(name="register-generator", cache_policy=NO_CACHE)
def generator_task(
    cfg_json: dict[str, Any], upstream: dict[str, Any], parent_run_id: str | None = None
) -> dict[str, Any]:
    """Bundle the three final checkpoints + config and register it as the ``generator`` model."""
    cfg = config_from_json(cfg_json)
    with tracked_stage(cfg, "generator", parent_run_id) as st:
        bundle = stages.export_generator(cfg)
        uri = None if upstream.get("cached") else st.register("generator", bundle)
        out = {"bundle": str(bundle), "model_uri": uri, "cached": bool(upstream.get("cached"))}
        publish_summary(cfg, "generator", out, st)
    return out


@flow(name="train")
def train_flow(cfg_json: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Train the three generative networks in order (each stage skipped when up to date)."""
    ae = autoencoder_task(cfg_json, parent_run_id)
    lat = latents_task(cfg_json, ae, parent_run_id)
    unet = unet_task(cfg_json, lat, parent_run_id)
    cn = controlnet_task(cfg_json, unet, parent_run_id)
    gen = generator_task(cfg_json, cn, parent_run_id)
    return {"autoencoder": ae, "latents": lat, "unet": unet, "controlnet": cn, "generator": gen}
