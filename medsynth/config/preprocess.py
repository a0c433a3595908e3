"""Configuration of quality checks and preprocessing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medsynth.config.base import StrictModel


class QCConfig(StrictModel):
    """Dataset quality checks run before preprocessing (and by ``medsynth data check``)."""

    policy: Literal["fail", "exclude"] = Field(
        "fail", description="'fail': any bad case stops the run; 'exclude': bad cases are dropped and listed."
    )
    geometry_tolerance: float = Field(
        1e-3, gt=0, description="Relative tolerance when comparing image and mask spacing/origin/direction."
    )
    check_constant: bool = Field(True, description="Flag images whose intensities are constant.")
    min_signal: float | None = Field(
        None,
        description="Flag near-empty images: the 99.5th percentile of the RAW intensities is below this value "
        "(e.g. noise-only edge slices of a stack, which percentile normalisation would stretch into full-range "
        "noise). In the data's own units (LGG 8-bit FLAIR: anatomy reaches 100-250, edge slices < 30). None: off.",
    )
    n_overlays: int = Field(12, ge=0, description="Number of cases drawn as PNG overlays in the QC report.")


class IntensityConfig(StrictModel):
    """Per-volume intensity normalisation."""

    method: Literal["percentile", "zscore"] = Field(
        "percentile",
        description="'percentile': clip to [lower, upper] percentiles and scale to [0, 1]; "
        "'zscore': subtract the mean and divide by the standard deviation.",
    )
    lower: float = Field(0.5, ge=0, le=100, description="Lower percentile (percentile method).")
    upper: float = Field(99.5, ge=0, le=100, description="Upper percentile (percentile method).")
    within_foreground: bool = Field(
        True, description="Compute statistics only over non-zero voxels (the head), not the empty background."
    )

    @model_validator(mode="after")
    def _order(self) -> IntensityConfig:
        if self.lower >= self.upper:
            raise ValueError(f"lower percentile {self.lower} must be below upper {self.upper}")
        return self


class DerivedLabelConfig(StrictModel):
    """A conditioning label computed from the image itself (e.g. the head/brain foreground)."""

    enabled: bool = Field(False, description="Add the derived label to the mask.")
    name: str = Field("brain", description="Name of the derived label in the vocabulary.")
    index: int = Field(2, ge=1, description="Label index of the derived label (must be new).")
    threshold: float | Literal["otsu"] = Field(
        "otsu", description="Intensity threshold on the normalised image, or 'otsu' for Otsu's method."
    )
    fill_holes: bool = Field(True, description="Fill holes in the thresholded foreground.")
    largest_component: bool = Field(True, description="Keep only the largest connected component.")


class SliceConfig(StrictModel):
    """2D mode: how slices are taken from volumes and which are kept."""

    axis: int = Field(2, ge=0, le=2, description="Slicing axis of 3D volumes (index order; 2 = axial for RAS).")
    min_foreground: int = Field(
        1,
        ge=0,
        description="A slice 'has foreground' when at least this many pixels carry a non-background "
        "original label (derived labels do not count).",
    )
    keep_empty_fraction: float = Field(
        1.0, ge=0, le=1, description="Fraction of slices without foreground to keep (seeded, per case)."
    )
    drop_blank: bool = Field(True, description="Drop slices whose image is constant (e.g. black edge slices).")


class PreprocessConfig(StrictModel):
    """MONAI preprocessing to an on-disk cache of arrays."""

    spatial_dims: Literal[2, 3] = Field(2, description="2: cache 2D slices; 3: cache whole volumes or crops.")
    orientation: str | None = Field("RAS", description="Axis codes to reorient 3D volumes to; None keeps them.")
    spacing: list[float] | None = Field(
        None, description="Target voxel spacing in mm (image linear, mask nearest); None keeps the native spacing."
    )
    spatial_size: list[int] = Field(
        default_factory=lambda: [128, 128], description="Final size after crop/pad (per spatial dim of the output)."
    )
    foreground_crop: bool = Field(False, description="Crop to the bounding box of non-zero image voxels first.")
    foreground_margin: int = Field(2, ge=0, description="Margin in voxels kept around the foreground crop.")
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)  # type: ignore[arg-type]
    derived_label: DerivedLabelConfig = Field(default_factory=DerivedLabelConfig)  # type: ignore[arg-type]
    slices: SliceConfig = Field(default_factory=SliceConfig)  # type: ignore[arg-type]
    crop_mode: Literal["whole", "random_crops"] = Field(
        "whole", description="3D mode: keep the whole (padded/cropped) volume or take random fixed-size crops."
    )
    crops_per_volume: int = Field(4, ge=1, description="3D random_crops mode: crops taken per volume.")
    crop_size: list[int] | None = Field(None, description="3D random_crops mode: crop size (voxels).")
    seed: int = Field(0, description="Seed for random slice/crop selection.")

    @model_validator(mode="after")
    def _dims(self) -> PreprocessConfig:
        if len(self.spatial_size) != self.spatial_dims:
            raise ValueError(f"spatial_size {self.spatial_size} must have {self.spatial_dims} entries")
        if self.crop_mode == "random_crops" and (self.crop_size is None or len(self.crop_size) != 3):
            raise ValueError("crop_mode 'random_crops' needs crop_size with 3 entries")
        return self
