"""DDIM inversion and blended regeneration on the analytic Gaussian toy (exact network predictions).

For N(MU, SIGMA^2) data the DDIM probability-flow map is invertible, so inverting a DDIM sample must
give back the noise it came from, and regenerating from the inverted noise must give back the latent
(both up to the first-order inversion error, which shrinks with the number of steps).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from medsynth.diffusion import CountingDenoiser, Denoiser, DiffusionObjective, build_objective, sample
from medsynth.diffusion.inversion import blended_ddim, ddim_invert, latent_region

torch.set_num_threads(1)

SHAPE = (2, 3, 6, 6)


def gaussian_denoiser(obj: DiffusionObjective, mu: float = 0.5, sigma: float = 0.8) -> Denoiser:
    """Exact epsilon / v prediction for element-wise N(mu, sigma^2) data (the toy of test_samplers.py)."""
    abar = obj.alphas_cumprod.double()

    def denoise(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        a2 = abar[t].reshape((-1,) + (1,) * (x.ndim - 1))
        a, b = a2.sqrt(), (1 - a2).sqrt()
        var = a2 * sigma**2 + b**2
        xd = x.double()
        eps = b * (xd - a * mu) / var
        x0 = mu + a * sigma**2 * (xd - a * mu) / var
        return (eps if obj.name == "epsilon" else a * eps - b * x0).to(x.dtype)

    return denoise


def _noise(seed: int) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["epsilon", "v_prediction"])
def test_inverting_a_ddim_sample_gives_back_its_noise(name: str) -> None:
    obj = build_objective(name, 1000, "scaled_linear_beta", 2, SHAPE[2:])
    denoise = gaussian_denoiser(obj)
    errors = []
    for steps in (50, 200):
        g = torch.Generator().manual_seed(3)
        x0 = sample(denoise, SHAPE, sampler="ddim", steps=steps, objective=obj, generator=g)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))  # what sample() started from
        counting = CountingDenoiser(denoise)
        inv = ddim_invert(counting, x0, objective=obj, steps=steps, cond=None)
        assert counting.calls == steps and inv.steps == steps
        errors.append(float((inv.noise - noise).abs().max()))
    assert errors[1] < 0.05, errors  # golden tolerance at 200 steps (0.040 measured)
    assert errors[1] < 0.35 * errors[0], errors  # first-order: 4x the steps, about 1/4 of the error


@pytest.mark.parametrize("name", ["epsilon", "v_prediction"])
def test_round_trip_reconstructs_the_latent(name: str) -> None:
    obj = build_objective(name, 1000, "scaled_linear_beta", 2, SHAPE[2:])
    denoise = gaussian_denoiser(obj)
    z0 = 0.5 + 0.8 * _noise(1)
    inv = ddim_invert(denoise, z0, objective=obj, steps=200, cond=None)
    everywhere = torch.ones(SHAPE[0], 1, *SHAPE[2:])
    rec = blended_ddim(denoise, inv, everywhere, objective=obj, cond=None)
    err = float((rec - z0).abs().max())
    assert err < 0.05, err  # 0.032 measured at 200 steps
    # a wrong condition (another data mean) does NOT give the latent back: the check can fail
    shifted = blended_ddim(gaussian_denoiser(obj, mu=2.0), inv, everywhere, objective=obj, cond=None)
    assert float((shifted - z0).abs().max()) > 0.5


def test_blending_keeps_the_inverted_latents_exactly_outside_the_region() -> None:
    obj = build_objective("v_prediction", 1000, "scaled_linear_beta", 2, SHAPE[2:])
    z0 = _noise(2)
    inv = ddim_invert(gaussian_denoiser(obj), z0, objective=obj, steps=8, cond=None)
    region = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    region[:, :, 1:3, 2:5] = 1.0
    seen: list[tuple[int, Tensor]] = []
    other = gaussian_denoiser(obj, mu=3.0)  # regenerate with a different "condition"
    out = blended_ddim(
        other, inv, region, objective=obj, cond=None, start=_noise(9), hook=lambda i, x: seen.append((i, x.clone()))
    )
    outside = (region == 0).expand(SHAPE)
    assert [i for i, _ in seen] == list(range(6, -2, -1))
    for i, x in seen:
        target = inv.latents[i] if i >= 0 else z0
        assert torch.equal(x[outside], target[outside])  # exactly, at every step
        assert not torch.allclose(x[~outside], target[~outside])  # inside: regenerated
    assert torch.equal(out[outside], z0[outside])


def test_latent_region_covers_every_block_touching_the_image_region() -> None:
    r = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    r[0, 0, 3, 4] = True
    lat = latent_region(r, 2)
    assert lat.shape == (1, 1, 4, 4)
    assert lat.sum() == 1 and lat[0, 0, 1, 2] == 1
    r3 = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    r3[0, 0, 3, 0, 1] = True
    assert latent_region(r3, 2)[0, 0, 1, 0, 0] == 1


def test_inversion_refuses_rectified_flow() -> None:
    obj = build_objective("rflow", 1000, spatial_dims=2, latent_shape=SHAPE[2:])
    with pytest.raises(ValueError, match="DDPM-family"):
        ddim_invert(lambda x, t, c: x, torch.zeros(SHAPE), objective=obj, steps=4, cond=None)
