"""Counterfactual editing of real scans: invert, regenerate with an edited mask, keep the rest.

For a batch of real images with their masks and edited masks (model grid, cache label space):

1. encode each image to its latent mean (times the latent scale factor): ``z0``;
2. invert ``z0`` with the ORIGINAL mask as the condition (deterministic DDIM,
   :func:`medsynth.diffusion.inversion.ddim_invert`, plain conditional model);
3. regenerate with the EDITED mask (classifier-free guidance allowed), and after every step keep the
   inverted latent outside the edit region (where the masks differ, dilated by ``dilate`` voxels,
   rounded up to whole latent voxels): :func:`medsynth.diffusion.inversion.blended_ddim`;
4. decode. Outside the region the latent is exactly ``z0``, so the image there is the autoencoder's
   round trip of the original (up to the decoder's receptive field near the region's border).

The sampler is always DDIM here (inversion needs a deterministic, invertible sampler), whatever
``sampling.sampler`` says; ``steps`` and the guidance scale come from the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medsynth.diffusion.guidance import cfg_denoiser
from medsynth.diffusion.inversion import blended_ddim, ddim_invert, latent_region
from medsynth.errors import ConfigError
from medsynth.generator import MaskGenerator
from medsynth.models.controlnet import one_hot_mask
from medsynth.models.tiling import decode_latents, encode_latent_means
from medsynth.synthesis.lesion_edits import edit_region

__all__ = ["CounterfactualOutput", "counterfactual", "encode", "regions"]


@dataclass(frozen=True)
class CounterfactualOutput:
    """Edited images and what they were made from (all on the CPU).

    Attributes:
        images: ``(B, 1, *S)`` edited images in [0, 1].
        reconstructions: ``(B, 1, *S)`` autoencoder round trips of the originals in [0, 1].
        region: ``(B, 1, *S)`` bool: the dilated edit region on the image grid.
        latent_region: ``(B, 1, *s)`` float {0, 1}: the regenerated latent voxels.
        z0: ``(B, C, *s)`` the originals' (scaled) latents.
        latents: ``(B, C, *s)`` the edited (scaled) latents; equal to ``z0`` outside ``latent_region``.
    """

    images: Tensor
    reconstructions: Tensor
    region: Tensor
    latent_region: Tensor
    z0: Tensor
    latents: Tensor


def regions(masks: Tensor, edited: Tensor, dilate: int) -> Tensor:
    """The dilated edit regions ``(B, 1, *S)`` bool of a batch (see :func:`edit_region`)."""
    out = [edit_region(m.numpy(), e.numpy(), dilate) for m, e in zip(masks.cpu(), edited.cpu(), strict=True)]
    return torch.from_numpy(np.stack(out))


@torch.no_grad()
def encode(gen: MaskGenerator, images: Tensor) -> Tensor:
    """Scaled latent means ``(B, C, *s)`` of images ``(B, 1, *S)`` in [0, 1] (on the generator's device)."""
    mean = encode_latent_means(gen.ae, images.to(gen.device).float(), gen.ae_factor, gen.tiling)
    return mean.float() * gen.scale_factor


@torch.no_grad()
def counterfactual(
    gen: MaskGenerator,
    images: Tensor,
    masks: Tensor,
    edited: Tensor,
    *,
    steps: int,
    guidance_scale: float = 1.0,
    dilate: int = 3,
    seed: int = 0,
    region_noise: str = "fresh",
) -> CounterfactualOutput:
    """Edit real images so they follow edited masks, keeping everything outside the edit region.

    Args:
        gen: The trained mask-conditioned generator.
        images: ``(B, 1, *S)`` real images in [0, 1] (model grid).
        masks: ``(B, 1, *S)`` their original labels.
        edited: ``(B, 1, *S)`` the edited labels.
        steps: DDIM steps of inversion and regeneration.
        guidance_scale: Classifier-free guidance of the regeneration (1: none).
        dilate: Voxels by which the changed region is dilated.
        seed: Seed of the fresh noise inside the region.
        region_noise: ``"fresh"`` (seeded Gaussian noise inside the region) or ``"inverted"``.

    Returns:
        A :class:`CounterfactualOutput`.

    Raises:
        ConfigError: An unconditional generator or a rectified-flow objective (no DDIM inversion).
        ValueError: Mismatching shapes.
    """
    if not gen.conditional:
        raise ConfigError("config", "counterfactual edits need a mask-conditioned generator (a trained ControlNet)")
    if not gen.objective.is_ddpm_family:
        raise ConfigError(
            "config",
            f"counterfactual edits use DDIM inversion, which needs an epsilon or v objective, not "
            f"{gen.objective.name!r}",
        )
    if not (images.shape == masks.shape == edited.shape):
        raise ValueError(f"images {tuple(images.shape)}, masks and edited masks must have the same shape")
    gen.denoiser_net.eval()
    dev, f = gen.device, gen.ae_factor
    z0 = encode(gen, images)
    cond_orig = one_hot_mask(masks.to(dev).long(), gen.num_classes)
    cond_new = one_hot_mask(edited.to(dev).long(), gen.num_classes)
    inv = ddim_invert(gen.denoiser(), z0, objective=gen.objective, steps=steps, cond=cond_orig)
    region = regions(masks, edited, dilate)
    lat_region = latent_region(region.to(dev), f)
    denoise = gen.denoiser()
    if guidance_scale != 1.0:
        denoise = cfg_denoiser(denoise, guidance_scale, null_cond=torch.zeros_like(cond_new))
    start = None
    if region_noise == "fresh":
        g = torch.Generator(device=dev).manual_seed(seed)
        start = torch.randn(tuple(z0.shape), generator=g, device=dev)
    elif region_noise != "inverted":
        raise ValueError(f"region_noise must be 'fresh' or 'inverted', got {region_noise!r}")
    z = blended_ddim(denoise, inv, lat_region, objective=gen.objective, cond=cond_new, start=start)
    out = decode_latents(gen.ae, z / gen.scale_factor, f, gen.tiling).float().clamp(0, 1).cpu()
    rec = decode_latents(gen.ae, z0 / gen.scale_factor, f, gen.tiling).float().clamp(0, 1).cpu()
    return CounterfactualOutput(out, rec, region, lat_region.cpu(), z0.cpu(), z.cpu())


def batched(
    gen: MaskGenerator,
    images: Tensor,
    masks: Tensor,
    edited: Tensor,
    batch_size: int,
    seeds: Sequence[int],
    **kwargs: object,
) -> CounterfactualOutput:
    """:func:`counterfactual` in batches of ``batch_size`` (batch ``j`` seeded with ``seeds[j]``), concatenated."""
    parts: list[CounterfactualOutput] = []
    for j, start in enumerate(range(0, images.shape[0], batch_size)):
        sl = slice(start, start + batch_size)
        parts.append(counterfactual(gen, images[sl], masks[sl], edited[sl], seed=seeds[j], **kwargs))  # type: ignore[arg-type]
    return CounterfactualOutput(*(torch.cat([getattr(p, name) for p in parts]) for name in _FIELDS))


_FIELDS = ("images", "reconstructions", "region", "latent_region", "z0", "latents")
