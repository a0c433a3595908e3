"""Tiled (sliding-window) autoencoder decoding and encoding agree with whole-volume runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from medsynth.config.generative import AutoencoderConfig, TilingConfig
from medsynth.models.autoencoder import build_autoencoder
from medsynth.models.tiling import decode_latents, encode_latent_means, use_tiles

torch.set_num_threads(1)


class _Spy:
    """An autoencoder wrapper recording the latent sides each ``decode`` call sees."""

    def __init__(self, ae: Any) -> None:
        self.ae, self.sides = ae, []  # type: list[tuple[int, ...]]

    def decode(self, z: Tensor) -> Tensor:
        self.sides.append(tuple(z.shape[2:]))
        out: Tensor = self.ae.decode(z)
        return out


@pytest.fixture(scope="module")
def ae3d() -> Any:
    cfg = AutoencoderConfig.model_validate(
        {
            "network": {
                "channels": [8, 8],
                "latent_channels": 2,
                "num_res_blocks": 1,
                "norm_num_groups": 4,
                "attention_levels": [False, False],
            }
        }
    )
    torch.manual_seed(0)
    return build_autoencoder(cfg, 3).eval()  # factor 2


def _tiles(tile: int, overlap: float = 0.5, above: int | None = 0) -> TilingConfig:
    return TilingConfig(above_voxels=above, tile=(tile,) * 3, overlap=overlap)


@torch.no_grad()
def test_below_the_threshold_decodes_whole(ae3d: Any) -> None:
    z = torch.randn(1, 2, 8, 8, 8)
    spy = _Spy(ae3d)
    out = decode_latents(spy, z, 2, _tiles(8, above=16**3))  # 16^3 image voxels: not above
    assert spy.sides == [(8, 8, 8)] and torch.equal(out, ae3d.decode(z))
    assert not use_tiles([16, 16, 16], None) and use_tiles([16, 16, 17], _tiles(8, above=16**3))


@torch.no_grad()
def test_one_tile_covering_the_volume_equals_the_whole_decode(ae3d: Any) -> None:
    z = torch.randn(1, 2, 8, 8, 8)
    assert torch.allclose(decode_latents(ae3d, z, 2, _tiles(16)), ae3d.decode(z), atol=1e-5)


@torch.no_grad()
def test_tiled_decode_agrees_with_untiled(ae3d: Any) -> None:
    torch.manual_seed(1)
    z = torch.randn(2, 2, 16, 16, 16)
    full = ae3d.decode(z)
    spy = _Spy(ae3d)
    tiled = decode_latents(spy, z, 2, _tiles(16))  # image tile 16^3 = latent tile 8^3
    assert tiled.shape == full.shape
    assert len(spy.sides) > 8 and max(max(s) for s in spy.sides) == 8  # really tiled, memory set by the tile
    # per-tile GroupNorm statistics make it approximate; random-init networks are the worst case
    err = (tiled - full).abs().mean() / full.std()
    assert err < 0.35
    assert torch.corrcoef(torch.stack([tiled.flatten(), full.flatten()]))[0, 1] > 0.9
    # larger tiles (more context per tile) get closer
    bigger = decode_latents(ae3d, z, 2, _tiles(24))
    assert (bigger - full).abs().mean() / full.std() < err


@torch.no_grad()
def test_tiled_encode_agrees_with_untiled(ae3d: Any) -> None:
    torch.manual_seed(2)
    x = torch.rand(1, 1, 32, 32, 32)
    full = ae3d.encode(x)[0]
    tiled = encode_latent_means(ae3d, x, 2, _tiles(16))
    assert tiled.shape == full.shape == (1, 2, 16, 16, 16)
    assert (tiled - full).abs().mean() / full.std() < 0.35
    assert torch.corrcoef(torch.stack([tiled.flatten(), full.flatten()]))[0, 1] > 0.9


def test_tile_must_fit_the_autoencoder_factor(ae3d: Any) -> None:
    with pytest.raises(ValueError, match="multiple of the autoencoder factor"):
        decode_latents(ae3d, torch.randn(1, 2, 8, 8, 8), 2, _tiles(15))
