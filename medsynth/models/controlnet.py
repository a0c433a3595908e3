"""ControlNet on the full-resolution one-hot mask, its initialisation and the controlled UNet.

The ControlNet's conditioning embedding takes the mask at *image* resolution and downsamples it by
the autoencoder's factor (one stride-2 stage per halving), so thin structures are seen before they are
lost at latent resolution. ``monai.inferers.ControlNetLatentDiffusionInferer`` instead resizes the mask
to the latent size first, so it must not be used with networks built here.
"""

from __future__ import annotations

from typing import Self, cast

import torch
import torch.nn.functional as F
from monai.networks.nets.controlnet import ControlNet
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet
from torch import nn

from medsynth.config.generative import ControlNetConfig, DiffusionUNetConfig
from medsynth.models.unet import encoder_kwargs

_UNET_ONLY_PREFIXES = ("up_blocks.", "out.")
_CONTROLNET_ONLY_PREFIXES = ("controlnet_",)


def embedding_channels(cfg: ControlNetConfig, downsample_factor: int) -> tuple[int, ...]:
    """Checks that the mask embedding downsamples by exactly ``downsample_factor``.

    MONAI's ``ControlNetConditioningEmbedding`` has ``len(channels) - 1`` stride-2 stages, so the tuple
    length must be ``log2(downsample_factor) + 1``.

    Args:
        cfg: ControlNet section.
        downsample_factor: The autoencoder's image-to-latent factor (a power of two, >= 1).

    Returns:
        ``cfg.network.conditioning_embedding_num_channels``.

    Raises:
        ValueError: If the factor is not a power of two or the tuple length does not match it.
    """
    if downsample_factor < 1 or downsample_factor & (downsample_factor - 1):
        raise ValueError(f"downsample_factor must be a power of two >= 1, got {downsample_factor}")
    channels = cfg.network.conditioning_embedding_num_channels
    expected = downsample_factor.bit_length()  # log2(factor) + 1
    if len(channels) != expected:
        raise ValueError(
            f"conditioning_embedding_num_channels={channels} has {len(channels) - 1} stride-2 stages "
            f"(downsampling {2 ** (len(channels) - 1)}x) but the autoencoder downsamples "
            f"{downsample_factor}x: give {expected} entries"
        )
    return channels


def build_controlnet(
    cfg: ControlNetConfig,
    unet_cfg: DiffusionUNetConfig,
    spatial_dims: int,
    latent_channels: int,
    num_mask_channels: int,
    downsample_factor: int,
) -> ControlNet:
    """Builds a ControlNet mirroring the diffusion UNet's encoder, conditioned on the full-size mask.

    Args:
        cfg: ControlNet section.
        unet_cfg: Diffusion UNet section (the ControlNet copies its encoder architecture).
        spatial_dims: 2 or 3.
        latent_channels: Channels of the autoencoder latent.
        num_mask_channels: Channels of the one-hot mask (number of classes, background included).
        downsample_factor: The autoencoder's image-to-latent factor.

    Returns:
        A ``ControlNet`` whose ``forward(x, timesteps, controlnet_cond, conditioning_scale)`` takes latents
        (B, latent_channels, *L) and a mask (B, num_mask_channels, *L * downsample_factor) and returns
        ``(down_residuals, mid_residual)``, all zero until its zero-initialised convolutions are trained.

    Raises:
        ValueError: If the mask embedding does not downsample by ``downsample_factor``.
    """
    return ControlNet(
        **encoder_kwargs(unet_cfg, spatial_dims, latent_channels),
        conditioning_embedding_in_channels=num_mask_channels,
        conditioning_embedding_num_channels=embedding_channels(cfg, downsample_factor),
    )


def fuse_swish(module: nn.Module) -> int:
    """Replace MONAI ``Swish`` activations (``x * sigmoid(alpha * x)``, alpha 1) by ``nn.SiLU`` in place.

    The same function in one fused kernel instead of three elementwise passes (and their saved
    tensors): MONAI's ControlNet conditioning embedding uses ``Swish`` at full mask resolution, where
    it costs about 8% of a CPU training step. Values agree to float rounding (not bit for bit), so
    the training loop applies it only under mixed precision, keeping fp32 runs bit-identical.

    Args:
        module: Any network (no parameters are touched).

    Returns:
        The number of activations replaced.
    """
    from monai.networks.blocks.activation import Swish

    n = 0
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, Swish) and float(child.alpha) == 1.0:
                setattr(parent, name, nn.SiLU())
                n += 1
    return n


def init_controlnet_from_unet(controlnet: ControlNet, unet: DiffusionModelUNet) -> tuple[list[str], list[str]]:
    """Copies the trained UNet's encoder weights into the ControlNet (in place).

    The ControlNet-only parts (mask embedding, zero convolutions) keep their initialisation, so the
    controlled UNet equals the base UNet until the ControlNet is trained.

    Args:
        controlnet: The ControlNet to initialise.
        unet: The trained base UNet with the same encoder architecture.

    Returns:
        ``(missing_keys, unexpected_keys)`` of the non-strict load, for logging: the ControlNet-only
        keys and the UNet decoder keys respectively.

    Raises:
        ValueError: If a key outside those expected groups is missing or unexpected, i.e. the two
            architectures differ in a way that a non-strict load would silently skip.
    """
    result = controlnet.load_state_dict(unet.state_dict(), strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    odd = [k for k in missing if not k.startswith(_CONTROLNET_ONLY_PREFIXES)]
    odd += [k for k in unexpected if not k.startswith(_UNET_ONLY_PREFIXES)]
    if odd:
        raise ValueError(f"ControlNet and UNet architectures differ; unmatched keys: {odd[:8]}")
    return missing, unexpected


def one_hot_mask(
    mask_int: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32, check: bool = True
) -> torch.Tensor:
    """One-hot encodes a label map in MONAI's channel-first layout.

    Args:
        mask_int: Labels (B, 1, *S) with integer values in [0, num_classes); an integer dtype, or a
            floating dtype holding whole numbers.
        num_classes: Number of classes, background included.
        dtype: Output dtype.
        check: Validate the values (reads them back: a host sync on a GPU). Training loops validate
            their whole split once and pass False per batch.

    Returns:
        One-hot mask (B, num_classes, *S) with values in {0, 1}.

    Raises:
        ValueError: On a wrong shape, or (when ``check``) non-integral values or labels outside
            [0, num_classes).
    """
    if mask_int.ndim < 3 or mask_int.shape[1] != 1:
        raise ValueError(f"expected a label map of shape (B, 1, *spatial), got {tuple(mask_int.shape)}")
    if not check:  # scatter: no read-back of the labels (F.one_hot checks their range)
        shape = (mask_int.shape[0], num_classes, *mask_int.shape[2:])
        out = torch.zeros(shape, dtype=dtype, device=mask_int.device)
        return out.scatter_(1, mask_int.long(), 1.0)
    if mask_int.is_floating_point() and not torch.equal(mask_int, mask_int.round()):
        raise ValueError("floating-point label map holds non-integral values")
    labels = mask_int[:, 0].long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels span [{int(labels.min())}, {int(labels.max())}] outside [0, {num_classes})")
    return F.one_hot(labels, num_classes).movedim(-1, 1).to(dtype)


class ControlledUNet(nn.Module):
    """A frozen base UNet steered by a trainable ControlNet.

    Attributes:
        unet: The base denoiser; frozen (no gradients, kept in eval mode) when ``freeze_unet``.
        controlnet: The ControlNet whose residuals are added to the UNet's skip and middle features.
        conditioning_scale: Multiplier of the ControlNet residuals.
        num_mask_channels: Channels the mask must have.
        mask_downsample_factor: Factor by which the mask side exceeds the latent side.
    """

    def __init__(
        self,
        unet: DiffusionModelUNet,
        controlnet: ControlNet,
        conditioning_scale: float = 1.0,
        freeze_unet: bool = True,
    ) -> None:
        """Wraps the two networks, checking that their residuals line up.

        Args:
            unet: The base denoiser.
            controlnet: A ControlNet built with the same encoder architecture.
            conditioning_scale: Multiplier of the ControlNet residuals.
            freeze_unet: Disable the UNet's gradients and keep it in eval mode.

        Raises:
            ValueError: If the ControlNet's residuals do not match the UNet's skip connections (the
                UNet would silently drop extra or missing residuals).
        """
        super().__init__()
        n_skips = sum(len(cast(nn.ModuleList, block.resnets)) for block in unet.up_blocks)
        if (
            tuple(controlnet.block_out_channels) != tuple(unet.block_out_channels)
            or len(controlnet.controlnet_down_blocks) != n_skips
            or controlnet.in_channels != unet.in_channels
        ):
            raise ValueError("ControlNet encoder architecture does not match the UNet's")
        self.unet = unet
        self.controlnet = controlnet
        self.conditioning_scale = conditioning_scale
        self.freeze_unet = freeze_unet
        embedding = controlnet.controlnet_cond_embedding
        self.num_mask_channels: int = next(embedding.conv_in.parameters()).shape[1]
        # the embedding's blocks alternate a stride-1 and a stride-2 convolution
        self.mask_downsample_factor: int = 2 ** (len(embedding.blocks) // 2)
        if freeze_unet:
            self.unet.requires_grad_(False)
            self.unet.eval()

    def train(self, mode: bool = True) -> Self:
        """Sets training mode, keeping a frozen UNet in eval mode."""
        super().train(mode)
        if self.freeze_unet:
            self.unet.eval()
        return self

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None,
        conditioning_scale: float | None = None,
    ) -> torch.Tensor:
        """Predicts with the mask's ControlNet residuals, or with the base UNet alone.

        Args:
            x: Noisy latents (B, C_latent, *L).
            t: Timesteps (B,), integer or float as the scheduler provides.
            cond: One-hot mask (B, num_mask_channels, *L * mask_downsample_factor) with values in {0, 1},
                or None for the unconditional prediction (base UNet alone, as in classifier-free
                guidance with mask dropout).
            conditioning_scale: Overrides ``self.conditioning_scale`` for this call.

        Returns:
            The UNet prediction (B, C_latent, *L).

        Raises:
            ValueError: If the mask's channels or size do not fit the latents.
        """
        if cond is None:
            out: torch.Tensor = self.unet(x, t)
            return out
        expected = (
            x.shape[0],
            self.num_mask_channels,
            *(s * self.mask_downsample_factor for s in x.shape[2:]),
        )
        if tuple(cond.shape) != expected:
            raise ValueError(
                f"mask shape {tuple(cond.shape)} does not fit latents {tuple(x.shape)}: expected {expected}"
            )
        scale = self.conditioning_scale if conditioning_scale is None else conditioning_scale
        down, mid = self.controlnet(x=x, timesteps=t, controlnet_cond=cond.to(x.dtype), conditioning_scale=scale)
        out = self.unet(x, t, down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        return out
