"""Multi-contrast cases read as one C-channel image (``data.channels``).

A case's channels come from several files (CSV ``image_0``, ``image_1``...; nnU-Net ``X_0000``,
``X_0001``...; :attr:`medsynth.data.cases.Case.extra_images`) or from the last axis of one 4D
NIfTI. Channel 0 defines the grid: the other channels are resampled onto it (linear) when their
geometry differs, provided they cover the same part of the world (co-registered scans stored at
another resolution or crop); a channel of another dimensionality, or one whose field of view
barely overlaps channel 0's, is a one-line error naming its file. Intensities are left as read:
each channel is normalised on its own later (:mod:`medsynth.data.transforms`).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import numpy.typing as npt

from medsynth.config.data import DataConfig
from medsynth.data.cases import Case
from medsynth.data.io import ImageData, image_channels, read_channels, read_image, resample_to
from medsynth.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["MIN_OVERLAP", "read_case_image", "world_overlap"]

MIN_OVERLAP = 0.5
"""Least fraction of channel 0's world box another channel must cover to be resampled onto it."""


def _box(shape: tuple[int, ...], affine: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], ...]:
    d = len(shape)
    corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in shape])), dtype=np.float64)
    world = corners @ affine[:d, :d].T + affine[:d, d]
    return world.min(0), world.max(0)


def world_overlap(
    shape: tuple[int, ...],
    affine: npt.NDArray[np.float64],
    ref_shape: tuple[int, ...],
    ref_affine: npt.NDArray[np.float64],
) -> float:
    """Fraction of the reference grid's world bounding box that another grid's box covers (0..1)."""
    lo, hi = _box(shape, affine)
    rlo, rhi = _box(ref_shape, ref_affine)
    inter = np.clip(np.minimum(hi, rhi) - np.maximum(lo, rlo), 0.0, None)
    return float(np.prod(inter) / max(float(np.prod(rhi - rlo)), 1e-12))


def _same_grid(a: ImageData, b: ImageData) -> bool:
    return a.array.shape == b.array.shape and np.allclose(a.affine, b.affine, atol=1e-4)


def _on_grid(img: ImageData, ref: ImageData, k: int, names: tuple[str, ...]) -> npt.NDArray[np.float32]:
    what = f"channel {k} ({names[k]})"
    if img.ndim != ref.ndim:
        raise DataError(img.path, f"{what} is {img.ndim}D but channel 0 ({ref.path.name}) is {ref.ndim}D")
    if _same_grid(img, ref):
        return np.asarray(img.array, dtype=np.float32)
    cover = world_overlap(img.array.shape, img.affine, ref.array.shape, ref.affine)
    if cover < MIN_OVERLAP:
        raise DataError(
            img.path,
            f"{what} covers {cover:.0%} of channel 0's field of view ({ref.path.name}; shape {ref.array.shape} vs "
            f"{img.array.shape}): the channels of a case must be co-registered",
        )
    log.info("%s: %s resampled onto channel 0's grid %s", img.path, what, ref.array.shape)
    return resample_to(img.array, img.affine, tuple(ref.array.shape), ref.affine, "linear").astype(np.float32)


def read_case_image(case: Case, data: DataConfig) -> ImageData:
    """Read a case's image: one channel (``data.channel``), or every channel of ``data.channels``.

    Args:
        case: The case (``image`` is channel 0; ``extra_images`` the others, or none for a 4D file).
        data: Data config (``channels`` names the contrasts, ``channel`` picks one of a 4D file).

    Returns:
        An :class:`ImageData` of channel 0; for multi-contrast configs its ``channels`` holds
        ``(C, *S)`` float32, every channel on channel 0's grid.

    Raises:
        DataError: Unreadable file, a missing channel, or a channel that is not co-registered (naming the file).
    """
    c = data.n_channels
    if c == 1:
        return read_image(case.image, "image", channel=data.channel)
    if case.extra_images:
        if len(case.images) != c:
            raise DataError(case.image, f"case {case.case_id} has {len(case.images)} image files, expected {c}")
        imgs = [read_image(p, "image") for p in case.images]
    else:
        n = image_channels(case.image)
        if n != c:
            raise DataError(
                case.image,
                f"has {n} channel(s) but data.channels lists {c} ({', '.join(data.channels)}); give one file per "
                "channel (CSV image_0.., nnU-Net X_0000..) or a 4D NIfTI with the channels on its last axis",
            )
        imgs = read_channels(case.image)  # the file read once, split along its last axis
    ref = imgs[0]
    stack = np.stack(
        [ref.array.astype(np.float32)] + [_on_grid(im, ref, k, data.channels) for k, im in enumerate(imgs) if k]
    )
    return ImageData(ref.array, ref.affine, ref.path, channels=stack)
