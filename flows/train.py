"""Prefect flow for the generative stages: autoencoder → latents → diffusion UNet → ControlNet.

Each task wraps one function of :mod:`medsynth.stages`. Caching is by each stage's input key
(config section + content hashes of its inputs), stored *with the stage's outputs*: a stage whose
final checkpoint carries the same key returns at once, and a killed stage resumes from its last
checkpoint with that key. Keeping the key next to the outputs (rather than in Prefect's result
store) means deleted or moved outputs are never reported as cached, and the CLI shares the cache.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_from_json
from medsynth import stages


@task(name="train-autoencoder", cache_policy=NO_CACHE)
def autoencoder_task(cfg_json: dict[str, Any]) -> dict[str, Any]:
    """Train the autoencoder."""
    return stages.run_autoencoder(config_from_json(cfg_json))


@task(name="encode-latents", cache_policy=NO_CACHE)
def latents_task(cfg_json: dict[str, Any], upstream: dict[str, Any]) -> dict[str, Any]:
    """Encode the latent cache."""
    return stages.run_encode(config_from_json(cfg_json))


@task(name="train-unet", cache_policy=NO_CACHE)
def unet_task(cfg_json: dict[str, Any], upstream: dict[str, Any]) -> dict[str, Any]:
    """Train the diffusion UNet."""
    return stages.run_unet(config_from_json(cfg_json))


@task(name="train-controlnet", cache_policy=NO_CACHE)
def controlnet_task(cfg_json: dict[str, Any], upstream: dict[str, Any]) -> dict[str, Any]:
    """Train the ControlNet."""
    return stages.run_controlnet(config_from_json(cfg_json))


@flow(name="train")
def train_flow(cfg_json: dict[str, Any]) -> dict[str, Any]:
    """Train the three generative networks in order (each stage cached by its inputs)."""
    ae = autoencoder_task(cfg_json)
    lat = latents_task(cfg_json, ae)
    unet = unet_task(cfg_json, lat)
    cn = controlnet_task(cfg_json, unet)
    return {"autoencoder": ae, "latents": lat, "unet": unet, "controlnet": cn}
