"""Training sections of the generative stages: architecture (from ``generative``) + training knobs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

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


class GuidanceCalibrationConfig(StrictModel):
    """Guidance calibration: the sweep that picks ``sampling.guidance_scale`` when it is ``"auto"``.

    On the validation split, one image per selected mask is generated at every scale (same seeds) and
    measured against the real images of those masks with the reference segmenter; the chosen scale
    is the smallest whose lesion Dice ratio (synthetic / real) is at least ``min_dice_ratio`` and
    whose lesion contrast ratio lies in ``[contrast_low, contrast_high]``, else the best trade-off
    (:func:`medsynth.evaluation.calibration.choose_guidance`).
    """

    scales: list[float] = Field(
        default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 5.0],
        description="Guidance scales swept (each >= 1; sorted ascending).",
    )
    n_with: int = Field(48, ge=1, description="Validation masks holding the lesion (spread over the split).")
    n_free: int = Field(32, ge=0, description="Validation masks lacking it (false positives).")
    min_voxels: int = Field(20, ge=1, description="Smallest lesion (voxels) of a mask counted as holding it.")
    min_dice_ratio: float = Field(0.95, gt=0, description="Lesion Dice ratio synthetic / real a scale must reach.")
    contrast_low: float = Field(0.8, gt=0, description="Lowest lesion contrast ratio synthetic / real accepted.")
    contrast_high: float = Field(1.25, gt=0, description="Highest lesion contrast ratio synthetic / real accepted.")
    n_bootstrap: int = Field(200, ge=10, description="Bootstrap resamples of the per-scale intervals.")
    seed: int = Field(0, description="Base seed of the sweep (the same at every scale).")

    @field_validator("scales")
    @classmethod
    def _scales_ok(cls, value: list[float]) -> list[float]:
        if not value or min(value) < 1.0 or len(set(value)) != len(value):
            raise ValueError(f"scales must be distinct numbers >= 1, got {value}")
        return sorted(value)


class SamplingConfig(StrictModel):
    """How images are drawn from the trained model."""

    sampler: Literal["ddpm", "ddim", "rflow_euler", "dpmpp"] = Field(
        "dpmpp", description="Sampler (rflow_euler needs the rflow objective; the others a DDPM-family one)."
    )
    steps: int = Field(20, ge=1, description="Sampling steps (denoiser evaluations without guidance).")
    guidance_scale: float | Literal["auto"] = Field(
        1.0,
        description="Classifier-free guidance scale (1: no guidance), pinned; or 'auto': chosen by the guidance "
        "calibration on the validation split (the 'calibration' sub-section).",
    )
    calibration: GuidanceCalibrationConfig = Field(default_factory=GuidanceCalibrationConfig)  # type: ignore[arg-type]
    eta: float = Field(0.0, ge=0, description="DDIM stochasticity.")
    batch_size: int = Field(16, ge=1, description="Images generated per batch.")
    seed: int = Field(0, description="Base seed of sampling.")

    @field_validator("guidance_scale")
    @classmethod
    def _scale_ok(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value < 0:
            raise ValueError(f"guidance_scale must be >= 0 or 'auto', got {value}")
        return value

    @property
    def scale(self) -> float:
        """The guidance scale as a number.

        Raises:
            ConfigError: If it is still ``"auto"`` (the calibration has not replaced it yet).
        """
        if isinstance(self.guidance_scale, str):
            from medsynth.errors import ConfigError

            raise ConfigError(
                "config",
                "sampling.guidance_scale is 'auto' but no calibrated value was given",
                hint="run the guidance calibration first, or pin a number (e.g. sampling.guidance_scale=1.5)",
            )
        return float(self.guidance_scale)

    def preview(self) -> SamplingConfig:
        """Settings for pictures made before any calibration (training sample grids).

        A pinned scale is kept; ``auto`` becomes the middle scale of the calibration sweep.
        """
        if not isinstance(self.guidance_scale, str):
            return self
        scales = sorted(self.calibration.scales)
        return self.with_scale(scales[len(scales) // 2])

    def with_scale(self, scale: float) -> SamplingConfig:
        """A copy with the guidance scale pinned to ``scale`` (e.g. the calibrated one)."""
        return self.model_copy(update={"guidance_scale": float(scale)})
