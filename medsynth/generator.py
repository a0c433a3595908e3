"""The trained generator: autoencoder + diffusion UNet (+ ControlNet) behind one ``generate`` call.

Generator assembly (weight names, loading the networks from checkpoints, the objective) lives here,
below both ``training`` (which trains these networks) and ``synthesis`` (which samples from them), so
neither of the two imports the other.

Networks and samplers meet only through the narrow ``denoise(x, t, cond)`` signature: this module
builds that callable from the networks, and :mod:`medsynth.diffusion.samplers` integrates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medsynth.checkpoint import Checkpoint, find_checkpoint
from medsynth.config.generative import TilingConfig
from medsynth.config.schema import MedsynthConfig
from medsynth.config.stages import SamplingConfig
from medsynth.diffusion.denoiser import Denoiser
from medsynth.diffusion.guidance import cfg_denoiser
from medsynth.diffusion.objectives import DiffusionObjective, build_objective
from medsynth.diffusion.samplers import sample
from medsynth.errors import DataError
from medsynth.models.autoencoder import build_autoencoder, downsample_factor
from medsynth.models.controlnet import ControlledUNet, build_controlnet, one_hot_mask
from medsynth.models.tiling import decode_latents
from medsynth.models.unet import build_diffusion_unet

UNET, UNET_EMA, CONTROLNET, CONTROLNET_EMA = "unet", "unet_ema", "controlnet", "controlnet_ema"
AE, AE_EMA = "autoencoder", "autoencoder_ema"


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def load_autoencoder(cfg: MedsynthConfig, ckpt: Checkpoint, device: torch.device) -> tuple[torch.nn.Module, float]:
    """Rebuild the autoencoder from a checkpoint (EMA weights when present) and its scale factor."""
    ae = build_autoencoder(cfg.autoencoder, cfg.preprocess.spatial_dims, cfg.data.n_channels)
    name = AE_EMA if (ckpt.path / f"{AE_EMA}.safetensors").is_file() else AE
    weights = ckpt.weights(name)
    weights = {k.removeprefix("module."): v for k, v in weights.items() if k != "n_averaged"}
    ae.load_state_dict(weights)
    ae.to(device).eval()
    return _unwrap(ae), float(ckpt.extras["scale_factor"])


def unconditional(unet: torch.nn.Module) -> Denoiser:
    """A :data:`Denoiser` for a plain ``DiffusionModelUNet`` (the conditioning is ignored)."""

    def denoise(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        out: Tensor = unet(x, timesteps=t)
        return out

    return denoise


def ema_weights(ckpt: Checkpoint, name: str, ema_name: str) -> dict[str, Tensor]:
    """Inference weights of a network: the EMA copy when saved (``module.`` prefix removed), else raw."""
    if (ckpt.path / f"{ema_name}.safetensors").is_file():
        w = ckpt.weights(ema_name)
        return {k.removeprefix("module."): v for k, v in w.items() if k != "n_averaged"}
    return ckpt.weights(name)


def make_objective(cfg: MedsynthConfig, latent_spatial: Sequence[int]) -> DiffusionObjective:
    """The diffusion objective of a config for latents of spatial shape ``latent_spatial``."""
    d = cfg.diffusion
    return build_objective(
        d.objective, d.num_train_timesteps, d.schedule, cfg.preprocess.spatial_dims, list(latent_spatial)
    )


def latent_spatial_shape(cfg: MedsynthConfig) -> list[int]:
    """Spatial shape of the latent for the config's image size."""
    f = downsample_factor(cfg.autoencoder)
    return [s // f for s in cfg.preprocess.spatial_size]


def latent_channels(cfg: MedsynthConfig) -> int:
    """Number of latent channels of the autoencoder."""
    return int(cfg.autoencoder.network.latent_channels)


def load_unet(cfg: MedsynthConfig, run_dir: str | Path, device: torch.device) -> torch.nn.Module:
    """The trained diffusion UNet (EMA weights) from a run folder's final checkpoint."""
    ckpt = find_checkpoint(run_dir, "final")
    if ckpt is None:
        raise DataError(run_dir, "no final diffusion UNet checkpoint", hint="train the diffusion UNet first")
    unet = build_diffusion_unet(cfg.diffusion, cfg.preprocess.spatial_dims, latent_channels(cfg))
    unet.load_state_dict(ema_weights(ckpt, UNET, UNET_EMA))
    out: torch.nn.Module = unet.to(device).eval()
    return out


def build_controlled(cfg: MedsynthConfig, unet: torch.nn.Module, num_classes: int) -> ControlledUNet:
    """A fresh ControlNet (initialised from ``unet``) wrapped with the frozen ``unet``."""
    from medsynth.models.controlnet import init_controlnet_from_unet

    cn = build_controlnet(
        cfg.controlnet,
        cfg.diffusion,
        cfg.preprocess.spatial_dims,
        latent_channels(cfg),
        num_classes,
        downsample_factor(cfg.autoencoder),
    )
    init_controlnet_from_unet(cn, unet)  # type: ignore[arg-type]
    return ControlledUNet(unet, cn, cfg.controlnet.conditioning_scale)  # type: ignore[arg-type]


@dataclass
class MaskGenerator:
    """Everything needed to turn masks into images.

    Attributes:
        ae: Autoencoder (eval mode).
        denoiser_net: ``ControlledUNet`` (mask-conditioned) or a plain UNet (unconditional).
        objective: The diffusion objective the networks were trained with.
        scale_factor: Latent scale factor.
        num_classes: One-hot mask channels.
        latent_channels: Latent channels.
        device: Device of the networks.
        hashes: SHA-256 of the weight files (provenance).
        tiling: Tiled decoding of large images (None: always decode whole images).
    """

    ae: Any
    denoiser_net: torch.nn.Module
    objective: DiffusionObjective
    scale_factor: float
    num_classes: int
    latent_channels: int
    device: torch.device
    hashes: dict[str, str]
    tiling: TilingConfig | None = None

    @property
    def conditional(self) -> bool:
        """True when the generator follows masks."""
        return isinstance(self.denoiser_net, ControlledUNet)

    def denoiser(self) -> Denoiser:
        """The ``denoise(x, t, cond)`` callable (cond: one-hot mask ``(B, K, *S)`` or None)."""
        net = self.denoiser_net
        if isinstance(net, ControlledUNet):
            return net  # type: ignore[return-value]
        return unconditional(net)

    @torch.no_grad()
    def generate(
        self,
        masks: Tensor | None,
        sampling: SamplingConfig,
        seed: int,
        n: int | None = None,
        image_shape: Sequence[int] | None = None,
    ) -> Tensor:
        """Generate images for a batch of masks.

        Args:
            masks: ``(B, 1, *S)`` integer labels, or None for unconditional samples (then give ``n``
                and ``image_shape``).
            sampling: Sampler, steps, guidance scale, eta.
            seed: Seed of the initial noise and any ancestral noise.
            n: Number of images when ``masks`` is None.
            image_shape: Spatial image shape when ``masks`` is None.

        Returns:
            ``(B, 1, *S)`` float32 images clamped to ``[0, 1]`` (the preprocessing intensity scale).
        """
        self.denoiser_net.eval()
        if masks is not None:
            b, spatial = masks.shape[0], list(masks.shape[2:])
            cond: Tensor | None = one_hot_mask(masks.to(self.device).long(), self.num_classes)
        else:
            if n is None or image_shape is None:
                raise ValueError("unconditional generation needs n and image_shape")
            b, spatial, cond = n, list(image_shape), None
        f = self.ae_factor
        shape = [b, self.latent_channels, *[s // f for s in spatial]]
        denoise = self.denoiser()
        scale = sampling.scale
        if cond is not None and scale != 1.0:
            denoise = cfg_denoiser(denoise, scale, null_cond=torch.zeros_like(cond))
        g = torch.Generator(device=self.device).manual_seed(seed)
        z = sample(
            denoise,
            shape,
            sampler=sampling.sampler,
            steps=sampling.steps,
            objective=self.objective,
            generator=g,
            device=self.device,
            cond=cond,
            eta=sampling.eta,
        )
        img = decode_latents(self.ae, z / self.scale_factor, f, self.tiling)
        return img.float().clamp(0, 1).cpu()  # type: ignore[no-any-return]

    @property
    def ae_factor(self) -> int:
        """Spatial downsampling factor of the autoencoder."""
        return int(2 ** (len(self.ae.encoder.channels) - 1))


def load_generator(
    cfg: MedsynthConfig,
    ae_run: str | Path,
    unet_run: str | Path,
    controlnet_run: str | Path | None,
    device: torch.device,
    num_classes: int | None = None,
) -> MaskGenerator:
    """Assemble a :class:`MaskGenerator` from the final checkpoints of the training stages."""
    ae_ckpt = find_checkpoint(ae_run, "final")
    if ae_ckpt is None:
        raise DataError(ae_run, "no final autoencoder checkpoint", hint="train the autoencoder first")
    ae, scale = load_autoencoder(cfg, ae_ckpt, device)
    unet = load_unet(cfg, unet_run, device)
    unet_ckpt = find_checkpoint(unet_run, "final")
    hashes = {
        **{f"autoencoder/{k}": v for k, v in ae_ckpt.file_hashes().items()},
        **{f"unet/{k}": v for k, v in (unet_ckpt.file_hashes() if unet_ckpt else {}).items()},
    }
    if num_classes is not None:
        k = num_classes
    else:
        from medsynth.data.vocabulary import data_labels

        k = max(data_labels(cfg)) + 1
    net: torch.nn.Module = unet
    if controlnet_run is not None:
        cn_ckpt = find_checkpoint(controlnet_run, "final")
        if cn_ckpt is None:
            raise DataError(controlnet_run, "no final ControlNet checkpoint", hint="train the ControlNet first")
        k = int(cn_ckpt.extras.get("num_classes", k))
        controlled = build_controlled(cfg, unet, k)
        controlled.controlnet.load_state_dict(ema_weights(cn_ckpt, CONTROLNET, CONTROLNET_EMA))
        net = controlled.to(device).eval()
        hashes.update({f"controlnet/{n}": v for n, v in cn_ckpt.file_hashes().items()})
    objective = make_objective(cfg, latent_spatial_shape(cfg))
    return MaskGenerator(ae, net, objective, scale, k, latent_channels(cfg), device, hashes, cfg.autoencoder.tiling)
