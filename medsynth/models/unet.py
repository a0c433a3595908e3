"""Diffusion UNet factory (latent denoiser without cross-attention)."""

from __future__ import annotations

from typing import Any

from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

from medsynth.config.generative import DiffusionUNetConfig


def encoder_kwargs(cfg: DiffusionUNetConfig, spatial_dims: int, latent_channels: int) -> dict[str, Any]:
    """Constructor arguments shared by the UNet and the ControlNet that mirrors its encoder (one source)."""
    net = cfg.network
    return {
        "spatial_dims": spatial_dims,
        "in_channels": latent_channels,
        "channels": net.channels,
        "attention_levels": net.attention_levels,
        "num_res_blocks": net.num_res_blocks,
        "num_head_channels": net.num_head_channels,
        "norm_num_groups": net.norm_num_groups,
        "norm_eps": net.norm_eps,
        "resblock_updown": net.resblock_updown,
        "with_conditioning": False,
    }


def build_diffusion_unet(cfg: DiffusionUNetConfig, spatial_dims: int, latent_channels: int) -> DiffusionModelUNet:
    """Builds the latent denoiser described by ``cfg.network``.

    Args:
        cfg: Diffusion UNet section.
        spatial_dims: 2 or 3.
        latent_channels: Channels of the autoencoder latent (input and output channels).

    Returns:
        A ``DiffusionModelUNet`` with ``forward(x, timesteps) -> Tensor`` mapping noisy latents
        (B, latent_channels, *L) and timesteps (B,) to a prediction of the same shape as ``x``.
        Latent sides must be divisible by ``2 ** (len(cfg.network.channels) - 1)``.
    """
    return DiffusionModelUNet(out_channels=latent_channels, **encoder_kwargs(cfg, spatial_dims, latent_channels))
