"""MONAI transform chains used by preprocessing (built from :class:`PreprocessConfig`)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from medsynth.config.preprocess import IntensityConfig, PreprocessConfig
from medsynth.errors import ConfigError

IMAGE, MASK = "image", "mask"


class ForegroundPercentileScaled(MapTransform):
    """Clip to percentiles computed over non-zero voxels and scale to [0, 1], each channel on its own.

    MONAI's ``ScaleIntensityRangePercentilesd`` computes percentiles over every voxel, which in
    head MRI is mostly empty background; this variant uses only voxels > 0 (the head), so the
    upper percentile tracks tissue, not air. Zero (background) voxels stay at 0. The channels of a
    multi-contrast image (FLAIR, T1c, ...) have unrelated scales: each gets its own percentiles.

    Args:
        keys: Keys of the images to scale, each ``(C, *spatial)``.
        lower: Lower percentile in [0, 100].
        upper: Upper percentile in [0, 100], above ``lower``.
    """

    def __init__(self, keys: KeysCollection, lower: float, upper: float) -> None:
        super().__init__(keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            chans = []
            for c in range(x.shape[0]):
                xc = x[c : c + 1]
                rng = foreground_percentiles(xc, self.lower, self.upper)
                if rng is None:
                    chans.append(xc)
                    continue
                lo, hi = rng
                scaled = ((xc - lo) / max(hi - lo, 1e-8)).clamp(0.0, 1.0)
                chans.append(torch.where(xc > 0, scaled, torch.zeros_like(scaled)))
            d[key] = chans[0] if len(chans) == 1 else torch.cat(chans, 0)
        return d


def foreground_percentiles(x: torch.Tensor, lower: float, upper: float) -> tuple[float, float] | None:
    """The ``(lower, upper)`` percentiles of the voxels > 0 of ``x`` (any shape); None when there are none."""
    fg = x[x > 0]
    if fg.numel() == 0:
        return None
    q = torch.quantile(fg.float(), torch.tensor([lower / 100, upper / 100], dtype=torch.float32))
    return float(q[0]), float(q[1])


def intensity_source_ranges(image: torch.Tensor, cfg: IntensityConfig) -> tuple[tuple[float, float], ...] | None:
    """The source intensities that :func:`intensity_transform` maps to 0 and 1, one range per channel.

    ``image`` is the volume as the intensity transform receives it (after the geometry transforms),
    ``(C, *S)``. Model intensity ``x`` in ``[0, 1]`` of channel ``c`` corresponds to
    ``lo_c + x * (hi_c - lo_c)`` of that channel's source scale (each contrast is scaled on its own).
    A channel that the transform leaves unchanged (no foreground voxels) gets ``(0.0, 1.0)``, the identity.

    Returns:
        ``C`` pairs ``(lo, hi)`` for the percentile method; None for z-scoring (no bounded inverse) or an
        empty image.
    """
    if cfg.method != "percentile" or image.numel() == 0:
        return None
    out: list[tuple[float, float]] = []
    for c in range(int(image.shape[0])):
        xc = image[c : c + 1]
        if cfg.within_foreground:
            out.append(foreground_percentiles(xc, cfg.lower, cfg.upper) or (0.0, 1.0))
        else:
            flat = xc.detach().float().reshape(-1).numpy()
            out.append((float(np.percentile(flat, cfg.lower)), float(np.percentile(flat, cfg.upper))))
    return tuple(out)


def intensity_transform(cfg: IntensityConfig) -> MapTransform:
    """The per-volume intensity normalisation chosen by ``cfg`` (the image only; each channel on its own)."""
    if cfg.method == "zscore":
        return NormalizeIntensityd(IMAGE, nonzero=cfg.within_foreground, channel_wise=True)
    if cfg.within_foreground:
        return ForegroundPercentileScaled(IMAGE, cfg.lower, cfg.upper)
    return ScaleIntensityRangePercentilesd(
        IMAGE, cfg.lower, cfg.upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
    )


def geometry_transforms(cfg: PreprocessConfig, ndim: int) -> list[MapTransform]:
    """Orientation, resampling and foreground crop for an input of ``ndim`` spatial dims.

    Orientation is applied to 3D inputs only (2D slices such as PNGs carry no orientation).
    The image is resampled linearly and the mask by nearest neighbour, so the mask keeps its label set.
    """
    out: list[MapTransform] = []
    if ndim == 3 and cfg.orientation:
        out.append(Orientationd(keys=[IMAGE, MASK], axcodes=cfg.orientation))
    if cfg.spacing is not None:
        if len(cfg.spacing) != ndim:
            raise ConfigError(  # a ValueError too; a MedsynthError so that the CLI prints one line, no traceback
                "config",
                f"preprocess.spacing {cfg.spacing} has {len(cfg.spacing)} entries but the data is {ndim}D",
                hint="give one spacing per axis of the input images (2 for PNG slices, 3 for volumes)",
            )
        out.append(Spacingd(keys=[IMAGE, MASK], pixdim=cfg.spacing, mode=("bilinear", "nearest"), dtype=np.float32))
    if cfg.foreground_crop:
        out.append(
            CropForegroundd(keys=[IMAGE, MASK], source_key=IMAGE, margin=cfg.foreground_margin, allow_smaller=True)
        )
    return out


def pad_crop_transform(spatial_size: Sequence[int]) -> MapTransform:
    """Symmetric crop/pad of image and mask to ``spatial_size`` (a non-positive entry keeps that axis)."""
    return ResizeWithPadOrCropd(keys=[IMAGE, MASK], spatial_size=list(spatial_size), mode="constant")


def volume_pipeline(cfg: PreprocessConfig, ndim: int) -> Compose:
    """Geometry + intensity transforms for one case, applied before slicing/cropping.

    Args:
        cfg: Preprocessing config.
        ndim: Spatial dims of the input (2 for PNG slices, 3 for volumes).

    Returns:
        A MONAI ``Compose`` taking ``{"image": MetaTensor (1, *S), "mask": MetaTensor (1, *S)}``.
    """
    return Compose([*geometry_transforms(cfg, ndim), intensity_transform(cfg.intensity)])


def to_meta(array: np.ndarray, affine: np.ndarray, dtype: torch.dtype, channels: bool = False) -> MetaTensor:
    """Wrap a spatial array ``(*S)`` as a channel-first ``MetaTensor (1, *S)`` carrying ``affine``.

    With ``channels`` the array is already channel-first ``(C, *S)`` and is wrapped as it is.
    """
    t = torch.as_tensor(np.ascontiguousarray(array), dtype=dtype)
    return MetaTensor(t if channels else t[None], affine=torch.as_tensor(affine))
