"""What a training stage needs besides its config: where to write, the device, tracker and progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medsynth.checkpoint import Checkpoint, save_checkpoint
from medsynth.config.loader import config_dict
from medsynth.config.schema import MedsynthConfig
from medsynth.progress import NullProgress, Progress
from medsynth.tracking.base import NullTracker, Tracker
from medsynth.training.common import DistInfo, eta_str, init_distributed, pick_device

log = logging.getLogger("medsynth.training")


@dataclass
class StageContext:
    """Run-time context of one training stage.

    Attributes:
        run_dir: The stage's output folder (checkpoints/, samples/, config).
        resume: Continue from the latest checkpoint in ``run_dir`` if there is one.
        tracker: Receives params, metrics and artifacts.
        progress: Receives one ``advance()`` per optimiser step.
        device: Torch device (default: CUDA if available, else CPU).
        dist: Distributed facts (set by :func:`StageContext.create`).
        input_key: Hash of everything the stage depends on (config section + input hashes). When
            set, a final checkpoint with the same key makes the stage a no-op, and only checkpoints
            with the same key are resumed.
    """

    run_dir: Path
    resume: bool = False
    tracker: Tracker = field(default_factory=NullTracker)
    progress: Progress = field(default_factory=NullProgress)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: DistInfo = field(default_factory=DistInfo)
    input_key: str | None = None

    @classmethod
    def create(
        cls,
        run_dir: str | Path,
        resume: bool = False,
        tracker: Tracker | None = None,
        progress: Progress | None = None,
        device: str | None = None,
        input_key: str | None = None,
    ) -> StageContext:
        """Build a context: initialise DDP under torchrun and pick the device."""
        info = init_distributed()
        dev = torch.device(device) if device else pick_device(info)
        return cls(Path(run_dir), resume, tracker or NullTracker(), progress or NullProgress(), dev, info, input_key)

    def extras(self, **values: Any) -> dict[str, Any]:
        """Checkpoint extras: ``values`` plus the stage's input key."""
        return {**values, "input_key": self.input_key}

    def save(
        self,
        step: int,
        networks: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Mapping[str, Any],
        cfg: MedsynthConfig,
        keep: int,
        final: bool = False,
        **extras: Any,
    ) -> Checkpoint:
        """Checkpoint the stage into ``run_dir`` (weights, optimiser state, resolved config, extras + input key).

        Args:
            step: Completed optimiser steps.
            networks: Named modules saved as safetensors.
            optimizers: Named optimisers.
            schedulers: Named LR schedulers.
            cfg: The resolved config, saved as JSON beside the weights.
            keep: Step folders kept.
            final: Mark training as complete (``final.json``).
            **extras: JSON-compatible values stored with the checkpoint (e.g. ``scale_factor``).
        """
        return save_checkpoint(
            self.run_dir,
            step,
            networks,
            optimizers,
            schedulers,
            config_dict(cfg),
            extras=self.extras(**extras),
            keep=keep,
            final=final,
        )


#: Optimiser steps between training-metric logs (the only host synchronisations of a training loop).
LOG_EVERY = 10


def log_due(done: int, total: int, every: int = LOG_EVERY) -> bool:
    """True after step ``done`` (1-based) when training metrics are read back and logged."""
    return done % every == 0 or done == total


class StepMeans:
    """Per-step scalars summed on the device; read back (one host sync) only when logged.

    Calling ``loss.item()`` every step stalls a GPU pipeline; instead each step's detached values
    are added to device tensors and :meth:`means` returns the means since the previous read.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._n = 0

    def add(self, **values: torch.Tensor) -> None:
        """Accumulate this step's scalar tensors (detached; no synchronisation)."""
        for k, v in values.items():
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._n += 1

    def means(self) -> dict[str, float]:
        """Means over the steps since the last call (one host sync), then reset."""
        if not self._n:
            return {}
        keys = list(self._sums)
        vals = (torch.stack([self._sums[k] for k in keys]) / self._n).tolist()
        self._sums, self._n = {}, 0
        return dict(zip(keys, vals, strict=True))


class StepTimer:
    """Logs loss, rate and ETA every ``every_s`` seconds (rank 0 only)."""

    def __init__(self, name: str, start: int, total: int, is_main: bool, every_s: float = 30.0) -> None:
        self.name, self.start, self.total, self.is_main, self.every_s = name, start, total, is_main, every_s
        self.t0 = self.last = time.monotonic()

    def tick(self, step: int, metrics: dict[str, Any]) -> None:
        """Maybe log a line after ``step`` (1-based count of completed steps)."""
        now = time.monotonic()
        if not self.is_main or (now - self.last < self.every_s and step < self.total):
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        vals = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log.info("%s step %d/%d (%.2f it/s, ETA %s) %s", self.name, step, self.total, rate, eta_str(eta), vals)
