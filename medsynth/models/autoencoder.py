"""Autoencoder and patch-discriminator factories, and the latent-mean encoder."""

from __future__ import annotations

import torch
from monai.networks.nets.autoencoderkl import AutoencoderKL
from monai.networks.nets.patchgan_discriminator import PatchDiscriminator

from medsynth.config.generative import AutoencoderConfig


def downsample_factor(cfg: AutoencoderConfig) -> int:
    """Spatial downsampling factor from image to latent, per axis.

    Args:
        cfg: Autoencoder section.

    Returns:
        ``2 ** (len(cfg.network.channels) - 1)``; image sides must be multiples of it.
    """
    return int(2 ** (len(cfg.network.channels) - 1))


def build_autoencoder(cfg: AutoencoderConfig, spatial_dims: int, in_channels: int = 1) -> AutoencoderKL:
    """Builds the KL autoencoder described by ``cfg.network``.

    Args:
        cfg: Autoencoder section.
        spatial_dims: 2 or 3.
        in_channels: Image channels (also the number of reconstructed channels).

    Returns:
        An ``AutoencoderKL`` mapping images (B, in_channels, *S) to latents
        (B, latent_channels, *S / downsample_factor(cfg)) and back.
    """
    net = cfg.network
    return AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=net.channels,
        latent_channels=net.latent_channels,
        num_res_blocks=net.num_res_blocks,
        attention_levels=net.attention_levels,
        norm_num_groups=net.norm_num_groups,
        norm_eps=net.norm_eps,
        with_encoder_nonlocal_attn=net.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=net.with_decoder_nonlocal_attn,
    )


def build_discriminator(cfg: AutoencoderConfig, spatial_dims: int, in_channels: int = 1) -> PatchDiscriminator:
    """Builds the patch discriminator described by ``cfg.discriminator``.

    Args:
        cfg: Autoencoder section.
        spatial_dims: 2 or 3.
        in_channels: Image channels.

    Returns:
        A ``PatchDiscriminator`` whose forward returns a *list* of feature maps; the last element holds
        the patch logits (B, 1, *patch_grid).
    """
    disc = cfg.discriminator
    return PatchDiscriminator(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=1,
        channels=disc.channels,
        num_layers_d=disc.num_layers_d,
        norm=disc.norm,
    )


def encode_mean(ae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Encodes images to the latent mean ``z_mu`` (deterministic), not a posterior sample.

    ``AutoencoderKL.encode_stage_2_inputs`` draws ``z_mu + sigma * eps``; caching such samples adds a
    noise floor to the diffusion loss, so latent caches should hold the mean. Gradient tracking is left
    to the caller (wrap in ``torch.no_grad()`` when caching).

    Args:
        ae: The autoencoder.
        x: Images (B, C, *S), intensities as used in training (e.g. in [0, 1]).

    Returns:
        Latent means (B, latent_channels, *S / downsample_factor), unscaled (apply the latent scale
        factor separately).
    """
    z_mu, _ = ae.encode(x)
    return z_mu  # type: ignore[no-any-return]
