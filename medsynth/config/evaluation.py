"""Validation of synthetic data: the reference segmenter and the realism/diversity/memorisation audits.

``segmenter`` is the network trained on REAL data only that segments synthetic images (anatomical
plausibility, the field's standard check); ``validation`` holds the statistics and audit settings.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from medsynth.config.base import StrictModel
from medsynth.config.training import OptimConfig


class SegmenterOptimConfig(OptimConfig):
    """Optimisation of the reference segmenter (defaults sized for a small UNet, no EMA)."""

    steps: int = Field(1500, ge=1, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, description="Batch size per process.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear learning-rate warm-up steps.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA decay of the weights (None: no EMA).")
    val_every: int = Field(250, ge=1, description="Validation Dice every N steps.")
    val_batches: int = Field(4, ge=1, description="Validation batches per periodic evaluation (the end uses all).")
    ckpt_every: int = Field(500, ge=1, description="Checkpoint every N steps (and at the end).")


class SegmenterConfig(StrictModel):
    """Reference segmenter: a MONAI ``UNet`` trained on the real training split (DiceCE loss)."""

    channels: tuple[int, ...] = Field((16, 32, 64, 128), description="UNet feature channels per level.")
    strides: tuple[int, ...] = Field((2, 2, 2), description="UNet strides between levels (len(channels) - 1 entries).")
    num_res_units: int = Field(2, ge=0, description="Residual units per UNet block.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability.")
    norm: str = Field("INSTANCE", description="MONAI normalisation name (INSTANCE, BATCH, ...).")
    loss: Literal["dice_ce"] = Field("dice_ce", description="Loss: MONAI DiceCELoss (softmax, one-hot target).")
    dice_weight: float = Field(1.0, ge=0, description="Weight of the Dice term of DiceCELoss.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the cross-entropy term of DiceCELoss.")
    include_background: bool = Field(False, description="Include the background channel in the Dice term.")
    augment_flips: bool = Field(True, description="Random flips of image and mask while training.")
    flip_axes: tuple[int, ...] = Field(
        (0,), description="Spatial axes that may be flipped (0 is left-right after RAS reorientation)."
    )
    predict_batch_size: int = Field(32, ge=1, description="Images per forward pass at inference.")
    train: SegmenterOptimConfig = Field(default_factory=SegmenterOptimConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _levels(self) -> Self:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides needs {len(self.channels) - 1} entries for channels {self.channels}")
        if any(s < 1 for s in self.strides):
            raise ValueError(f"strides must be >= 1, got {self.strides}")
        return self


class FeatureOptimConfig(OptimConfig):
    """Optimisation of the in-domain feature encoder (a few hundred quick steps)."""

    steps: int = Field(300, ge=1, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, description="Batch size.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    warmup_steps: int = Field(20, ge=0, description="Linear learning-rate warm-up steps.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA decay (None: no EMA).")
    val_every: int = Field(100, ge=1, description="Validation loss every N steps.")
    ckpt_every: int = Field(300, ge=1, description="Checkpoint every N steps (and at the end).")


class FeatureEncoderConfig(StrictModel):
    """The in-domain feature encoder of the FID/KID audit (trained by medsynth on real training images)."""

    channels: tuple[int, ...] = Field(
        (16, 32, 64, 64), description="Channels of the stride-2 conv blocks; the last is the feature size."
    )
    objective: Literal["label_fractions", "label_fractions_intensity"] = Field(
        "label_fractions_intensity",
        description="Training target regressed from the image: the square-root voxel fraction of every "
        "foreground label of its mask, plus (with '_intensity') the image's intensity deciles.",
    )
    batch_size: int = Field(64, ge=1, description="Images per forward pass when extracting features.")
    train: FeatureOptimConfig = Field(default_factory=FeatureOptimConfig)  # type: ignore[arg-type]


class ValidationConfig(StrictModel):
    """Statistics and audits of synthetic data (plausibility, realism, diversity, memorisation)."""

    max_cases: int | None = Field(
        None, ge=1, description="Evaluate at most this many test items (deterministic first N); None: all."
    )
    n_bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples (of patients) per confidence interval.")
    ci: float = Field(0.95, gt=0, lt=1, description="Confidence level of the percentile bootstrap intervals.")
    seed: int = Field(0, description="Seed of bootstraps, permutation tests and KID subsets.")
    external_test: str | None = Field(
        None,
        description="External test set (another site or cohort): a dataset folder (any layout the data section "
        "reads) or a CSV manifest, preprocessed with the same settings into its own cache. Plausibility, lesion "
        "contrast and realism are measured on its masks as well and reported separately ('external'). A patient "
        "shared with the training split is an error. None: none.",
    )
    n_worst: int = Field(5, ge=0, description="Worst synthetic cases (lowest Dice) drawn per label.")
    fp_min_voxels: int = Field(
        5,
        ge=0,
        description="A case whose mask lacks a label counts as a false positive when the segmenter predicts "
        "MORE than this many voxels of that label.",
    )
    memorisation_percentile: float = Field(
        1.0,
        gt=0,
        lt=100,
        description="Threshold = this percentile of the real-test nearest-training distances; synthetic "
        "images closer than it to a training image are flagged.",
    )
    memorisation_distance: Literal["ncc", "l2", "ssim"] = Field(
        "ncc",
        description="Image distance of the memorisation audit: 1 - normalised cross-correlation, RMS "
        "difference, or 1 - SSIM re-ranking the memorisation_top_k nearest by NCC.",
    )
    memorisation_top_k: int = Field(5, ge=1, description="Candidates re-ranked by SSIM ('ssim' distance).")
    n_closest: int = Field(8, ge=0, description="Closest synthetic/training pairs drawn in the figure.")
    diversity_seeds: int = Field(4, ge=2, description="Images generated per mask (different seeds) for diversity.")
    diversity_masks: int = Field(8, ge=1, description="Masks used for the diversity audit.")
    features: FeatureEncoderConfig = Field(default_factory=FeatureEncoderConfig)  # type: ignore[arg-type]
    feature_weights: str | None = Field(
        None,
        description="Local feature-encoder weights (medsynth encoder .safetensors, or a TorchScript file "
        "mapping (N,1,*S) images to (N,F) features); None: train the in-domain encoder.",
    )
    kid_subset_size: int = Field(100, ge=2, description="Samples per KID subset (capped at the set sizes).")
    kid_subsets: int = Field(50, ge=1, description="Number of KID subsets.")
    intensity_bins: int | None = Field(
        256, ge=2, description="Histogram bins of the per-label intensity Wasserstein distance (None: exact)."
    )
    permutation_resamples: int = Field(9999, ge=99, description="Resamples of paired permutation tests.")
