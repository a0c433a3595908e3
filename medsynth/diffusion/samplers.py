"""Sampling loops, separate from the networks, which they reach only through a :data:`Denoiser`.

Samplers (``sampler=`` of :func:`sample`):

* ``"ddpm"``: ancestral sampling, ``monai.networks.schedulers.DDPMScheduler.step``.
* ``"ddim"``: ``monai.networks.schedulers.DDIMScheduler.step`` (``eta`` = 0: deterministic).
* ``"dpmpp"``: DPM-Solver++ (2M), ``diffusers.DPMSolverMultistepScheduler`` built on the training betas.
* ``"rflow_euler"``: Euler integration of the rectified flow, ``monai RFlowScheduler.step``.

The first three need a DDPM-family objective (epsilon or v), the last the ``"rflow"`` objective.

With fewer steps than training timesteps, the MONAI DDPM/DDIM steppers are run on a *respaced*
schedule: MONAI's ``DDPMScheduler.step`` always takes the posterior from ``t`` to ``t - 1`` and
``DDIMScheduler.step`` jumps to ``t - T // steps`` while ``set_timesteps`` spaces the timesteps by
``(T - 1) / (steps - 1)``, so neither is consistent with a strided timestep list. The respaced
scheduler has one entry per visited timestep, ``abar'_i = abar[t_i]`` (the marginals of the kept
timesteps are unchanged), is stepped by index ``i``, while the denoiser receives the original
``t_i``. With ``steps == T`` this is exactly the plain MONAI loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeVar, cast

import torch
from monai.networks.schedulers.ddim import DDIMScheduler
from monai.networks.schedulers.ddpm import DDPMScheduler
from monai.networks.schedulers.rectified_flow import RFlowScheduler
from torch import Tensor

from medsynth.diffusion.denoiser import Denoiser
from medsynth.diffusion.objectives import DiffusionObjective

if TYPE_CHECKING:  # diffusers costs ~4 s to import: only the dpmpp sampler loads it.
    # From its module: mypy resolves the top-level ``diffusers`` name to a dummy class.
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

SAMPLERS: Final[tuple[str, ...]] = ("ddpm", "ddim", "dpmpp", "rflow_euler")
ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``, called after each step with ``done`` in ``1..total``."""

_S = TypeVar("_S", DDPMScheduler, DDIMScheduler)


def ddpm_family_timesteps(objective: DiffusionObjective, steps: int) -> Tensor:
    """Timesteps visited by the ``ddpm``/``ddim`` samplers: MONAI's ``linspace(T - 1, 0, steps)``.

    Returns:
        int64 tensor of shape ``(steps,)``, strictly decreasing from ``T - 1`` to ``0``.
    """
    sched = cast(DDPMScheduler, objective.make_scheduler())
    sched.set_timesteps(steps)
    timesteps: Tensor = sched.timesteps
    return timesteps.clone()


def _respaced(cls: type[_S], objective: DiffusionObjective, timesteps: Tensor) -> _S:
    """A MONAI scheduler whose entry ``i`` is the training timestep ``timesteps[steps - 1 - i]``."""
    idx = timesteps.flip(0)
    abar64 = torch.cumprod(1.0 - objective.betas.double(), dim=0)[idx]
    alphas64 = abar64 / torch.cat([abar64.new_ones(1), abar64[:-1]])  # float64: betas ~1e-4 stay exact
    sched = cls(num_train_timesteps=len(idx), prediction_type=objective.name, clip_sample=False)
    sched.alphas_cumprod = objective.alphas_cumprod[idx]
    sched.alphas, sched.betas = alphas64.float(), (1.0 - alphas64).float()
    return sched


def _check_steps(steps: int, limit: int) -> None:
    if not 1 <= steps <= limit:
        raise ValueError(f"steps must be in [1, {limit}], got {steps}")


def _batch_t(t: Tensor, batch: int, device: torch.device) -> Tensor:
    return t.reshape(1).to(device).expand(batch).clone()


def _ancestral(
    denoise: Denoiser,
    x: Tensor,
    objective: DiffusionObjective,
    steps: int,
    cond: Tensor | None,
    generator: torch.Generator,
    eta: float | None,
    progress: ProgressCallback | None,
) -> Tensor:
    """``ddpm`` (``eta is None``) or ``ddim`` (``eta`` given) on the respaced schedule."""
    ts = ddpm_family_timesteps(objective, steps)
    sched: DDPMScheduler | DDIMScheduler
    if eta is None:
        sched = _respaced(DDPMScheduler, objective, ts)
    else:
        sched = _respaced(DDIMScheduler, objective, ts)
        sched.set_timesteps(steps)
    for k, t in enumerate(ts):
        i = steps - 1 - k
        out = denoise(x, _batch_t(t, x.shape[0], x.device), cond)
        if eta is None:
            x, _ = cast(DDPMScheduler, sched).step(out, i, x, generator=generator)
        else:
            x, _ = cast(DDIMScheduler, sched).step(out, i, x, eta=eta, generator=generator)
        if progress is not None:
            progress(k + 1, steps)
    return x


def make_dpmpp_scheduler(objective: DiffusionObjective, steps: int) -> DPMSolverMultistepScheduler:
    """diffusers DPM-Solver++ 2M on the objective's training betas and prediction type, timesteps set."""
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    sched: DPMSolverMultistepScheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=objective.num_train_timesteps,
        trained_betas=objective.betas.tolist(),
        prediction_type=objective.name,
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=False,
    )
    sched.set_timesteps(steps)
    return sched


def _dpmpp(
    denoise: Denoiser,
    x: Tensor,
    objective: DiffusionObjective,
    steps: int,
    cond: Tensor | None,
    progress: ProgressCallback | None,
) -> Tensor:
    sched = make_dpmpp_scheduler(objective, steps)
    timesteps = sched.timesteps
    for k, t in enumerate(timesteps):
        out = denoise(x, _batch_t(t, x.shape[0], x.device), cond)
        # diffusers' step returns one sample (a 1-tuple here), where MONAI's returns a pair.
        (x,) = sched.step(out, t, x, return_dict=False)
        if progress is not None:
            progress(k + 1, len(timesteps))
    return x


def _rflow_euler(
    denoise: Denoiser,
    x: Tensor,
    objective: DiffusionObjective,
    steps: int,
    cond: Tensor | None,
    progress: ProgressCallback | None,
) -> Tensor:
    sched = cast(RFlowScheduler, objective.make_scheduler())
    sched.set_timesteps(steps, input_img_size_numel=math.prod(x.shape[2:]))
    ts = sched.timesteps
    next_ts = torch.cat([ts[1:], ts.new_zeros(1)])
    for k, (t, t_next) in enumerate(zip(ts, next_ts, strict=True)):
        out = denoise(x, _batch_t(t, x.shape[0], x.device), cond)
        x, _ = sched.step(out, t, x, t_next)
        if progress is not None:
            progress(k + 1, steps)
    return x


def sample(
    denoise: Denoiser,
    shape: Sequence[int],
    *,
    sampler: str,
    steps: int,
    objective: DiffusionObjective,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cond: Tensor | None = None,
    eta: float = 0.0,
    progress: ProgressCallback | None = None,
) -> Tensor:
    """Draw samples by integrating the reverse process from standard normal noise.

    All randomness (initial noise, ancestral noise) comes from ``generator``; the global RNG is not
    used, so equal generator states give identical outputs.

    Args:
        denoise: network as a :data:`Denoiser` (wrap it with ``cfg_denoiser`` for guidance and with
            ``CountingDenoiser`` to count evaluations); called exactly ``steps`` times.
        shape: output shape ``(B, C, *spatial)`` with 2 or 3 spatial dimensions.
        sampler: ``"ddpm"``, ``"ddim"``, ``"dpmpp"`` or ``"rflow_euler"``.
        steps: number of denoiser evaluations, in ``[1, T]``.
        objective: the objective the network was trained with (sets schedule and prediction type).
        generator: RNG on ``device`` (MONAI draws the ancestral noise on the model's device).
        device: device of the samples.
        dtype: dtype of the samples.
        cond: conditioning passed unchanged to every ``denoise`` call.
        eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like); ``ddim`` only.
        progress: optional ``progress(done, total)`` callback after every step.

    Returns:
        Samples of shape ``shape`` in the objective's data space (e.g. scaled latents, roughly unit
        variance), ``dtype`` on ``device``.

    Raises:
        ValueError: on an unknown sampler, a sampler that does not fit the objective, bad ``steps``,
            ``eta`` or ``shape``, or a generator on another device type.
    """
    device = torch.device(device)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if (sampler == "rflow_euler") == objective.is_ddpm_family:
        raise ValueError(f"sampler {sampler!r} does not fit objective {objective.name!r}")
    if len(shape) != objective.spatial_dims + 2:
        raise ValueError(f"shape must be (B, C, *spatial) with {objective.spatial_dims} spatial dims, got {shape}")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise ValueError(f"eta must be >= 0 and is used by 'ddim' only, got eta={eta} for {sampler!r}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, samples on {device}: they must match")
    _check_steps(steps, objective.num_train_timesteps)
    x = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    with torch.no_grad():
        if sampler == "ddpm":
            return _ancestral(denoise, x, objective, steps, cond, generator, None, progress)
        if sampler == "ddim":
            return _ancestral(denoise, x, objective, steps, cond, generator, eta, progress)
        if sampler == "dpmpp":
            return _dpmpp(denoise, x, objective, steps, cond, progress)
        return _rflow_euler(denoise, x, objective, steps, cond, progress)
