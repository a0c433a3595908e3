"""One case through training's geometry and intensity transforms (shared by preprocessing and synthesis).

:func:`transform_case` is the single implementation of orientation, spacing, foreground crop,
intensity scaling and the derived label; :func:`to_model_grid` adds the final crop/pad of whole
items. :mod:`medsynth.data.preprocess` caches its output; :mod:`medsynth.synthesis.native` applies
it to mask files given at synthesis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.transforms import Compose

from medsynth.config.preprocess import PreprocessConfig
from medsynth.data.derived import foreground_label, merge_derived
from medsynth.data.transforms import (
    IMAGE,
    MASK,
    geometry_transforms,
    intensity_source_ranges,
    intensity_transform,
    pad_crop_transform,
    to_meta,
)

__all__ = ["TransformedCase", "to_model_grid", "transform_case"]


@dataclass(frozen=True)
class TransformedCase:
    """A case after the geometry and intensity transforms of training (before slicing / crop-pad).

    Attributes:
        image: ``(C, *S')`` normalised image (MetaTensor carrying its affine; C = 1 unless multi-contrast),
            or None for a mask alone.
        mask: ``(*S')`` int64 labels, the derived label merged in when it is enabled and an image was given.
        original_foreground: ``(*S')`` voxels holding a non-background label of the input mask.
        affine: ``(D+1, D+1)`` RAS affine of the transformed arrays.
        source_ranges: ``(lo, hi)`` source intensities mapped to 0 and 1 (percentile scaling), one pair per
            channel (multi-contrast images scale each contrast on its own); None without an image or under
            z-scoring.
    """

    image: Any
    mask: npt.NDArray[np.int64]
    original_foreground: npt.NDArray[np.bool_]
    affine: npt.NDArray[np.float64]
    source_ranges: tuple[tuple[float, float], ...] | None

    @property
    def source_range(self) -> tuple[float, float] | None:
        """Channel 0's ``(lo, hi)`` (what single-contrast callers invert), else None."""
        return self.source_ranges[0] if self.source_ranges else None


def transform_case(
    image: npt.NDArray[np.generic] | None,
    mask: npt.NDArray[np.generic],
    affine: npt.NDArray[np.float64],
    pc: PreprocessConfig,
) -> TransformedCase:
    """Apply training's orientation, spacing, foreground crop, intensity scaling and derived label to one case.

    This is the single implementation used by preprocessing
    (:func:`medsynth.data.preprocess.process_case`) and by synthesis from mask files
    (:mod:`medsynth.synthesis.native`). Without an image (a mask alone) only the
    geometric transforms run; the foreground crop then uses the mask's non-background voxels in
    place of the image's non-zero voxels, and no label is derived.

    Args:
        image: Raw image ``(*S)`` in the mask's geometry, a multi-contrast ``(C, *S)``, or None.
        mask: Remapped integer labels ``(*S)``.
        affine: ``(D+1, D+1)`` RAS affine shared by image and mask.
        pc: Preprocessing config.

    Returns:
        A :class:`TransformedCase`.
    """
    ndim = int(np.asarray(mask).ndim)
    stand_in = image if image is not None else (np.asarray(mask) > 0).astype(np.float32)
    multi = np.asarray(stand_in).ndim == ndim + 1
    d = Compose(geometry_transforms(pc, ndim))(
        {
            IMAGE: to_meta(np.asarray(stand_in), affine, torch.float32, channels=multi),
            MASK: to_meta(np.asarray(mask), affine, torch.float32),
        }
    )
    source_ranges = intensity_source_ranges(d[IMAGE], pc.intensity) if image is not None else None
    if image is not None:
        d = intensity_transform(pc.intensity)(d)
    mask_np = np.asarray(d[MASK][0]).round().astype(np.int64)
    orig_fg = mask_np > 0
    out_image = d[IMAGE] if image is not None else None
    if image is not None and pc.derived_label.enabled:
        derived = foreground_label(np.asarray(d[IMAGE][0]), pc.derived_label)
        mask_np = merge_derived(mask_np, derived, pc.derived_label.index)
    aff = np.asarray(d[MASK].affine, dtype=np.float64)
    return TransformedCase(out_image, mask_np, orig_fg, aff, source_ranges)


def to_model_grid(
    tc: TransformedCase, pc: PreprocessConfig
) -> tuple[npt.NDArray[np.float32] | None, npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    """Crop/pad a whole transformed case to ``preprocess.spatial_size`` (as training's whole items).

    Returns:
        ``(image (C, *S) float32 or None, mask (1, *S) uint8, affine (D+1, D+1))``.
    """
    image = np.asarray(tc.image) if tc.image is not None else np.zeros((1, *tc.mask.shape), np.float32)
    d = pad_crop_transform(pc.spatial_size)(
        {
            IMAGE: to_meta(image, tc.affine, torch.float32, channels=True),
            MASK: to_meta(tc.mask, tc.affine, torch.float32),
        }
    )
    img = np.asarray(d[IMAGE], dtype=np.float32) if tc.image is not None else None
    return img, np.asarray(d[MASK]).round().astype(np.uint8), np.asarray(d[MASK].affine, dtype=np.float64)
