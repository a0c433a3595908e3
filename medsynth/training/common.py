"""Pieces every training loop uses: device, precision, optimiser with warm-up, EMA, batches, DDP."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medsynth.config.training import OptimConfig
from medsynth.device import resolve_device
from medsynth.errors import NonFiniteLossError
from medsynth.training.precision import policy_for


@dataclass(frozen=True)
class DistInfo:
    """Process-group facts: rank, world size and whether DDP is active."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """True when running under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and logs)."""
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Initialise the process group when launched by ``torchrun`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(info: DistInfo | None = None) -> torch.device:
    """CUDA (this process's local rank) when available, else CPU."""
    return resolve_device(None, info.local_rank if info else 0)


def autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager[None]:
    """The autocast context of :func:`~medsynth.training.precision.policy_for` ``(device, mode)``.

    Pair it with :func:`make_scaler` ``(device, mode)`` passed to :func:`optimizer_step`: on a pre-Ampere
    GPU, ``auto`` means fp16, whose gradients need loss scaling.
    """
    return policy_for(device, mode).autocast()


def make_scaler(device: torch.device, mode: str) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` when ``mode`` resolves to fp16 on ``device``, else None."""
    return policy_for(device, mode).make_scaler()


def make_optimizer(
    params: Iterator[torch.nn.Parameter] | list[torch.nn.Parameter],
    cfg: OptimConfig,
    device: torch.device | None = None,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up over ``cfg.warmup_steps``, then a constant learning rate.

    On CUDA the fused AdamW kernel is used (one launch for all parameters); on CPU torch's default
    implementation, so CPU results stay bit-identical to earlier releases.
    """
    fused = True if device is not None and device.type == "cuda" else None
    opt = torch.optim.AdamW(list(params), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    warm = max(cfg.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


class SyncFreeEMA(AveragedModel):
    """torch's EMA ``AveragedModel`` (same state dict, same arithmetic) without host syncs per update.

    ``AveragedModel.update_parameters`` tests its on-device counter ``n_averaged`` in Python twice per
    call, which on a GPU waits for the device every step. This subclass keeps a host copy of the
    counter (read once after construction or a checkpoint load) and otherwise does exactly the same:
    copy on the first update, then the EMA ``multi_avg_fn`` over parameters and buffers.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self._count: int | None = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None  # re-read the loaded counter at the next update

    def update_parameters(self, model: torch.nn.Module) -> None:
        """Average ``model``'s parameters and buffers into this copy (no device read-back)."""
        from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

        if self._count is None:
            self._count = int(self.n_averaged)  # one read, not one per step
        averaged = [p.detach() for p in itertools.chain(self.module.parameters(), self.module.buffers())]
        current = [
            p.detach().to(a.device)
            for p, a in zip(itertools.chain(model.parameters(), model.buffers()), averaged, strict=True)
        ]
        if self._count == 0:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)
        else:
            assert self.multi_avg_fn is not None
            grouped = _group_tensors_by_device_and_dtype([averaged, current])  # type: ignore[list-item]
            for (device, _), ([avg_list, cur_list], _) in grouped.items():
                self.multi_avg_fn(avg_list, cur_list, self.n_averaged.to(device))  # type: ignore[arg-type]
        self.n_averaged += 1
        self._count += 1


def make_ema(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model`` (:class:`SyncFreeEMA`), or None."""
    if decay is None:
        return None
    return SyncFreeEMA(model, decay)


FINITE_CHECK_EVERY = 10
"""Steps between non-finite loss checks on an accelerator (each check is a host sync)."""


def optimizer_step(
    loss: torch.Tensor,
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    ema: AveragedModel | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    step: int | None = None,
    where: str | Path | None = None,
    check_finite: bool | None = None,
) -> None:
    """One update: clear gradients, backpropagate ``loss``, clip ``module``'s gradient norm, step, update EMA.

    A non-finite loss (or, with clipping, gradient norm) raises :class:`~medsynth.errors.NonFiniteLossError`
    before the optimiser touches the weights, so no NaN reaches a checkpoint. The check reads the loss
    back from the device: it runs every step on the CPU (where that costs nothing) and every
    ``FINITE_CHECK_EVERY`` steps (the logging interval) on an accelerator, so training there keeps host
    syncs to logging intervals. fp16 training with a ``GradScaler`` also skips steps with
    infinite gradients on the device.

    Args:
        loss: Scalar loss.
        module: The trained network (its parameters are clipped and averaged).
        opt: Its optimiser.
        sched: Learning-rate schedule stepped after the optimiser (None: none).
        grad_clip: Largest gradient norm (None or 0: no clipping).
        ema: EMA copy of ``module`` updated after the step (None: none).
        scaler: Loss scaler of fp16 training (None: no scaling). Gradients are unscaled before
            clipping; a step with infinite gradients is skipped and the scale reduced.
        step: 0-based step (named in the error).
        where: The stage's run folder (named in the error).
        check_finite: Check for a non-finite loss/gradient norm at this step (None: every step on the
            CPU, every ``FINITE_CHECK_EVERY`` steps on an accelerator).

    Raises:
        NonFiniteLossError: The loss or the clipped gradient norm is NaN or infinite.
    """
    if check_finite is None:  # every step on the CPU; every FINITE_CHECK_EVERY steps on an accelerator
        check_finite = loss.device.type == "cpu" or (step is not None and (step + 1) % FINITE_CHECK_EVERY == 0)
    check = check_finite
    if check and not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError("loss", float(loss.detach().float().reshape(-1)[0]), step, where)
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
            if check and not bool(torch.isfinite(norm)):
                opt.zero_grad(set_to_none=True)
                raise NonFiniteLossError("gradient norm", float(norm), step, where)
        opt.step()
    else:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
    if sched is not None:
        sched.step()
    if ema is not None:
        ema.update_parameters(module)


def batch_indices(n: int, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Indices of this process's batch at ``step``: epoch-wise permutations derived from the seed.

    The order depends only on ``(seed, step)``, so a resumed run sees exactly the batches an
    uninterrupted run would have seen. Each rank takes its own slice of the global batch.

    Args:
        n: Dataset size.
        step: Optimiser step (0-based).
        batch_size: Per-process batch size.
        seed: Seed of the permutations.
        rank: This process's rank.
        world: Number of processes.

    Returns:
        ``(batch_size,)`` int64 indices into the dataset.
    """
    global_b = batch_size * world
    start = step * global_b + rank * batch_size
    out = np.empty(batch_size, dtype=np.int64)
    for j in range(batch_size):
        pos = start + j
        epoch, off = divmod(pos, n)
        out[j] = np.random.default_rng([seed, epoch]).permutation(n)[off]
    return out


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator for the random draws of one step (noise, timesteps, dropout) — stateless across resumes."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.default_rng([seed, step, rank, 7]).integers(2**62)))
    return g


@contextlib.contextmanager
def seeded_global_rng(seed: int, step: int, rank: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG from ``(seed, step, rank)`` inside the block, restoring it afterwards.

    For random draws made inside third-party code that takes no generator (``AutoencoderKL.forward``
    samples its latent with ``torch.randn_like``): seeded per step, they no longer depend on the
    history of the process, so a resumed run repeats them exactly.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(step_generator(seed, step, rank, device).initial_seed())
        yield


def staging_choice(nbytes: int, device_type: str, budget_mb: float) -> str:
    """Where a training split lives during a loop: ``"device"``, ``"pinned"`` (host) or ``"host"``.

    On CUDA a split of at most ``budget_mb`` MiB is copied to the GPU once, so batches are gathered
    there with no host-to-device copy per step; a larger one is pinned, so each batch's copy is
    asynchronous (``non_blocking=True``). Other devices keep it as it is.
    """
    if device_type != "cuda":
        return "host"
    return "device" if nbytes <= budget_mb * 2**20 else "pinned"


def stage_split(t: torch.Tensor, device: torch.device, budget_mb: float) -> torch.Tensor:
    """``t`` placed as :func:`staging_choice` says (the CPU tensor itself on CPU: nothing changes there)."""
    where = staging_choice(t.numel() * t.element_size(), device.type, budget_mb)
    if where == "device":
        return t.to(device)
    return t.pin_memory() if where == "pinned" else t


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def channels_last(module: ModuleT, enabled: bool, spatial_dims: int) -> ModuleT:
    """Put a 2D network's weights in channels-last memory format when ``enabled`` (3D: unchanged)."""
    if enabled and spatial_dims == 2:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module


def batch_layout(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """A 4D batch in channels-last memory format when ``enabled`` (other ranks unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.ndim == 4 else x


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(module)`` when ``enabled`` (the original module keeps the weights to checkpoint)."""
    if not enabled:
        return module
    compiled: torch.nn.Module = torch.compile(module)  # type: ignore[assignment]
    return compiled


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    inner = getattr(model, "module", model)
    assert isinstance(inner, torch.nn.Module)
    return inner


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """Wrap in ``DistributedDataParallel`` when running distributed."""
    if not info.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def set_threads(n: int | None) -> None:
    """Set torch's CPU thread count (None leaves the default)."""
    if n:
        torch.set_num_threads(n)


def eta_str(seconds: float) -> str:
    """Human-readable duration."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
