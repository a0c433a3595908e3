"""Samplers on an analytic toy: data x0 ~ N(MU, SIGMA^2) element-wise, exact network predictions.

For Gaussian data the exact probability-flow map from the initial noise z to the sample is
``x0 = MU + SIGMA * z`` (up to the tiny signal left at the first timestep), so deterministic samplers
are checked element-wise against it, and must converge to it as the number of steps grows.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from medsynth.diffusion import CountingDenoiser, Denoiser, DiffusionObjective, build_objective, cfg_denoiser, sample
from medsynth.diffusion.samplers import make_dpmpp_scheduler

torch.set_num_threads(1)

MU, SIGMA = 0.5, 0.8


def gaussian_denoiser(obj: DiffusionObjective, mu: float = MU, sigma: float = SIGMA) -> Denoiser:
    """Exact prediction for N(mu, sigma^2) data; ``cond`` (shape (B,)) replaces mu when given."""
    T = obj.num_train_timesteps
    abar = obj.alphas_cumprod.double() if obj.is_ddpm_family else None

    def denoise(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        view = (-1,) + (1,) * (x.ndim - 1)
        m = torch.tensor(mu, dtype=torch.float64) if cond is None else cond.double().reshape(view)
        xd = x.double()
        if abar is None:  # rectified flow: x_s = (1 - s) x0 + s z, target x0 - z
            s = (t.double() / T).reshape(view)
            var = (1 - s) ** 2 * sigma**2 + s**2
            out = m + ((1 - s) * sigma**2 - s) / var * (xd - (1 - s) * m)
        else:
            a2 = abar[t].reshape(view)
            a, b = a2.sqrt(), (1 - a2).sqrt()
            var = a2 * sigma**2 + b**2
            eps = b * (xd - a * m) / var
            x0 = m + a * sigma**2 * (xd - a * m) / var
            out = eps if obj.name == "epsilon" else a * eps - b * x0
        return out.to(x.dtype)

    return denoise


def initial_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run(
    obj: DiffusionObjective,
    sampler: str,
    steps: int,
    shape: tuple[int, ...],
    seed: int,
    denoise: Denoiser | None = None,
    **kw: Any,
) -> Tensor:
    """Sample with a fresh generator seeded with ``seed`` (default: the exact Gaussian denoiser)."""
    den = gaussian_denoiser(obj) if denoise is None else denoise
    g = torch.Generator().manual_seed(seed)
    return sample(den, shape, sampler=sampler, steps=steps, objective=obj, generator=g, **kw)


SAMPLER_OBJECTIVE = [("ddpm", "epsilon"), ("ddim", "epsilon"), ("dpmpp", "v_prediction"), ("rflow_euler", "rflow")]


# ----------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize(
    ("sampler", "name", "schedule", "coarse", "fine", "tol", "ratio"),
    [
        ("ddim", "epsilon", "linear_beta", 50, 100, 0.06, 0.6),  # first order: error halves
        ("ddim", "v_prediction", "cosine", 25, 50, 0.08, 0.6),
        ("dpmpp", "epsilon", "linear_beta", 10, 20, 0.02, 0.15),  # second order
        ("dpmpp", "v_prediction", "cosine", 10, 20, 0.005, 0.15),
        ("rflow_euler", "rflow", "linear_beta", 50, 100, 0.04, 0.6),
    ],
)
def test_deterministic_sampler_converges_to_exact_map(
    sampler: str, name: str, schedule: str, coarse: int, fine: int, tol: float, ratio: float
) -> None:
    obj = build_objective(name, 1000, schedule, 2, (8, 8))
    shape = (2, 1, 8, 8)
    exact = MU + SIGMA * initial_noise(shape, 7)
    err_coarse = (run(obj, sampler, coarse, shape, 7) - exact).abs().max().item()
    err_fine = (run(obj, sampler, fine, shape, 7) - exact).abs().max().item()
    assert err_fine < tol
    assert err_fine < ratio * err_coarse


@pytest.mark.parametrize("name", ["epsilon", "v_prediction"])
def test_ddpm_full_chain_reproduces_data_moments(name: str) -> None:
    obj = build_objective(name, 250, "cosine", 2, (32, 32))
    x = run(obj, "ddpm", 250, (2, 1, 32, 32), 3)
    assert abs(x.mean().item() - MU) < 0.05  # standard error of the mean ~0.018
    assert abs(x.std().item() - SIGMA) < 0.04


def test_ddpm_with_fewer_steps_than_training_timesteps_still_samples_the_data() -> None:
    # MONAI's DDPMScheduler.step always uses the t -> t-1 posterior: stepping it on a strided
    # timestep list yields almost pure noise (mean ~0.06, std ~0.99 here). The respaced chain must not.
    obj = build_objective("epsilon", 1000, "linear_beta", 2, (32, 32))
    x = run(obj, "ddpm", 50, (2, 1, 32, 32), 3)
    assert abs(x.mean().item() - MU) < 0.05
    assert abs(x.std().item() - SIGMA) < 0.08


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_full_length_chain_equals_plain_monai_loop(sampler: str, eta: float) -> None:
    T, shape = 40, (2, 1, 4, 4)
    obj = build_objective("epsilon", T, "cosine", 2, (4, 4))
    den = gaussian_denoiser(obj)
    ours = run(obj, sampler, T, shape, 11, eta=eta)

    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g)
    sched = (DDPMScheduler if sampler == "ddpm" else DDIMScheduler)(T, "cosine", clip_sample=False)
    sched.set_timesteps(T)
    for t in sched.timesteps:
        out = den(x, t.expand(shape[0]), None)
        kw = {"generator": g} if sampler == "ddpm" else {"eta": eta, "generator": g}
        x, _ = sched.step(out, int(t), x, **kw)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("sampler", "name", "steps"),
    [("ddim", "epsilon", 20), ("ddim", "v_prediction", 7), ("dpmpp", "epsilon", 9), ("rflow_euler", "rflow", 6)],
)
def test_state_is_at_the_noise_level_the_network_is_told(sampler: str, name: str, steps: int) -> None:
    # Point-mass data (sigma = 0): exact deterministic steps keep x on one forward path
    # x_t = a_t * MU + b_t * e, so every call must see that x for the t it is given. (MONAI's own DDIM
    # loop with 20 of 1000 steps fails this: it steps to t - 50 but labels the result t - 52.6.)
    obj = build_objective(name, 1000, "linear_beta", 2, (4, 4))
    shape = (2, 1, 4, 4)
    net = gaussian_denoiser(obj, sigma=0.0)
    worst: list[float] = []
    path: list[Tensor] = []

    def coefficients(t: Tensor) -> tuple[Tensor, Tensor]:
        if obj.is_ddpm_family:
            abar = obj.alphas_cumprod[t].reshape(-1, 1, 1, 1)
            return abar.sqrt(), (1 - abar).sqrt()
        s = (t.float() / obj.num_train_timesteps).reshape(-1, 1, 1, 1)
        return 1 - s, s

    def spy(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        a, b = coefficients(t)
        if not path:  # the initial noise defines the path
            path.append((x - a * MU) / b)
        worst.append((x - (a * MU + b * path[0])).abs().max().item())
        return net(x, t, cond)

    out = run(obj, sampler, steps, shape, 2, denoise=spy)
    assert len(worst) == steps and max(worst) < 1e-4
    torch.testing.assert_close(out, torch.full(shape, MU), rtol=0, atol=1e-4)


def test_dpmpp_scheduler_uses_the_training_schedule() -> None:
    obj = build_objective("v_prediction", 300, "cosine", 2, (4, 4))
    sched = make_dpmpp_scheduler(obj, 12)
    torch.testing.assert_close(sched.alphas_cumprod, obj.alphas_cumprod, rtol=1e-6, atol=1e-7)
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.solver_order == 2
    assert len(sched.timesteps) == 12 and int(sched.timesteps[0]) == 299


# --------------------------------------------------------------------------------------- golden values
# Expected values derived independently of MONAI/diffusers: a float64 loop below writes out each
# sampler's update from the training schedule's alphas (T=1000 linear_beta, seed 1234), drawing the
# initial and ancestral noise from the same generator in the same order. The rectified-flow Euler
# sampler is covered by the analytic convergence tests above instead.
GOLDEN_CASES = [
    ("ddpm", "epsilon", 20, 0.0),
    ("ddim", "epsilon", 10, 0.0),
    ("ddim", "v_prediction", 10, 0.5),
    ("dpmpp", "epsilon", 10, 0.0),
    ("dpmpp", "v_prediction", 10, 0.0),
]


def _x0_eps(obj: DiffusionObjective, out: Tensor, x: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a network output at cumulative alpha ``a2`` (epsilon or v parameterisation)."""
    a, b = a2.sqrt(), (1 - a2).sqrt()
    if obj.name == "epsilon":
        return (x - b * out) / a, out
    return a * x - b * out, b * x + a * out


def reference_sample(obj: DiffusionObjective, sampler: str, steps: int, eta: float, shape: tuple[int, ...]) -> Tensor:
    """The sampler written out in float64 from the schedule's betas (DDPM/DDIM on ``linspace(T-1, 0, steps)``,
    DPM-Solver++ 2M on diffusers' ``linspace`` spacing with a first-order first and last step)."""
    T = obj.num_train_timesteps
    abar = torch.cumprod(1.0 - obj.betas.double(), dim=0)
    net = gaussian_denoiser(obj)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(shape, generator=g).double()

    def model(x: Tensor, t: int) -> Tensor:
        return net(x, torch.full((shape[0],), t, dtype=torch.long), None)

    if sampler in ("ddpm", "ddim"):
        ts = [round(v) for v in torch.linspace(T - 1, 0, steps, dtype=torch.float64).tolist()]
        for k, t in enumerate(ts):
            a_t = abar[t]
            a_prev = abar[ts[k + 1]] if k + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
            x0, eps = _x0_eps(obj, model(x, t), x, a_t)
            if sampler == "ddim":
                var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
                std = eta * var.sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
                if eta > 0:
                    x = x + std * torch.randn(shape, generator=g).double()
            else:  # posterior mean + fixed-small variance of the respaced step
                beta = 1 - a_t / a_prev
                mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a_t)
                x = mean
                if k + 1 < steps:
                    var = torch.clamp((1 - a_prev) / (1 - a_t) * beta, min=1e-20)
                    x = x + var.sqrt() * torch.randn(shape, generator=g).double()
        return x

    # DPM-Solver++ (2M, midpoint) in log-SNR lambda = log(alpha / sigma), data prediction
    ts = [round(v) for v in torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).tolist()][::-1][:-1]
    alpha = [abar[t].sqrt() for t in ts] + [torch.tensor(1.0, dtype=torch.float64)]
    sigma = [(1 - abar[t]).sqrt() for t in ts] + [torch.tensor(0.0, dtype=torch.float64)]
    lam = [torch.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1], strict=True)]
    prev_x0: Tensor | None = None
    for k, t in enumerate(ts):
        x0, _ = _x0_eps(obj, model(x, t), x, abar[t])
        if k == steps - 1:  # final step to sigma = 0: the data prediction itself
            x = x0
            break
        h = lam[k + 1] - lam[k]
        d = x0
        if prev_x0 is not None:
            r = (lam[k] - lam[k - 1]) / h
            d = x0 + 0.5 * (x0 - prev_x0) / r
        x = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * torch.expm1(-h) * d
        prev_x0 = x0
    return x


@pytest.mark.parametrize(("sampler", "name", "steps", "eta"), GOLDEN_CASES)
def test_golden_values(sampler: str, name: str, steps: int, eta: float) -> None:
    obj = build_objective(name, 1000, "linear_beta", 2, (2, 3))
    x = run(obj, sampler, steps, (1, 1, 2, 3), 1234, eta=eta)
    expected = reference_sample(obj, sampler, steps, eta, (1, 1, 2, 3))
    assert x.abs().max() > 0.1  # not a degenerate all-zero sample
    # float32 sampling vs the float64 reference: 20 ancestral DDPM steps accumulate ~4e-4 (a wrong mean or
    # variance coefficient moves the result by > 1e-2)
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-3 if sampler == "ddpm" else 1e-4)


# ----------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize(("sampler", "name"), [*SAMPLER_OBJECTIVE, ("ddim", "v_prediction")])
def test_same_seed_same_output_whatever_the_global_rng(sampler: str, name: str) -> None:
    obj = build_objective(name, 100, "cosine", 2, (4, 4))
    eta = 1.0 if sampler == "ddim" else 0.0  # stochastic DDIM: its noise must come from the generator too
    torch.manual_seed(0)
    a = run(obj, sampler, 10, (2, 1, 4, 4), 5, eta=eta)
    torch.manual_seed(999)
    b = run(obj, sampler, 10, (2, 1, 4, 4), 5, eta=eta)
    c = run(obj, sampler, 10, (2, 1, 4, 4), 6, eta=eta)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


# ------------------------------------------------------------------- evaluation counts, CFG, callbacks
@pytest.mark.parametrize(("sampler", "name"), SAMPLER_OBJECTIVE)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_number_of_network_evaluations(sampler: str, name: str, scale: float) -> None:
    obj = build_objective(name, 100, "cosine", 2, (4, 4))
    net = CountingDenoiser(gaussian_denoiser(obj))
    cond = torch.full((3,), 0.2)
    run(obj, sampler, 7, (3, 1, 4, 4), 0, denoise=cfg_denoiser(net, scale), cond=cond)
    expected = 7 if scale == 1.0 else 14
    assert net.calls == expected
    assert net.items == 3 * expected


@pytest.mark.parametrize(("sampler", "name"), SAMPLER_OBJECTIVE)
def test_guidance_one_is_exactly_the_conditional_model(sampler: str, name: str) -> None:
    obj = build_objective(name, 100, "cosine", 2, (4, 4))
    cond = torch.tensor([0.1, -0.4])
    net = gaussian_denoiser(obj)
    plain = run(obj, sampler, 6, (2, 1, 4, 4), 4, denoise=net, cond=cond)
    guided = run(obj, sampler, 6, (2, 1, 4, 4), 4, denoise=cfg_denoiser(net, 1.0), cond=cond)
    assert torch.equal(plain, guided)
    unconditional = run(obj, sampler, 6, (2, 1, 4, 4), 4, denoise=net)
    assert not torch.allclose(plain, unconditional, atol=1e-2)


def test_cfg_combines_branches_and_routes_null_cond() -> None:
    seen: list[Tensor | None] = []

    def net(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        seen.append(cond)
        return x * 2.0 + (0.0 if cond is None else cond.reshape(-1, 1, 1, 1)) + t.reshape(-1, 1, 1, 1)

    x, t = torch.randn(2, 1, 3, 3), torch.tensor([5, 5])
    cond, null = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -1.0])
    out = cfg_denoiser(net, 2.5, null_cond=null)(x, t, cond)
    assert len(seen) == 2 and seen[0] is null and seen[1] is cond
    uncond_out, cond_out = net(x, t, null), net(x, t, cond)
    torch.testing.assert_close(out, uncond_out + 2.5 * (cond_out - uncond_out), rtol=0, atol=1e-6)
    seen.clear()
    cfg_denoiser(net, 2.5)(x, t, cond)
    assert seen[0] is None
    seen.clear()
    assert torch.equal(cfg_denoiser(net, 2.5)(x, t, None), net(x, t, None))  # no cond: one branch
    assert len(seen) == 2  # the cfg call and the reference call
    with pytest.raises(ValueError, match="guidance_scale"):
        cfg_denoiser(net, -1.0)


def test_guidance_extrapolates_the_conditional_mean() -> None:
    # Exact Gaussian predictions are linear in the mean, so scale s gives mean mu_u + s (mu_c - mu_u).
    obj = build_objective("v_prediction", 1000, "cosine", 2, (16, 16))
    uncond_mu, cond_mu = 0.0, 0.5
    net = gaussian_denoiser(obj, mu=uncond_mu)
    x = run(obj, "dpmpp", 20, (2, 1, 16, 16), 8, denoise=cfg_denoiser(net, 2.0), cond=torch.full((2,), cond_mu))
    assert abs(x.mean().item() - (uncond_mu + 2.0 * (cond_mu - uncond_mu))) < 0.06


def test_progress_callback_reports_every_step() -> None:
    obj = build_objective("epsilon", 100, "cosine", 2, (4, 4))
    calls: list[tuple[int, int]] = []
    run(obj, "dpmpp", 5, (1, 1, 4, 4), 0, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


# ------------------------------------------------------------------------------- timesteps and dtypes
def test_timesteps_seen_by_the_network() -> None:
    T = 100
    for name, sampler, first, last in [("epsilon", "ddim", 99, 0), ("rflow", "rflow_euler", 100, 20)]:
        obj = build_objective(name, T, "linear_beta", 2, (4, 4))
        seen: list[Tensor] = []
        net = gaussian_denoiser(obj)

        def spy(x: Tensor, t: Tensor, c: Tensor | None, net: Denoiser = net, seen: list[Tensor] = seen) -> Tensor:
            seen.append(t)
            return net(x, t, c)

        run(obj, sampler, 5, (3, 1, 4, 4), 0, denoise=spy)
        assert all(t.shape == (3,) and bool((t == t[0]).all()) for t in seen)
        values = [int(t[0]) for t in seen]
        assert values[0] == first and values[-1] == last
        assert values == sorted(values, reverse=True) and len(set(values)) == 5


def test_rflow_shifts_the_schedule_only_for_a_larger_latent_than_trained() -> None:
    obj = build_objective("rflow", 1000, "linear_beta", 2, (8, 8))
    grids = {}
    for side in (8, 16):
        seen: list[int] = []
        net = gaussian_denoiser(obj)

        def spy(x: Tensor, t: Tensor, c: Tensor | None, net: Denoiser = net, seen: list[int] = seen) -> Tensor:
            seen.append(int(t[0]))
            return net(x, t, c)

        run(obj, "rflow_euler", 4, (1, 1, side, side), 0, denoise=spy)
        grids[side] = seen
    assert grids[8] == [1000, 750, 500, 250]  # training size: uniform grid (transform is the identity)
    ratio = math.sqrt(256 / 64)
    assert grids[16] == [int(ratio * t / (1 + (ratio - 1) * t / 1000)) for t in (1000, 750, 500, 250)]


@pytest.mark.parametrize(("sampler", "name"), SAMPLER_OBJECTIVE)
def test_output_dtype_shape_and_3d(sampler: str, name: str) -> None:
    obj = build_objective(name, 50, "cosine", 3, (2, 3, 4))
    x = run(obj, sampler, 3, (2, 1, 2, 3, 4), 0, dtype=torch.float64)
    assert x.shape == (2, 1, 2, 3, 4) and x.dtype == torch.float64 and torch.isfinite(x).all()


def test_invalid_arguments_are_rejected() -> None:
    eps = build_objective("epsilon", 50, "cosine", 2, (4, 4))
    rf = build_objective("rflow", 50, "linear_beta", 2, (4, 4))
    shape = (1, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown sampler"):
        run(eps, "euler", 5, shape, 0)
    with pytest.raises(ValueError, match="does not fit"):
        run(rf, "ddim", 5, shape, 0)
    with pytest.raises(ValueError, match="does not fit"):
        run(eps, "rflow_euler", 5, shape, 0)
    with pytest.raises(ValueError, match="steps"):
        run(eps, "ddim", 0, shape, 0)
    with pytest.raises(ValueError, match="steps"):
        run(eps, "dpmpp", 51, shape, 0)
    with pytest.raises(ValueError, match="eta"):
        run(eps, "ddpm", 5, shape, 0, eta=0.5)
    with pytest.raises(ValueError, match="spatial"):
        run(eps, "ddim", 5, (1, 1, 4, 4, 4), 0)
