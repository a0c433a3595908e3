"""Training objectives of the latent diffusion model, built on MONAI's noise schedulers.

Three objectives are supported, all defined by a MONAI scheduler that this module only configures:

* ``"epsilon"``: DDPM forward process (:class:`monai.networks.schedulers.DDPMScheduler`); the network
  predicts the added noise.
* ``"v_prediction"``: same forward process; the network predicts the velocity
  ``v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0`` (MONAI ``Scheduler.get_velocity``, identical to
  the diffusers definition).
* ``"rflow"``: rectified flow (:class:`monai.networks.schedulers.RFlowScheduler`),
  ``x_t = (1 - t/T) * x0 + (t/T) * noise``; the network predicts the velocity ``x0 - noise``, the
  target that ``RFlowScheduler.step`` integrates (``x_next = x_t + v * (t - t_next) / T``).

Timesteps are integers in ``[0, T)`` for the DDPM family (0 = almost clean) and values in ``[0, T)``
for rectified flow at training time (``T`` = pure noise, reached only at sampling time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, Literal, cast, get_args

import torch
from monai.networks.schedulers.ddpm import DDPMScheduler
from monai.networks.schedulers.rectified_flow import RFlowScheduler
from monai.networks.schedulers.scheduler import Scheduler
from torch import Tensor

ObjectiveName = Literal["epsilon", "v_prediction", "rflow"]
OBJECTIVE_NAMES: Final[tuple[str, ...]] = get_args(ObjectiveName)
_DDPM_FAMILY: Final[frozenset[str]] = frozenset({"epsilon", "v_prediction"})


@contextmanager
def _global_rng_seeded_from(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Run a block that draws from torch's *global* RNG deterministically from ``generator``.

    ``RFlowScheduler.sample_timesteps`` has no ``generator`` argument. Inside this context the global
    CPU RNG (and that of ``device`` when it is an accelerator) is seeded from one draw of
    ``generator``; the previous global state is restored on exit, so callers see no side effect.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    accel = device.type != "cpu"
    forked = [device] if accel else []
    with torch.random.fork_rng(devices=forked, device_type=device.type if accel else "cuda"):
        torch.default_generator.manual_seed(seed)
        if accel:
            torch.get_device_module(device.type).manual_seed(seed)
        yield


class DiffusionObjective:
    """One training objective: a configured MONAI scheduler plus the target it implies.

    Build instances with :func:`build_objective`. The object is stateless after construction
    (:meth:`make_scheduler` returns fresh schedulers for samplers, whose ``set_timesteps`` mutates).

    Attributes:
        name: ``"epsilon"``, ``"v_prediction"`` or ``"rflow"``.
        num_train_timesteps: number of training timesteps ``T``.
        schedule: MONAI noise schedule name (DDPM family; ignored by rectified flow).
        spatial_dims: 2 or 3.
        latent_spatial_shape: spatial size of the latent the model is trained on, ``(H, W[, D])``.
        scheduler: the MONAI scheduler used for :meth:`make_training_pair`.
    """

    def __init__(
        self,
        name: ObjectiveName,
        num_train_timesteps: int,
        schedule: str,
        spatial_dims: int,
        latent_spatial_shape: tuple[int, ...],
        scheduler_factory: Callable[[], Scheduler],
    ) -> None:
        self.name: ObjectiveName = name
        self.num_train_timesteps = num_train_timesteps
        self.schedule = schedule
        self.spatial_dims = spatial_dims
        self.latent_spatial_shape = latent_spatial_shape
        self._factory = scheduler_factory
        self.scheduler: Scheduler = scheduler_factory()
        if self.is_ddpm_family:
            # Master copy: MONAI's add_noise casts ``scheduler.alphas_cumprod`` to the input dtype
            # *in place*, so a single bf16 call would otherwise degrade the schedule for good.
            self._alphas_cumprod_master: Tensor = self.scheduler.alphas_cumprod.float().clone()

    def __repr__(self) -> str:
        return (
            f"DiffusionObjective(name={self.name!r}, T={self.num_train_timesteps}, "
            f"schedule={self.schedule!r}, spatial_dims={self.spatial_dims}, "
            f"latent_spatial_shape={self.latent_spatial_shape})"
        )

    @property
    def is_ddpm_family(self) -> bool:
        """True for ``"epsilon"`` and ``"v_prediction"`` (variance-preserving forward process)."""
        return self.name in _DDPM_FAMILY

    @property
    def prediction_type(self) -> str:
        """What the network outputs: ``"epsilon"``, ``"v_prediction"`` or ``"flow_velocity"``."""
        return "flow_velocity" if self.name == "rflow" else self.name

    @property
    def betas(self) -> Tensor:
        """Training betas, shape ``(T,)``, float32 (DDPM family only)."""
        self._require_ddpm("betas")
        return cast(Tensor, self.scheduler.betas).float().clone()

    @property
    def alphas_cumprod(self) -> Tensor:
        """Cumulative products ``abar_t`` in ``(0, 1)``, shape ``(T,)``, float32 (DDPM family only)."""
        self._require_ddpm("alphas_cumprod")
        return self._alphas_cumprod_master.clone()

    def _require_ddpm(self, what: str) -> None:
        if not self.is_ddpm_family:
            raise AttributeError(f"{what} is defined only for the DDPM-family objectives, not {self.name!r}")

    def make_scheduler(self) -> Scheduler:
        """Return a fresh MONAI scheduler configured exactly like the training one."""
        return self._factory()

    def sample_timesteps(self, x0: Tensor, generator: torch.Generator) -> Tensor:
        """Draw one training timestep per batch element, deterministically from ``generator``.

        Args:
            x0: clean latents, shape ``(B, C, *spatial)``; only its batch size and device are used.
            generator: source of randomness (the global RNG is neither used nor advanced).

        Returns:
            Timesteps of shape ``(B,)`` on ``x0.device``: int64 in ``[0, T)`` for the DDPM family
            (uniform); for ``"rflow"`` whatever ``RFlowScheduler.sample_timesteps`` returns (values in
            ``[0, T)``, float when the timestep transform is on).
        """
        batch = x0.shape[0]
        if self.is_ddpm_family:
            t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=generator.device)
            return t.to(x0.device)
        with _global_rng_seeded_from(generator, x0.device):
            return cast(Tensor, cast(RFlowScheduler, self.scheduler).sample_timesteps(x0))

    def make_training_pair(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Noise ``x0`` to timestep ``t`` and return the regression target of the network.

        Computed in float32 whatever the input dtype, then cast back to ``x0.dtype``.

        Args:
            x0: clean latents, shape ``(B, C, *spatial)`` with 2 or 3 spatial dimensions.
            noise: standard normal noise, same shape as ``x0``.
            t: timesteps, shape ``(B,)`` (see :meth:`sample_timesteps`).

        Returns:
            ``(x_t, target)``, both shaped like ``x0``. ``target`` is ``noise`` (epsilon),
            ``sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0`` (v_prediction) or ``x0 - noise`` (rflow).
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        if x0.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}D tensor (B, C, *spatial), got {tuple(x0.shape)}")
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
        x0f, noisef = x0.float(), noise.float()
        if self.is_ddpm_family:
            self.scheduler.alphas_cumprod = self._alphas_cumprod_master.to(x0.device)
        x_t = self.scheduler.add_noise(original_samples=x0f, noise=noisef, timesteps=t)
        if self.name == "epsilon":
            target = noisef
        elif self.name == "v_prediction":
            target = self.scheduler.get_velocity(sample=x0f, noise=noisef, timesteps=t)
        else:
            target = x0f - noisef
        return x_t.to(x0.dtype), target.to(x0.dtype)


def build_objective(
    name: str,
    num_train_timesteps: int = 1000,
    schedule: str = "linear_beta",
    spatial_dims: int = 2,
    latent_shape: Sequence[int] = (16, 16),
    *,
    rflow_sample_method: Literal["uniform", "logit-normal"] = "uniform",
    **schedule_args: Any,
) -> DiffusionObjective:
    """Build a :class:`DiffusionObjective`.

    Args:
        name: ``"epsilon"``, ``"v_prediction"`` or ``"rflow"``.
        num_train_timesteps: number of training timesteps ``T`` (>= 2).
        schedule: MONAI ``NoiseSchedules`` name for the DDPM family (``"linear_beta"``,
            ``"scaled_linear_beta"``, ``"sigmoid_beta"``, ``"cosine"``); ignored by ``"rflow"``.
        spatial_dims: 2 or 3.
        latent_shape: the latent's spatial shape ``(H, W[, D])`` or its channel-first shape
            ``(C, H, W[, D])``; the last ``spatial_dims`` entries are used. For ``"rflow"`` their
            product is ``base_img_size_numel`` of the timestep transform, which is then the identity
            at the training size and shifts the schedule only for other sizes.
        rflow_sample_method: training-timestep distribution of ``"rflow"``.
        **schedule_args: extra arguments of the schedule function (e.g. ``beta_start``, ``beta_end``).

    Returns:
        The objective.

    Raises:
        ValueError: on an unknown name, bad ``spatial_dims``/``latent_shape`` or ``T < 2``.
    """
    if name not in OBJECTIVE_NAMES:
        raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVE_NAMES}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if len(latent_shape) not in (spatial_dims, spatial_dims + 1) or any(int(s) < 1 for s in latent_shape):
        raise ValueError(
            f"latent_shape must be (H, W[, D]) or (C, H, W[, D]) for spatial_dims={spatial_dims}, got {latent_shape}"
        )
    spatial = tuple(int(s) for s in latent_shape[-spatial_dims:])
    factory: Callable[[], Scheduler]
    if name == "rflow":

        def factory() -> Scheduler:
            return RFlowScheduler(
                num_train_timesteps=num_train_timesteps,
                use_discrete_timesteps=True,
                sample_method=rflow_sample_method,
                use_timestep_transform=True,
                base_img_size_numel=math.prod(spatial),
                spatial_dim=spatial_dims,
            )

    else:

        def factory() -> Scheduler:
            return DDPMScheduler(
                num_train_timesteps=num_train_timesteps,
                schedule=schedule,
                prediction_type=name,
                clip_sample=False,
                **schedule_args,
            )

    return DiffusionObjective(cast(ObjectiveName, name), num_train_timesteps, schedule, spatial_dims, spatial, factory)
