"""Adapt a trained generator to new data with LoRA or full fine-tuning, in the ControlNet training loop.

The loop is :func:`medsynth.training.controlnet.train_controlnet` itself (same loss, masks, dropout,
label weights, checkpoints): :class:`~medsynth.training.controlnet.TrainFrom` makes it start from the
generator's trained UNet + ControlNet and train only the adapter's parameters. The result is an
adapter folder (:mod:`medsynth.adapter`: safetensors + JSON) that
:func:`medsynth.adapter.apply_adapter` puts on top of the base generator.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsynth.adapter import AdapterSpec, adapted_layers, save_adapter
from medsynth.checkpoint import find_checkpoint
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet
from medsynth.errors import ConfigError, DataError
from medsynth.models.controlnet import ControlledUNet
from medsynth.models.lora import ParamSubset, adapter_names, count_parameters, freeze_all_but, wrap_lora
from medsynth.progress import Progress
from medsynth.training.context import StageContext

log = logging.getLogger(__name__)
ADAPTER = "adapter"


@dataclass(frozen=True)
class AdaptSettings:
    """How to adapt: method, LoRA rank/alpha, adapted networks and the loop's steps, learning rate, batch."""

    method: str
    rank: int = 4
    alpha: float | None = None
    networks: tuple[str, ...] = ("unet", "controlnet")
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    seed: int = 0

    def check(self) -> None:
        """A one-line :class:`ConfigError` for a method that trains nothing or a bad rank."""
        if self.method not in ("lora", "full"):
            raise ConfigError("command line", f"--method must be lora or full to adapt (got {self.method!r})")
        if self.method == "lora" and self.rank < 1:
            raise ConfigError("command line", f"--rank must be >= 1 (got {self.rank})")


@dataclass(frozen=True)
class AdaptOutcome:
    """An adapter written to disk: where, what, and the adaptation's wall time and final loss."""

    folder: Path
    spec: AdapterSpec
    seconds: float
    metrics: dict[str, float]


def adaptation_config(cfg: MedsynthConfig, s: AdaptSettings) -> MedsynthConfig:
    """The config of the adaptation loop: the ControlNet section with the adaptation's optimiser settings.

    No EMA (a few hundred steps would leave the averaged weights near the start), one checkpoint at
    the end, a short warm-up.
    """
    train = cfg.controlnet.train.model_copy(
        update={
            "steps": s.steps,
            "lr": s.lr,
            "batch_size": s.batch_size,
            "warmup_steps": min(cfg.controlnet.train.warmup_steps, max(s.steps // 10, 1)),
            "ema_decay": None,
            "val_every": s.steps,
            "ckpt_every": s.steps,
            "keep_checkpoints": 1,
            "seed": s.seed,
        }
    )
    return cfg.model_copy(update={"controlnet": cfg.controlnet.model_copy(update={"train": train})})


def encode_for_adaptation(
    cfg: MedsynthConfig, items: ArraySet, ae_run: Path, out_dir: Path, device: torch.device
) -> Path:
    """Encode the adaptation items with the generator's autoencoder into ``out_dir/train.npz``."""
    from medsynth.training.latents import encode_split

    return encode_split(cfg, out_dir, ae_run, out_dir, "train", device, items=items)


def adapt_generator(
    cfg: MedsynthConfig,
    bundle: Path,
    latent_dir: Path,
    out: Path,
    s: AdaptSettings,
    *,
    device: torch.device | None = None,
    progress: Progress | None = None,
    info: dict[str, Any] | None = None,
) -> AdaptOutcome:
    """Train an adapter of the generator ``bundle`` on the latents in ``latent_dir`` and save it to ``out``.

    Args:
        cfg: Resolved config (networks as in the bundle; ``controlnet`` loss settings).
        bundle: Generator bundle (``unet/``, ``controlnet/`` run folders with final checkpoints).
        latent_dir: Folder with ``train.npz`` (latents + masks of the new data, see :func:`encode_for_adaptation`).
        out: The adapter folder to write (replaced atomically); the loop's checkpoints go to ``out``'s sibling
            ``.<name>.run/`` and are removed afterwards.
        s: Method and loop settings.
        device: Torch device (default CPU).
        progress: One ``advance()`` per step.
        info: Extra JSON values recorded in ``adapter.json`` (site, patients, ...).

    Returns:
        The :class:`AdaptOutcome`.
    """
    import shutil

    from medsynth.training.controlnet import TrainFrom, train_controlnet

    s.check()
    dev = device or torch.device("cpu")
    for part in ("unet", "controlnet"):
        if find_checkpoint(bundle / part, "final") is None:
            raise DataError(bundle / part, f"no final {part} checkpoint: not a trained generator")
    chosen: dict[str, Any] = {}

    def trainable(controlled: ControlledUNet) -> torch.nn.Module:
        layers = adapted_layers(controlled, s.networks)
        if s.method == "lora":
            wrap_lora(controlled, layers, s.rank, s.alpha)
        names = adapter_names(controlled, s.method, layers)  # type: ignore[arg-type]
        freeze_all_but(controlled, names)
        subset = ParamSubset(controlled, names)
        chosen.update(layers=layers, subset=subset, total=count_parameters(controlled))
        return subset

    run_dir = out.parent / f".{out.name}.run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if s.method == "lora":  # import peft (and transformers) before the clock starts: not part of adapting
        from medsynth.models.lora import peft_api

        peft_api()
    ctx = StageContext(run_dir, resume=False, device=dev)
    if progress is not None:
        ctx.progress = progress
    t0 = time.monotonic()
    res = train_controlnet(
        adaptation_config(cfg, s),
        latent_dir,
        bundle / "unet",
        ctx,
        ae_run=None,
        train_from=TrainFrom(bundle / "controlnet", trainable, ADAPTER),
    )
    seconds = time.monotonic() - t0
    ckpt = find_checkpoint(run_dir, "final")
    assert ckpt is not None
    subset: ParamSubset = chosen["subset"]
    tensors = subset.rename(ckpt.weights(ADAPTER))
    base = {
        f"{part}/{k}": v
        for part in ("unet", "controlnet")
        for k, v in find_checkpoint(bundle / part, "final").file_hashes().items()  # type: ignore[union-attr]
    }
    spec = AdapterSpec(
        method=s.method,  # type: ignore[arg-type]
        rank=s.rank if s.method == "lora" else 0,
        alpha=float(s.alpha if s.alpha is not None else s.rank) if s.method == "lora" else 0.0,
        networks=tuple(s.networks),
        layers=tuple(chosen["layers"]),
        trainable_parameters=sum(int(t.numel()) for t in tensors.values()),
        base=base,
        info={
            "steps": s.steps,
            "lr": s.lr,
            "batch_size": s.batch_size,
            "seed": s.seed,
            "seconds": round(seconds, 2),
            "network_parameters": int(chosen["total"]),
            "final_val_loss": res.metrics.get("val_loss"),
            **(info or {}),
        },
    )
    save_adapter(out, spec, tensors)
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("%s adapter: %d trainable parameters, %.1fs -> %s", s.method, spec.trainable_parameters, seconds, out)
    return AdaptOutcome(out, spec, seconds, {k: float(v) for k, v in res.metrics.items()})
