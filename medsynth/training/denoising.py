"""The latent denoising loss shared by the diffusion-UNet and ControlNet training loops."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from medsynth.diffusion.denoiser import Denoiser
from medsynth.diffusion.objectives import DiffusionObjective
from medsynth.models.controlnet import one_hot_mask
from medsynth.training.latents import LatentSet


def denoising_loss(
    net: Callable[[Tensor, Tensor], Tensor],
    objective: DiffusionObjective,
    x0: Tensor,
    generator: torch.Generator,
    weights: Tensor | None = None,
) -> Tensor:
    """One Monte-Carlo estimate of the diffusion loss.

    Args:
        net: ``net(x_t, t) -> prediction`` (conditioning already bound).
        objective: Defines noising and the regression target.
        x0: Clean scaled latents ``(B, C, *s)``.
        generator: Source of the noise and timesteps (seeded per step, so runs are reproducible).
        weights: Optional per-pixel weights broadcastable to ``(B, 1, *s)``.

    Returns:
        Scalar (weighted) mean squared error between prediction and target.
    """
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = objective.sample_timesteps(x0, generator)
    x_t, target = objective.make_training_pair(x0, noise, t)
    pred = net(x_t, t).float()
    if weights is None:
        return F.mse_loss(pred, target.float())
    err = (pred - target.float()).pow(2)
    return (err * weights).sum() / (weights.expand_as(err).sum().clamp_min(1e-8))


def bind_cond(denoise: Denoiser, cond: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
    """``net(x, t) = denoise(x, t, cond)``: a denoiser with its conditioning fixed."""

    def net(x: Tensor, t: Tensor) -> Tensor:
        return denoise(x, t, cond)

    return net


def label_weight_map(onehot: Tensor, label_weights: dict[int, float], factor: int) -> Tensor | None:
    """Per-latent-pixel loss weights from a full-resolution one-hot mask.

    Args:
        onehot: ``(B, K, *S)`` one-hot mask (float).
        label_weights: Weight per label index (labels not listed weigh 1).
        factor: Autoencoder downsampling factor (mask side / latent side).

    Returns:
        ``(B, 1, *S/factor)`` weights ``1 + Σ_l (w_l - 1)·coverage_l`` or None when no weights are set.
    """
    if not label_weights:
        return None
    pool = F.avg_pool2d if onehot.ndim == 4 else F.avg_pool3d
    cover = pool(onehot.float(), factor)
    w = torch.ones_like(cover[:, :1])
    for label, weight in label_weights.items():
        if 0 <= label < cover.shape[1]:
            w = w + (weight - 1.0) * cover[:, label : label + 1]
    return w


@torch.no_grad()
def validation_loss(
    denoise: Denoiser,
    objective: DiffusionObjective,
    val: LatentSet,
    batch: int,
    n_batches: int,
    device: torch.device,
    conditional: bool,
) -> float:
    """Mean denoising loss over the first ``n_batches`` validation batches with a fixed generator.

    The same noise and timesteps are drawn at every evaluation, so values are comparable across steps.

    Args:
        denoise: ``denoise(x, t, cond)``.
        objective: The training objective.
        val: Validation latents (and masks).
        batch: Batch size.
        n_batches: Batches evaluated.
        device: Device of the network.
        conditional: Pass the one-hot masks as ``cond`` (else None).

    Returns:
        The mean loss.
    """
    g = torch.Generator(device=device).manual_seed(1234)
    losses = []
    for i in range(n_batches):
        lo = i * batch
        if lo >= len(val):
            break
        x0 = val.latents[lo : lo + batch].to(device) * val.scale_factor
        cond = one_hot_mask(val.masks[lo : lo + batch].to(device).long(), val.num_classes) if conditional else None
        losses.append(float(denoising_loss(bind_cond(denoise, cond), objective, x0, g)))
    return sum(losses) / max(len(losses), 1)
