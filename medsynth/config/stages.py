"""Training sections of the generative stages: architecture (from ``generative``) + training knobs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medsynth.config.base import StrictModel
from medsynth.config.generative import AutoencoderConfig, ControlNetConfig, DiffusionUNetConfig
from medsynth.config.training import OptimConfig


class AutoencoderStage(AutoencoderConfig):
    """Autoencoder: L1 reconstruction + KL, optional patch-adversarial and perceptual losses."""

    train: OptimConfig = Field(default_factory=OptimConfig)  # type: ignore[arg-type]
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term.")
    adv_weight: float = Field(0.0, ge=0, description="Weight of the patch-adversarial loss (0: no discriminator).")
    adv_start: int = Field(500, ge=0, description="Step at which the adversarial loss is switched on (warm-up).")
    disc_lr: float = Field(2e-4, gt=0, description="Discriminator learning rate.")
    perceptual_weights: str | None = Field(
        None, description="Local path of pretrained perceptual-loss weights (none are downloaded); None: off."
    )
    perceptual_weight: float = Field(0.0, ge=0, description="Weight of the perceptual loss when weights are given.")


class DiffusionStage(DiffusionUNetConfig):
    """Latent diffusion UNet: objective, noise schedule and training knobs."""

    train: OptimConfig = Field(default_factory=OptimConfig)  # type: ignore[arg-type]
    objective: Literal["epsilon", "v_prediction", "rflow"] = Field(
        "v_prediction", description="Training objective: DDPM epsilon, v-prediction or rectified flow."
    )
    num_train_timesteps: int = Field(1000, ge=10, description="Diffusion timesteps T.")
    schedule: str = Field("scaled_linear_beta", description="MONAI beta schedule of the DDPM-family objectives.")


class ControlNetStage(ControlNetConfig):
    """ControlNet on the full-resolution one-hot mask, initialised from the trained UNet."""

    train: OptimConfig = Field(default_factory=OptimConfig)  # type: ignore[arg-type]
    mask_dropout: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Probability of replacing a mask by the null (all-zero) mask while training, "
        "so classifier-free guidance works at sampling.",
    )
    label_weights: dict[int, float] = Field(
        default_factory=dict,
        description="Loss weight per label (latent pixels covered by the label), e.g. {1: 5.0} for small tumours.",
    )


class SamplingConfig(StrictModel):
    """How images are drawn from the trained model."""

    sampler: Literal["ddpm", "ddim", "rflow_euler", "dpmpp"] = Field(
        "dpmpp", description="Sampler (rflow_euler needs the rflow objective; the others a DDPM-family one)."
    )
    steps: int = Field(20, ge=1, description="Sampling steps (denoiser evaluations without guidance).")
    guidance_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale (1: no guidance).")
    eta: float = Field(0.0, ge=0, description="DDIM stochasticity.")
    batch_size: int = Field(16, ge=1, description="Images generated per batch.")
    seed: int = Field(0, description="Base seed of sampling.")
