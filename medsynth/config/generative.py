"""Configuration of the generative networks: autoencoder, diffusion UNet and ControlNet.

Each top-level section (:class:`AutoencoderConfig`, :class:`DiffusionUNetConfig`,
:class:`ControlNetConfig`) keeps the network *architecture* in a nested ``network`` model (plus
``discriminator`` for the autoencoder). Training knobs belong at the top level of the section, next
to ``network``, so the architecture alone can be stored with a checkpoint and rebuilt from it.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from medsynth.config.base import StrictModel

IntPerLevel = int | tuple[int, ...]
"""An integer applied to every resolution level, or one integer per level."""


def _per_level(value: IntPerLevel, n_levels: int, name: str) -> tuple[int, ...]:
    """Expands an int-or-tuple field to one value per level, checking the tuple length."""
    if isinstance(value, int):
        return (value,) * n_levels
    if len(value) != n_levels:
        raise ValueError(f"{name} has {len(value)} entries but channels has {n_levels} levels")
    return value


def _check_levels(
    channels: tuple[int, ...],
    attention_levels: tuple[bool, ...],
    num_res_blocks: IntPerLevel,
    norm_num_groups: int,
) -> None:
    """Shared checks of a multi-level MONAI network: lengths agree, channels fit the GroupNorm."""
    if not channels or any(c <= 0 for c in channels):
        raise ValueError(f"channels must be a non-empty tuple of positive ints, got {channels}")
    if len(attention_levels) != len(channels):
        raise ValueError(
            f"attention_levels has {len(attention_levels)} entries but channels has {len(channels)} levels"
        )
    if any(n < 1 for n in _per_level(num_res_blocks, len(channels), "num_res_blocks")):
        raise ValueError(f"num_res_blocks must be >= 1 at every level, got {num_res_blocks}")
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"channels {bad} are not multiples of norm_num_groups={norm_num_groups}")


class AutoencoderNetworkConfig(StrictModel):
    """Architecture of the KL autoencoder (``monai.networks.nets.AutoencoderKL``)."""

    channels: tuple[int, ...] = Field(
        default=(32, 64, 64),
        description="Feature channels per resolution level; the image is downsampled by "
        "2**(len(channels) - 1) into the latent.",
    )
    latent_channels: int = Field(default=4, ge=1, description="Number of latent channels.")
    num_res_blocks: IntPerLevel = Field(
        default=2, description="Residual blocks per level (one int for all levels, or one per level)."
    )
    attention_levels: tuple[bool, ...] = Field(
        default=(False, False, False), description="Whether each level has self-attention."
    )
    norm_num_groups: int = Field(
        default=32, ge=1, description="GroupNorm groups; every entry of channels must be a multiple."
    )
    norm_eps: float = Field(default=1e-6, gt=0, description="GroupNorm epsilon.")
    with_encoder_nonlocal_attn: bool = Field(
        default=False,
        description="Add MONAI's non-local attention block at the deepest encoder level (MONAI's own "
        "default is True, independently of attention_levels).",
    )
    with_decoder_nonlocal_attn: bool = Field(
        default=False, description="Add the non-local attention block at the deepest decoder level."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_levels(self.channels, self.attention_levels, self.num_res_blocks, self.norm_num_groups)
        return self


class DiscriminatorNetworkConfig(StrictModel):
    """Architecture of the adversarial patch discriminator (``PatchDiscriminator``)."""

    channels: int = Field(default=32, ge=1, description="Channels of the first convolution (doubled per layer).")
    num_layers_d: int = Field(
        default=3,
        ge=1,
        description="Strided layers; the input side must be large enough (about 2**(num_layers_d + 2)).",
    )
    norm: Literal["BATCH", "INSTANCE"] = Field(default="BATCH", description="Normalisation layer type.")


class TilingConfig(StrictModel):
    """Sliding-window autoencoder decoding (sampling) and encoding (latent cache) of large images.

    Above ``above_voxels`` voxels per image the autoencoder runs on overlapping tiles blended with
    MONAI's ``sliding_window_inference``, so peak memory depends on the tile, not the volume. The
    decoder's GroupNorm statistics are then per tile, so tiled output is close to, not equal to, the
    whole-volume output (``benchmarks/memory.py`` measures the difference).
    """

    above_voxels: int | None = Field(
        884_736,
        ge=0,
        description="Tile images with more voxels than this (default 96^3: every shipped config stays untiled; "
        "0: always; None: never).",
    )
    tile: tuple[int, ...] = Field(
        (64, 64, 64),
        min_length=2,
        max_length=3,
        description="Tile size in image voxels (multiples of the autoencoder factor); 2D uses the first two.",
    )
    overlap: float = Field(0.25, ge=0, lt=1, description="Fraction of a tile shared with its neighbours.")
    mode: Literal["gaussian", "constant"] = Field("gaussian", description="Blending weights of overlapping tiles.")
    batch: int = Field(1, ge=1, description="Tiles run together (more: faster, more memory).")


class AutoencoderConfig(StrictModel):
    """Autoencoder section: network and discriminator architectures (training fields go alongside)."""

    network: AutoencoderNetworkConfig = Field(
        default_factory=AutoencoderNetworkConfig, description="AutoencoderKL architecture."
    )
    discriminator: DiscriminatorNetworkConfig = Field(
        default_factory=DiscriminatorNetworkConfig, description="PatchDiscriminator architecture."
    )
    tiling: TilingConfig = Field(
        default_factory=TilingConfig, description="Tiled decoding/encoding of large images (bounded memory)."
    )


class DiffusionUNetNetworkConfig(StrictModel):
    """Architecture of the latent denoiser (``DiffusionModelUNet``, no cross-attention).

    The ControlNet copies this architecture, so the same fields define its trainable encoder.
    """

    channels: tuple[int, ...] = Field(
        default=(64, 128, 128),
        description="Feature channels per level; latent sides must be divisible by 2**(len(channels) - 1).",
    )
    attention_levels: tuple[bool, ...] = Field(
        default=(False, True, True),
        description="Whether each level's down/up blocks have self-attention. The middle block always has "
        "self-attention in MONAI (so einops is always needed), whatever this says.",
    )
    num_res_blocks: IntPerLevel = Field(
        default=2, description="Residual blocks per level (one int for all levels, or one per level)."
    )
    num_head_channels: IntPerLevel = Field(
        default=32,
        description="Channels per attention head (one int, or one per level). Must divide the level's "
        "channels where attention is on, and always at the last level (the middle block's attention).",
    )
    norm_num_groups: int = Field(
        default=32, ge=1, description="GroupNorm groups; every entry of channels must be a multiple."
    )
    norm_eps: float = Field(default=1e-6, gt=0, description="GroupNorm epsilon.")
    resblock_updown: bool = Field(
        default=False, description="Use residual blocks (instead of plain convolutions) to resample."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_levels(self.channels, self.attention_levels, self.num_res_blocks, self.norm_num_groups)
        heads = _per_level(self.num_head_channels, len(self.channels), "num_head_channels")
        last = len(self.channels) - 1
        for level, (ch, attn, head) in enumerate(zip(self.channels, self.attention_levels, heads, strict=True)):
            if (attn or level == last) and (head < 1 or ch % head):
                raise ValueError(f"level {level}: num_head_channels={head} must be >= 1 and divide channels={ch}")
        return self


class DiffusionUNetConfig(StrictModel):
    """Diffusion UNet section: network architecture (training fields go alongside)."""

    network: DiffusionUNetNetworkConfig = Field(
        default_factory=DiffusionUNetNetworkConfig, description="DiffusionModelUNet architecture."
    )


class ControlNetNetworkConfig(StrictModel):
    """ControlNet-only architecture; the rest is copied from :class:`DiffusionUNetNetworkConfig`."""

    conditioning_embedding_num_channels: tuple[int, ...] = Field(
        default=(16, 32, 64),
        description="Channels of the mask embedding. It has len - 1 stride-2 stages, so its length must be "
        "log2(autoencoder downsample factor) + 1: the full-resolution mask is brought to latent size.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        channels = self.conditioning_embedding_num_channels
        if not channels or any(c <= 0 for c in channels):
            raise ValueError(f"conditioning_embedding_num_channels must be non-empty and positive, got {channels}")
        return self


class ControlNetConfig(StrictModel):
    """ControlNet section: network and conditioning strength (training fields go alongside)."""

    network: ControlNetNetworkConfig = Field(
        default_factory=ControlNetNetworkConfig, description="ControlNet-only architecture."
    )
    conditioning_scale: float = Field(
        default=1.0, ge=0.0, description="Multiplier of the ControlNet residuals (0 = base UNet alone)."
    )
