"""Conditioning labels derived from the image itself (head/brain foreground)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.transforms import FillHoles, KeepLargestConnectedComponent

from medsynth.config.preprocess import DerivedLabelConfig


def otsu_threshold(values: npt.NDArray[np.floating], bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample of intensities (maximises between-class variance)."""
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max()) == float(values.min()):
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values, nbins=bins))


def foreground_label(image: npt.NDArray[np.floating], cfg: DerivedLabelConfig) -> npt.NDArray[np.bool_]:
    """Binary foreground of a normalised image: threshold, fill holes, keep the largest component.

    Args:
        image: Normalised intensities, shape ``(*S)`` (2D or 3D), background near 0.
        cfg: Threshold and morphology switches.

    Returns:
        Boolean foreground mask of shape ``(*S)``.
    """
    img = np.asarray(image, dtype=np.float32)
    if cfg.threshold == "otsu":
        # over every voxel, background included: Otsu must separate the head from the background.
        # Over the non-zero voxels only it split tissues (a uniform head gave an empty label).
        thr = otsu_threshold(img.ravel())
    else:
        thr = float(cfg.threshold)
    fg = img > thr
    if not fg.any():
        return fg
    t: Any = torch.as_tensor(fg[None].astype(np.uint8))
    if cfg.fill_holes:
        t = FillHoles(applied_labels=[1])(t)
    if cfg.largest_component:
        t = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False)(t)
    return np.asarray(t[0] > 0)


def merge_derived(mask: npt.NDArray[np.integer], derived: npt.NDArray[np.bool_], index: int) -> npt.NDArray[np.int64]:
    """Merge a derived binary label into a mask; existing non-background labels keep priority.

    Args:
        mask: Integer labels ``(*S)``.
        derived: Boolean derived label ``(*S)``.
        index: Label index given to derived voxels that are background in ``mask``.

    Returns:
        Merged int64 labels ``(*S)``.
    """
    out = np.asarray(mask, dtype=np.int64).copy()
    out[(out == 0) & derived] = index
    return out
