"""Builders of the autoencoder, discriminator and diffusion UNet, and their configuration."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from medsynth.config.generative import (
    AutoencoderConfig,
    AutoencoderNetworkConfig,
    ControlNetConfig,
    DiffusionUNetConfig,
    DiffusionUNetNetworkConfig,
    DiscriminatorNetworkConfig,
)
from medsynth.models.autoencoder import build_autoencoder, build_discriminator, downsample_factor, encode_mean
from medsynth.models.controlnet import embedding_channels
from medsynth.models.unet import build_diffusion_unet

torch.set_num_threads(1)

AE_CFG = AutoencoderConfig(
    network=AutoencoderNetworkConfig(
        channels=(8, 16), latent_channels=4, num_res_blocks=1, attention_levels=(False, False), norm_num_groups=4
    ),
    discriminator=DiscriminatorNetworkConfig(channels=4, num_layers_d=2),
)
UNET_CFG = DiffusionUNetConfig(
    network=DiffusionUNetNetworkConfig(
        channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=4
    )
)
IMAGE_SIDE = {2: 16, 3: 8}


def _images(spatial_dims: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, *(IMAGE_SIDE[spatial_dims],) * spatial_dims)


def test_default_configs_are_valid_and_mutually_consistent() -> None:
    ae = AutoencoderConfig()
    assert downsample_factor(ae) == 4
    # the default mask embedding downsamples exactly as much as the default autoencoder
    assert len(embedding_channels(ControlNetConfig(), downsample_factor(ae))) == 3
    assert ControlNetConfig().conditioning_scale == 1.0
    assert DiffusionUNetConfig().network.channels == (64, 128, 128)
    for model in (AutoencoderNetworkConfig, DiffusionUNetNetworkConfig, DiscriminatorNetworkConfig):
        assert all(field.description for field in model.model_fields.values()), model.__name__


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        (AutoencoderNetworkConfig, {"channels": (8, 16), "attention_levels": (False,), "norm_num_groups": 4}),
        (AutoencoderNetworkConfig, {"channels": (8, 12), "attention_levels": (False, False), "norm_num_groups": 8}),
        (
            AutoencoderNetworkConfig,
            {"channels": (8, 16), "attention_levels": (False, False), "norm_num_groups": 4, "num_res_blocks": (1,)},
        ),
        (
            DiffusionUNetNetworkConfig,
            {"channels": (8, 16), "attention_levels": (False, True), "norm_num_groups": 4, "num_head_channels": 6},
        ),
        (
            DiffusionUNetNetworkConfig,
            {
                "channels": (8, 16),
                "attention_levels": (False, True),
                "norm_num_groups": 4,
                "num_head_channels": (8, 8, 8),
            },
        ),
        (AutoencoderNetworkConfig, {"chanels": (8, 16)}),
    ],
)
def test_config_rejects_inconsistent_levels_and_unknown_keys(model: type, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        model(**kwargs)


def test_config_is_frozen_and_accepts_yaml_lists() -> None:
    net = AutoencoderNetworkConfig.model_validate(
        {"channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 4, "num_res_blocks": [1, 2]}
    )
    assert net.channels == (8, 16) and net.num_res_blocks == (1, 2)
    with pytest.raises(ValidationError):
        net.latent_channels = 8  # type: ignore[misc]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_autoencoder_encode_decode_shapes(spatial_dims: int) -> None:
    torch.manual_seed(0)
    ae = build_autoencoder(AE_CFG, spatial_dims)
    x = _images(spatial_dims)
    latent_side = IMAGE_SIDE[spatial_dims] // downsample_factor(AE_CFG)
    with torch.no_grad():
        z = encode_mean(ae, x)
        recon = ae.decode(z)
    assert z.shape == (2, 4, *(latent_side,) * spatial_dims)
    assert recon.shape == x.shape


def test_encode_mean_is_deterministic_while_a_sample_is_not() -> None:
    torch.manual_seed(0)
    ae = build_autoencoder(AE_CFG, 2).eval()
    x = _images(2)
    with torch.no_grad():
        mean_a, mean_b = encode_mean(ae, x), encode_mean(ae, x)
        z_mu, _ = ae.encode(x)
        sample_a, sample_b = ae.encode_stage_2_inputs(x), ae.encode_stage_2_inputs(x)
    assert torch.equal(mean_a, mean_b)
    assert torch.equal(mean_a, z_mu)
    assert not torch.equal(sample_a, sample_b)
    assert not torch.equal(sample_a, mean_a)


@pytest.mark.parametrize(("spatial_dims", "side", "grid"), [(2, 32, 6), (3, 16, 2)])
def test_discriminator_returns_patch_logits_last(spatial_dims: int, side: int, grid: int) -> None:
    torch.manual_seed(0)
    disc = build_discriminator(AE_CFG, spatial_dims)
    with torch.no_grad():
        features = disc(torch.rand(2, 1, *(side,) * spatial_dims))
    assert isinstance(features, list)
    assert features[-1].shape == (2, 1, *(grid,) * spatial_dims)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_predicts_latent_shape(spatial_dims: int) -> None:
    torch.manual_seed(0)
    unet = build_diffusion_unet(UNET_CFG, spatial_dims, latent_channels=4)
    z = torch.randn(2, 4, *(IMAGE_SIDE[spatial_dims] // 2,) * spatial_dims)
    with torch.no_grad():
        out = unet(z, torch.tensor([0, 999]))
    assert out.shape == z.shape
    assert torch.isfinite(out).all()
