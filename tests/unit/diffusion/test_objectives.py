"""Training objectives: noising and targets against independent formulas, shapes, RNG discipline."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler as DiffusersDDPM
from monai.networks.schedulers import RFlowScheduler

from medsynth.diffusion import OBJECTIVE_NAMES, build_objective

torch.set_num_threads(1)


def linear_alphas_cumprod(n: int) -> torch.Tensor:
    """abar_t of MONAI's default linear_beta schedule (beta 1e-4 .. 2e-2), in float64."""
    return torch.cumprod(1.0 - torch.linspace(1e-4, 2e-2, n, dtype=torch.float64), dim=0)


def data(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.7 + 0.2, torch.randn(shape, generator=g)


def col(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(-1, *([1] * (ndim - 1)))


def test_epsilon_noising_and_target() -> None:
    T = 200
    obj = build_objective("epsilon", T, "linear_beta", 2, (5, 6))
    x0, noise = data((3, 2, 5, 6))
    t = torch.tensor([0, 77, T - 1])
    x_t, target = obj.make_training_pair(x0, noise, t)
    abar = col(linear_alphas_cumprod(T)[t], 4)
    torch.testing.assert_close(x_t.double(), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, rtol=0, atol=1e-5)
    assert torch.equal(target, noise)
    torch.testing.assert_close(obj.alphas_cumprod.double(), linear_alphas_cumprod(T), rtol=1e-5, atol=0)
    assert obj.prediction_type == "epsilon"


def test_v_prediction_target_matches_definition_and_diffusers() -> None:
    T = 300
    obj = build_objective("v_prediction", T, "cosine", 2, (4, 4))
    x0, noise = data((4, 1, 4, 4), seed=1)
    t = torch.tensor([0, 10, 150, T - 1])
    x_t, v = obj.make_training_pair(x0, noise, t)
    abar = col(obj.alphas_cumprod[t], 4)
    a, b = abar.sqrt(), (1 - abar).sqrt()
    torch.testing.assert_close(v, a * noise - b * x0, rtol=0, atol=1e-6)
    # what the samplers invert: x0 = a x_t - b v and eps = a v + b x_t
    torch.testing.assert_close(a * x_t - b * v, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(a * v + b * x_t, noise, rtol=0, atol=1e-5)
    ref = DiffusersDDPM(num_train_timesteps=T, trained_betas=obj.betas.tolist(), prediction_type="v_prediction")
    torch.testing.assert_close(v, ref.get_velocity(x0, noise, t), rtol=0, atol=1e-6)


def test_rflow_noising_target_and_euler_consistency() -> None:
    T = 1000
    obj = build_objective("rflow", T, spatial_dims=2, latent_shape=(4, 8, 8))
    x0, noise = data((3, 4, 8, 8), seed=2)
    t = torch.tensor([0.0, 400.0, 999.0])
    x_t, target = obj.make_training_pair(x0, noise, t)
    s = col(t / T, 4)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise, rtol=0, atol=1e-6)
    torch.testing.assert_close(target, x0 - noise, rtol=0, atol=0)
    # The sampler's integrator (RFlowScheduler.step from t straight to 0) recovers x0 with this target.
    sched = obj.make_scheduler()
    sched.set_timesteps(10, input_img_size_numel=64)
    for i in range(3):
        x_prev, x0_pred = sched.step(target[i : i + 1], t[i], x_t[i : i + 1], 0)
        torch.testing.assert_close(x_prev, x0[i : i + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(x0_pred, x0[i : i + 1], rtol=0, atol=1e-5)
    assert obj.prediction_type == "flow_velocity"


@pytest.mark.parametrize(
    ("spatial_dims", "latent_shape", "numel"), [(2, (4, 16, 8), 128), (3, (2, 4, 8), 64), (3, (3, 8, 8, 2), 128)]
)
def test_rflow_scheduler_configured_for_the_latent(
    spatial_dims: int, latent_shape: tuple[int, ...], numel: int
) -> None:
    obj = build_objective("rflow", 1000, spatial_dims=spatial_dims, latent_shape=latent_shape)
    sched = obj.scheduler
    assert isinstance(sched, RFlowScheduler)
    assert sched.spatial_dim == spatial_dims and sched.base_img_size_numel == numel and sched.use_timestep_transform
    assert obj.latent_spatial_shape == tuple(latent_shape[-spatial_dims:])
    # At the training size the resolution transform is the identity: a uniform inference grid.
    sched.set_timesteps(5, input_img_size_numel=numel)
    assert sched.timesteps.tolist() == [1000, 800, 600, 400, 200]


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_and_timestep_ranges(name: str, spatial_dims: int) -> None:
    T = 100
    spatial = (6, 4) if spatial_dims == 2 else (4, 3, 2)
    obj = build_objective(name, T, "linear_beta", spatial_dims, spatial)
    x0, noise = data((5, 3, *spatial))
    t = obj.sample_timesteps(x0, torch.Generator().manual_seed(0))
    assert t.shape == (5,) and t.device == x0.device
    assert bool(((t >= 0) & (t < T)).all())
    x_t, target = obj.make_training_pair(x0, noise, t)
    assert x_t.shape == target.shape == x0.shape
    assert x_t.dtype == target.dtype == torch.float32
    assert not torch.allclose(x_t, x0) and torch.isfinite(x_t).all()


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_timestep_distribution_is_uniform_over_training_range(name: str) -> None:
    T = 50
    obj = build_objective(name, T, "linear_beta", 2, (2, 2))
    raw = obj.sample_timesteps(torch.zeros(4000, 1, 2, 2), torch.Generator().manual_seed(3))
    if name != "rflow":
        assert raw.dtype == torch.int64
    t = raw.double()
    assert t.min() < 2 and t.max() > T - 3
    assert abs(t.mean().item() - (T - 1) / 2) < 1.0  # std of the mean ~0.23


@pytest.mark.parametrize(("name", "method"), [("epsilon", "uniform"), ("rflow", "uniform"), ("rflow", "logit-normal")])
def test_sample_timesteps_uses_only_the_generator(name: str, method: str) -> None:
    obj = build_objective(name, 1000, "linear_beta", 2, (4, 4), rflow_sample_method=method)  # type: ignore[arg-type]
    x0 = torch.zeros(64, 1, 4, 4)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = obj.sample_timesteps(x0, torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG neither used nor advanced
    torch.manual_seed(2)
    b = obj.sample_timesteps(x0, torch.Generator().manual_seed(9))
    c = obj.sample_timesteps(x0, torch.Generator().manual_seed(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_low_precision_inputs_do_not_degrade_the_schedule() -> None:
    # MONAI's add_noise casts scheduler.alphas_cumprod to the input dtype in place.
    obj = build_objective("v_prediction", 1000, "linear_beta", 2, (8, 8))
    fresh = build_objective("v_prediction", 1000, "linear_beta", 2, (8, 8))
    x0, noise = data((2, 1, 8, 8))
    t = torch.tensor([3, 998])
    x_bf, v_bf = obj.make_training_pair(x0.bfloat16(), noise.bfloat16(), t)
    assert x_bf.dtype == v_bf.dtype == torch.bfloat16
    for got, want in zip(obj.make_training_pair(x0, noise, t), fresh.make_training_pair(x0, noise, t), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(obj.alphas_cumprod, fresh.alphas_cumprod)


def test_schedule_arguments_are_forwarded() -> None:
    obj = build_objective("epsilon", 100, "scaled_linear_beta", 2, (4, 4), beta_start=0.00085, beta_end=0.012)
    expected = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 100) ** 2
    torch.testing.assert_close(obj.betas, expected)


def test_invalid_configurations_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("sample", 100)
    with pytest.raises(ValueError, match="spatial_dims"):
        build_objective("epsilon", 100, spatial_dims=1, latent_shape=(8,))
    with pytest.raises(ValueError, match="latent_shape"):
        build_objective("rflow", 100, spatial_dims=3, latent_shape=(8, 8))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        build_objective("epsilon", 1)
    obj = build_objective("epsilon", 100, spatial_dims=2, latent_shape=(4, 4))
    x0, noise = data((2, 1, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        obj.make_training_pair(x0, noise[:1], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must have shape"):
        obj.make_training_pair(x0, noise, torch.tensor([1]))
    with pytest.raises(AttributeError, match="DDPM-family"):
        _ = build_objective("rflow", 100).betas
