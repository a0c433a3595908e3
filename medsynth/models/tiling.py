"""Tiled (sliding-window) autoencoder decoding and encoding: peak memory set by the tile, not the volume.

Large 3D volumes are decoded (sampling) and encoded (latent cache) on overlapping tiles with MONAI's
``sliding_window_inference``, whose blending handles a predictor that changes the spatial size by a
constant factor (the autoencoder's). Below the configured size the whole image runs at once, exactly
as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from medsynth.config.generative import TilingConfig
from medsynth.models.autoencoder import encode_mean


def use_tiles(image_spatial: Sequence[int], tiling: TilingConfig | None) -> bool:
    """True when an image of ``image_spatial`` voxels is above the tiling threshold."""
    if tiling is None or tiling.above_voxels is None:
        return False
    return math.prod(int(s) for s in image_spatial) > tiling.above_voxels


def _roi(tiling: TilingConfig, spatial: Sequence[int], scale: int, divide: bool) -> list[int]:
    """The tile in the input's voxels (image tile / ``scale`` when ``divide``), at most the input size."""
    tile = list(tiling.tile[: len(spatial)])
    if len(tile) != len(spatial):
        raise ValueError(f"tiling.tile {tiling.tile} has fewer sides than the {len(spatial)}D input")
    if any(t % scale for t in tile):
        raise ValueError(f"tiling.tile {tiling.tile} must be a multiple of the autoencoder factor {scale}")
    sides = [t // scale for t in tile] if divide else tile
    return [min(int(s), int(n)) for s, n in zip(sides, spatial, strict=True)]


def _sliding(x: Tensor, roi: Sequence[int], tiling: TilingConfig, predictor: Callable[[Tensor], Tensor]) -> Tensor:
    from monai.inferers import sliding_window_inference

    out: Any = sliding_window_inference(
        x,
        roi_size=list(roi),
        sw_batch_size=tiling.batch,
        predictor=predictor,
        overlap=tiling.overlap,
        mode=tiling.mode,
        progress=False,
    )
    return out.as_tensor() if hasattr(out, "as_tensor") else out  # type: ignore[no-any-return]


def decode_latents(ae: Any, z: Tensor, factor: int, tiling: TilingConfig | None = None) -> Tensor:
    """Decode unscaled latents, on overlapping tiles when the image is above ``tiling.above_voxels``.

    Args:
        ae: The autoencoder (``AutoencoderKL``; eval mode, under ``no_grad`` for inference).
        z: Unscaled latents ``(B, C, *L)``.
        factor: The autoencoder's image-to-latent factor.
        tiling: Tiling settings (None: never tile).

    Returns:
        Images ``(B, 1, *L * factor)``.
    """
    spatial = [int(s) * factor for s in z.shape[2:]]
    if not use_tiles(spatial, tiling):
        out: Tensor = ae.decode(z)
        return out
    assert tiling is not None
    return _sliding(z, _roi(tiling, z.shape[2:], factor, divide=True), tiling, ae.decode)


def encode_latent_means(ae: Any, x: Tensor, factor: int, tiling: TilingConfig | None = None) -> Tensor:
    """Latent means of images, on overlapping tiles when the image is above ``tiling.above_voxels``.

    Args:
        ae: The autoencoder.
        x: Images ``(B, 1, *S)``.
        factor: The autoencoder's image-to-latent factor.
        tiling: Tiling settings (None: never tile).

    Returns:
        Unscaled latent means ``(B, C, *S / factor)``.
    """
    if not use_tiles(x.shape[2:], tiling):
        return encode_mean(ae, x)
    assert tiling is not None
    return _sliding(x, _roi(tiling, x.shape[2:], factor, divide=False), tiling, lambda t: encode_mean(ae, t))
