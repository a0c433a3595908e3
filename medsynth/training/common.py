"""Pieces every training loop uses: device, precision, optimiser with warm-up, EMA, batches, DDP."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medsynth.config.training import OptimConfig
from medsynth.device import resolve_device
from medsynth.errors import NonFiniteLossError


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
    """bf16 autocast when ``mode`` is 'bf16', or 'auto' on CUDA; otherwise a no-op context."""
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(
    params: Iterator[torch.nn.Parameter] | list[torch.nn.Parameter], cfg: OptimConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up over ``cfg.warmup_steps``, then a constant learning rate."""
    opt = torch.optim.AdamW(list(params), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(cfg.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def make_ema(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model`` (torch's ``AveragedModel``), or None."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def optimizer_step(
    loss: torch.Tensor,
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    ema: AveragedModel | None = None,
    step: int | None = None,
    where: str | Path | None = None,
) -> None:
    """One update: clear gradients, backpropagate ``loss``, clip ``module``'s gradient norm, step, update EMA.

    A non-finite loss (or, with clipping, gradient norm) raises :class:`~medsynth.errors.NonFiniteLossError`
    before the optimiser touches the weights, so no NaN reaches a checkpoint.

    Args:
        loss: Scalar loss.
        module: The trained network (its parameters are clipped and averaged).
        opt: Its optimiser.
        sched: Learning-rate schedule stepped after the optimiser (None: none).
        grad_clip: Largest gradient norm (None or 0: no clipping).
        ema: EMA copy of ``module`` updated after the step (None: none).
        step: 0-based step (named in the error).
        where: The stage's run folder (named in the error).

    Raises:
        NonFiniteLossError: The loss or the clipped gradient norm is NaN or infinite.
    """
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError("loss", float(loss.detach().float().reshape(-1)[0]), step, where)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        if not bool(torch.isfinite(norm)):
            opt.zero_grad(set_to_none=True)
            raise NonFiniteLossError("gradient norm", float(norm), step, where)
    opt.step()
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
