"""Optimisation settings shared by every training loop."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from medsynth.config.base import StrictModel


def _amp_from_yaml(value: Any) -> Any:
    """YAML 1.1 reads a bare ``off`` as False: accept it (and False) as ``"off"``."""
    return "off" if value is False else value


AmpSetting = Annotated[Literal["auto", "bf16", "fp16", "off"], BeforeValidator(_amp_from_yaml)]


RUNTIME_FIELDS = ("num_threads", "channels_last", "compile", "device_data_mb")
"""OptimConfig fields that change how fast a loop runs, not what it learns: left out of input keys."""


class OptimConfig(StrictModel):
    """AdamW with linear warm-up, gradient clipping, EMA, mixed precision and checkpointing."""

    steps: int = Field(1000, ge=1, description="Optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Batch size per process (global batch = this x world size).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear learning-rate warm-up steps.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm (None: no clipping).")
    ema_decay: float | None = Field(0.999, gt=0, lt=1, description="EMA decay of the weights (None: no EMA).")
    amp: AmpSetting = Field(
        "auto",
        description=(
            "Mixed precision: 'auto' = bf16 autocast on CUDA capability >= 8.0 (Ampere+), fp16 autocast + "
            "GradScaler on older GPUs, fp32 on CPU; 'bf16' / 'fp16' force one (bf16 is the fast CPU choice "
            "where the CPU has native bf16); 'off' = fp32 everywhere."
        ),
    )
    channels_last: bool = Field(
        False, description="2D only: channels-last memory format for networks and batches (faster convs on GPU)."
    )
    compile: bool = Field(False, description="torch.compile the trained network's forward (first steps compile).")
    device_data_mb: float = Field(
        2048.0,
        ge=0,
        description="CUDA: a training split up to this size is moved to the GPU once (no per-step copies); a "
        "larger one stays in pinned host memory (asynchronous copies). Ignored on CPU.",
    )
    val_every: int = Field(200, ge=1, description="Validation loss (and sample grid) every N steps.")
    val_batches: int = Field(2, ge=1, description="Validation batches per evaluation.")
    ckpt_every: int = Field(500, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Step checkpoints kept on disk (the final one always).")
    seed: int = Field(0, description="Seed of batch order, noise and timesteps (per step, so resume is exact).")
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads (None: torch default). 1 is immune to contention."
    )
