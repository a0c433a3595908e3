"""Fixtures of the synthesis tests: tiny network sections and a real tiny untrained generator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from medsynth.config.schema import MedsynthConfig
from medsynth.data.preprocess import output_labels
from medsynth.generator import MaskGenerator, build_controlled, latent_channels, make_objective
from medsynth.generator import latent_spatial_shape as latent_shape
from medsynth.models.autoencoder import build_autoencoder
from medsynth.models.unet import build_diffusion_unet

TINY_NETS: dict[str, Any] = {
    "autoencoder": {
        "network": {
            "channels": [8, 8],
            "latent_channels": 2,
            "num_res_blocks": 1,
            "attention_levels": [False, False],
            "norm_num_groups": 4,
        }
    },
    "diffusion": {
        "network": {
            "channels": [8, 8],
            "attention_levels": [False, False],
            "num_res_blocks": 1,
            "num_head_channels": 8,
            "norm_num_groups": 4,
        }
    },
    "controlnet": {"network": {"conditioning_embedding_num_channels": [8, 8]}},
    "sampling": {"sampler": "ddim", "steps": 2, "batch_size": 4, "guidance_scale": 1.0},
}


def tiny_generator(cfg: MedsynthConfig) -> MaskGenerator:
    """A real MaskGenerator of tiny untrained networks (zero-initialised weights filled so masks matter)."""
    dims = cfg.preprocess.spatial_dims
    n_classes = max(output_labels(cfg)) + 1
    torch.manual_seed(0)
    ae = build_autoencoder(cfg.autoencoder, dims, cfg.data.n_channels).eval()
    unet = build_diffusion_unet(cfg.diffusion, dims, latent_channels(cfg))
    controlled = build_controlled(cfg, unet, num_classes=n_classes)
    with torch.no_grad():
        for p in controlled.parameters():
            if p.ndim > 1 and not p.any():
                nn.init.normal_(p, std=0.2)
    objective = make_objective(cfg, latent_shape(cfg))
    return MaskGenerator(
        ae, controlled.eval(), objective, 1.0, n_classes, latent_channels(cfg), torch.device("cpu"), {"x": "0" * 64}
    )


@pytest.fixture
def tiny_nets() -> dict[str, Any]:
    """Config sections of tiny networks and a 2-step sampler (AE factor 2)."""
    return {k: dict(v) for k, v in TINY_NETS.items()}


@pytest.fixture
def make_generator() -> Callable[[MedsynthConfig], MaskGenerator]:
    """``make_generator(cfg)``: a real tiny untrained generator for ``cfg`` (:func:`tiny_generator`)."""
    return tiny_generator
