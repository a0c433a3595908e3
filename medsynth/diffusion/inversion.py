"""Deterministic DDIM inversion and blended regeneration (counterfactual edits of real latents).

Both loops run on the same respaced schedule as the ``ddim`` sampler
(:func:`medsynth.diffusion.samplers.ddpm_family_timesteps`: ``N`` timesteps ``t_{N-1} > ... > t_0 = 0``,
scheduler entry ``i`` = training timestep ``t_i``) and reach the network only through a
:data:`~medsynth.diffusion.denoiser.Denoiser`.

* :func:`ddim_invert` runs the deterministic DDIM update backwards (clean -> noisy): from the clean
  latent ``z0`` (``abar = 1``) to entry 0, then from entry ``i`` to ``i + 1``, each step using the
  prediction at the *current* latent (the usual inversion approximation: exact in the limit of many
  steps). It returns the whole trajectory: ``N`` latents, one per entry, plus ``z0``. MONAI's
  ``DDIMScheduler.reversed_step`` cannot start from the clean latent (its first ``abar`` is the
  schedule's), so the update is written here in its closed form on the same scheduler's
  ``alphas_cumprod``.
* :func:`blended_ddim` integrates MONAI's ``DDIMScheduler.step`` (``eta`` = 0) from the last latent of a
  trajectory with a (new) condition and, after every step, replaces the latents OUTSIDE a region by
  the trajectory's latent at that entry (``z0`` after the last step), as in blended latent diffusion
  and RePaint. Outside the region the result is therefore exactly ``z0``.

Only the DDPM-family objectives (epsilon, v) have a DDIM inversion here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from monai.networks.schedulers.ddim import DDIMScheduler
from torch import Tensor

from medsynth.diffusion.denoiser import Denoiser
from medsynth.diffusion.objectives import DiffusionObjective
from medsynth.diffusion.samplers import ProgressCallback, _batch_t, _check_steps, _respaced, ddpm_family_timesteps

__all__ = ["Inversion", "blended_ddim", "ddim_invert", "latent_region"]

StepHook = Callable[[int, Tensor], None]
"""``hook(i, x)``: called with the scheduler entry ``i`` reached (``-1`` = clean) and the blended latent."""


@dataclass(frozen=True)
class Inversion:
    """The DDIM trajectory of a clean latent.

    Attributes:
        z0: The clean latent ``(B, C, *s)``.
        latents: ``latents[i]`` is the latent at scheduler entry ``i`` (training timestep
            ``timesteps[N - 1 - i]``), ``i = 0 .. N - 1``; ``latents[-1]`` is the inverted noise.
        timesteps: The sampler's timesteps ``(N,)``, decreasing (as :func:`ddpm_family_timesteps`).
    """

    z0: Tensor
    latents: list[Tensor]
    timesteps: Tensor

    @property
    def steps(self) -> int:
        """Number of entries ``N``."""
        return len(self.latents)

    @property
    def noise(self) -> Tensor:
        """The inverted latent at the noisiest timestep."""
        return self.latents[-1]


def _scheduler(objective: DiffusionObjective, steps: int) -> tuple[DDIMScheduler, Tensor]:
    if not objective.is_ddpm_family:
        raise ValueError(f"DDIM inversion needs a DDPM-family objective (epsilon, v), not {objective.name!r}")
    _check_steps(steps, objective.num_train_timesteps)
    ts = ddpm_family_timesteps(objective, steps)
    sched = _respaced(DDIMScheduler, objective, ts)
    sched.set_timesteps(steps)
    return sched, ts


def _x0_eps(out: Tensor, x: Tensor, abar: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    """Predicted clean latent and noise from the network output at ``x`` (DDIM, eq. 12)."""
    a, b = abar.sqrt(), (1 - abar).sqrt()
    if prediction == "epsilon":
        return (x - b * out) / a, out
    return a * x - b * out, a * out + b * x  # v-prediction


@torch.no_grad()
def ddim_invert(
    denoise: Denoiser,
    z0: Tensor,
    *,
    objective: DiffusionObjective,
    steps: int,
    cond: Tensor | None,
    progress: ProgressCallback | None = None,
) -> Inversion:
    """Invert clean latents to the noise the deterministic DDIM sampler maps back onto them.

    Args:
        denoise: The network as a :data:`Denoiser` (no guidance: inversion with classifier-free
            guidance diverges); called exactly ``steps`` times.
        z0: Clean (scaled) latents ``(B, C, *s)``.
        objective: The objective the network was trained with (epsilon or v).
        steps: Number of DDIM entries ``N`` (the sampler's ``steps``).
        cond: Conditioning of every call (the ORIGINAL mask, one-hot ``(B, K, *S)``).
        progress: Optional ``progress(done, total)`` after every step.

    Returns:
        The :class:`Inversion` (float32 latents on ``z0``'s device).
    """
    sched, ts = _scheduler(objective, steps)
    abar = sched.alphas_cumprod.to(z0.device, torch.float32)
    x = z0.float()
    latents: list[Tensor] = []
    a_cur = torch.ones((), device=z0.device)
    t_cur = ts[-1]  # the clean latent is evaluated at the first (smallest) timestep, t_0 = 0
    for i in range(steps):
        out = denoise(x, _batch_t(t_cur, x.shape[0], x.device), cond).float()
        x0_pred, eps = _x0_eps(out, x, a_cur, objective.name)
        a_next = abar[i]
        x = a_next.sqrt() * x0_pred + (1 - a_next).sqrt() * eps
        latents.append(x)
        a_cur, t_cur = a_next, ts[steps - 1 - i]
        if progress is not None:
            progress(i + 1, steps)
    return Inversion(z0.float(), latents, ts)


@torch.no_grad()
def blended_ddim(
    denoise: Denoiser,
    inversion: Inversion,
    region: Tensor,
    *,
    objective: DiffusionObjective,
    cond: Tensor | None,
    start: Tensor | None = None,
    progress: ProgressCallback | None = None,
    hook: StepHook | None = None,
) -> Tensor:
    """Regenerate inside ``region`` with DDIM (``eta`` = 0) while keeping the inverted latents outside it.

    Args:
        denoise: The network as a :data:`Denoiser` (guidance allowed); called ``N`` times.
        inversion: The trajectory from :func:`ddim_invert` (its ``N`` sets the schedule).
        region: ``(B, 1, *s)`` or ``(B, C, *s)`` weights in [0, 1] on the latent grid: 1 = regenerate,
            0 = keep the inverted latent (exactly, for binary regions).
        objective: The objective the network was trained with.
        cond: Conditioning of the regeneration (the EDITED mask).
        start: The latent to start from inside the region (default: the inverted noise); outside
            the region the inverted noise is always used.
        progress: Optional ``progress(done, total)`` after every step.
        hook: Optional ``hook(i, x)`` after every blended step (``i`` = entry reached, -1 = clean).

    Returns:
        Clean latents ``(B, C, *s)``, equal to ``inversion.z0`` wherever ``region`` is 0.
    """
    n = inversion.steps
    sched, ts = _scheduler(objective, n)
    keep = 1.0 - region.to(inversion.z0.device, torch.float32)
    noise = inversion.noise
    x = noise if start is None else keep * noise + (1.0 - keep) * start.float()
    for k, t in enumerate(ts):
        i = n - 1 - k
        out = denoise(x, _batch_t(t, x.shape[0], x.device), cond)
        x, _ = sched.step(out.float(), i, x)
        x = cast(Tensor, x)
        target = inversion.latents[i - 1] if i > 0 else inversion.z0
        x = torch.where(keep >= 1.0, target, keep * target + (1.0 - keep) * x)
        if hook is not None:
            hook(i - 1, x)
        if progress is not None:
            progress(k + 1, n)
    return x


def latent_region(region: Tensor, factor: int) -> Tensor:
    """An image-grid region ``(B, 1, *S)`` on the latent grid: a latent voxel is in it when any of its
    ``factor``-sized image block is (max pooling), so the kept latents never touch the region.

    Returns:
        ``(B, 1, *S/factor)`` float32 in {0, 1}.
    """
    r = region.float()
    if factor == 1:
        return r
    pool = torch.nn.functional.max_pool3d if r.ndim == 5 else torch.nn.functional.max_pool2d
    return pool(r, kernel_size=factor, stride=factor)
