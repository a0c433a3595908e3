"""ControlNet training on cached latents + full-resolution one-hot masks (base UNet frozen)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.optim.swa_utils import AveragedModel

from medsynth.checkpoint import (
    completed_checkpoint,
    find_checkpoint,
    restore_training_state,
    resumable_checkpoint,
)
from medsynth.config.loader import save_resolved
from medsynth.config.schema import MedsynthConfig
from medsynth.config.stages import ControlNetStage
from medsynth.diffusion.objectives import DiffusionObjective
from medsynth.errors import DataError
from medsynth.generator import (
    CONTROLNET,
    CONTROLNET_EMA,
    build_controlled,
    ema_weights,
    load_generator,
    load_unet,
    make_objective,
)
from medsynth.models.autoencoder import downsample_factor
from medsynth.models.controlnet import ControlledUNet, fuse_swish, one_hot_mask
from medsynth.training.autoencoder import StageResult, metrics_of
from medsynth.training.common import (
    batch_indices,
    batch_layout,
    channels_last,
    make_ema,
    make_optimizer,
    maybe_compile,
    optimizer_step,
    set_threads,
    stage_split,
    step_generator,
    wrap_ddp,
)
from medsynth.training.context import StageContext, StepMeans, StepTimer, log_due
from medsynth.training.denoising import bind_cond, denoising_loss, label_weight_map, validation_loss
from medsynth.training.latents import LatentSet, load_latents
from medsynth.training.precision import AmpPolicy, policy_for
from medsynth.viz import overlay_rgb, save_grid, to_2d


def drop_masks(onehot: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each sample's mask by the null (all-zero) mask with probability ``p`` (for CFG)."""
    if p <= 0:
        return onehot
    keep = (torch.rand(onehot.shape[0], generator=generator, device=onehot.device) >= p).to(onehot.dtype)
    return onehot * keep.view(-1, *([1] * (onehot.ndim - 1)))


def control_grid(path: Path, images: torch.Tensor, masks: torch.Tensor, synth: torch.Tensor, n: int = 6) -> Path:
    """Sample grid ``image | mask | synthetic`` for up to ``n`` items (2D, or the middle slice in 3D)."""
    rows = []
    for i in range(min(n, len(images))):
        m = to_2d(masks[i, 0].numpy())
        rows.append(
            [
                to_2d(images[i, 0].numpy()),
                overlay_rgb(to_2d(images[i, 0].numpy()), m, alpha=0.6),
                to_2d(synth[i, 0].numpy()),
                overlay_rgb(to_2d(synth[i, 0].numpy()), m, alpha=0.35),
            ]
        )
    return save_grid(path, rows, col_titles=["real image", "mask", "synthetic", "synthetic + mask"])


def controlnet_loss(
    model: torch.nn.Module,
    objective: DiffusionObjective,
    data: LatentSet,
    idx: npt.NDArray[np.int64],
    g: torch.Generator,
    sc: ControlNetStage,
    factor: int,
    precision: AmpPolicy | None = None,
    layout_channels_last: bool = False,
) -> torch.Tensor:
    """The ControlNet training loss on one batch of the latent cache.

    Scaled cached latent means, the full-resolution one-hot masks (a ``mask_dropout`` share replaced
    by the null mask for classifier-free guidance), per-label loss weights at latent resolution, and
    the objective's denoising loss through the controlled UNet.

    Args:
        model: The :class:`~medsynth.models.controlnet.ControlledUNet` (possibly DDP-wrapped).
        objective: The diffusion objective (noise schedule and target).
        data: Latent cache: latents ``(N, C, *L)``, masks ``(N, 1, *L * factor)``, scale factor.
        idx: Batch indices into ``data``.
        g: Generator of this step's noise, timesteps and mask dropout.
        sc: ControlNet section (``label_weights``, ``mask_dropout``).
        factor: The autoencoder's image-to-latent factor.
        precision: Mixed-precision policy of the forward pass (None: fp32).
        layout_channels_last: Give 2D batches the channels-last memory format.

    Returns:
        Scalar loss.
    """
    dev = g.device
    x0 = batch_layout(data.latents[idx].to(dev, non_blocking=True) * data.scale_factor, layout_channels_last)
    onehot = one_hot_mask(data.masks[idx].to(dev, non_blocking=True), data.num_classes, check=False)
    weights = label_weight_map(onehot, sc.label_weights, factor)
    cond = batch_layout(drop_masks(onehot, sc.mask_dropout, g), layout_channels_last)
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        return denoising_loss(bind_cond(model, cond), objective, x0, g, weights)


@dataclass(frozen=True)
class TrainFrom:
    """Continue a trained generator and train only chosen parameters (site adaptation), in the same loop.

    Attributes:
        controlnet_run: Run folder of the trained ControlNet to start from (its final EMA weights).
        trainable: Called once with the assembled ControlledUNet (base weights loaded); may change it
            in place (e.g. inject LoRA layers) and returns the module whose parameters are trained,
            averaged (EMA), clipped and checkpointed (e.g. a :class:`~medsynth.models.lora.ParamSubset`).
        name: Checkpoint name of that module (``<name>`` and ``<name>_ema``).
    """

    controlnet_run: Path
    trainable: Callable[[ControlledUNet], torch.nn.Module]
    name: str = "adapter"


def train_controlnet(
    cfg: MedsynthConfig,
    latent_dir: str | Path,
    unet_run: str | Path,
    ctx: StageContext,
    ae_run: str | Path | None = None,
    train_from: TrainFrom | None = None,
) -> StageResult:
    """Train the ControlNet on masks, initialised from the trained UNet, which stays frozen.

    Args:
        cfg: Resolved config (``controlnet`` section).
        latent_dir: Folder with ``train.npz`` (and optionally ``val.npz``).
        unet_run: Run folder of the trained diffusion UNet.
        ctx: Run folder, resume flag, device, tracker and progress.
        ae_run: Autoencoder run folder; when given, a sample grid (image | mask | synthetic) is saved.
        train_from: Start from a trained ControlNet and train only the parameters ``train_from.trainable`` selects
            (site adaptation); None: a new ControlNet initialised from the UNet, all of it trained.

    Returns:
        Final checkpoint (``controlnet`` and ``controlnet_ema`` weights, or ``train_from.name`` and
        ``<train_from.name>_ema``; ``num_classes`` in extras).
    """
    sc, oc = cfg.controlnet, cfg.controlnet.train
    done_ckpt = completed_checkpoint(ctx.run_dir, ctx.input_key)
    if done_ckpt is not None:  # same inputs already trained: nothing to do
        return StageResult(ctx.run_dir, done_ckpt.path, metrics_of(done_ckpt))
    set_threads(oc.num_threads)
    dev = ctx.device
    latent_dir = Path(latent_dir)
    train = load_latents(latent_dir / "train.npz")
    val = load_latents(latent_dir / "val.npz") if (latent_dir / "val.npz").is_file() else train
    objective = make_objective(cfg, list(train.latents.shape[2:]))
    factor = downsample_factor(cfg.autoencoder)
    if ctx.dist.is_main:
        save_resolved(cfg, ctx.run_dir)

    # --- networks: frozen UNet + ControlNet initialised from it; optimiser over the ControlNet only ---
    torch.manual_seed(oc.seed)
    unet = load_unet(cfg, unet_run, dev)
    dims = cfg.preprocess.spatial_dims
    controlled = channels_last(build_controlled(cfg, unet, train.num_classes).to(dev), oc.channels_last, dims)
    cn: torch.nn.Module = controlled.controlnet
    name, ema_name = CONTROLNET, CONTROLNET_EMA
    if train_from is not None:  # a trained generator: its ControlNet, and only the selected parameters train
        base = find_checkpoint(train_from.controlnet_run, "final")
        if base is None:
            raise DataError(train_from.controlnet_run, "no final ControlNet checkpoint to adapt")
        if int(base.extras.get("num_classes", train.num_classes)) != train.num_classes:
            raise DataError(
                latent_dir / "train.npz",
                f"masks have {train.num_classes} classes, the generator {base.extras.get('num_classes')}",
            )
        controlled.controlnet.load_state_dict(ema_weights(base, CONTROLNET, CONTROLNET_EMA))
        cn = train_from.trainable(controlled)
        name, ema_name = train_from.name, f"{train_from.name}_ema"
    opt, sched = make_optimizer(cn.parameters(), oc, dev)
    ema = make_ema(cn, oc.ema_decay)
    precision = policy_for(dev, oc.amp)  # bf16 / fp16 + loss scaling / fp32 by device capability
    scaler = precision.make_scaler()
    if precision.enabled:  # one fused SiLU kernel for MONAI's Swish (fp32 stays bit-identical without it)
        fuse_swish(controlled)
    networks: dict[str, torch.nn.Module] = {name: cn, **({ema_name: ema} if ema else {})}
    schedulers: dict[str, Any] = {"controlnet": sched, **({"controlnet_scaler": scaler} if scaler is not None else {})}
    start = 0
    latest = resumable_checkpoint(ctx.run_dir, ctx.input_key, ctx.resume)
    if latest is not None:
        start = restore_training_state(latest, networks, {"controlnet": opt}, schedulers)
    model = maybe_compile(wrap_ddp(controlled, ctx.dist, dev), oc.compile)
    timer = StepTimer("controlnet", start, oc.steps, ctx.dist.is_main)
    metrics: dict[str, float] = {}
    means, info = StepMeans(), ""
    one_hot_mask(train.masks[:1].long(), train.num_classes)  # shape check; the value range below, once
    if len(train) and (int(train.masks.min()) < 0 or int(train.masks.max()) >= train.num_classes):
        raise DataError(latent_dir / "train.npz", f"mask labels outside [0, {train.num_classes})")
    # the split on the GPU once when it fits (pinned host memory otherwise); unchanged on CPU
    staged = replace(
        train,
        latents=stage_split(train.latents, dev, oc.device_data_mb),
        masks=stage_split(train.masks, dev, oc.device_data_mb),
    )

    for step in range(start, oc.steps):
        idx = batch_indices(len(train), step, oc.batch_size, oc.seed, ctx.dist.rank, ctx.dist.world_size)
        g = step_generator(oc.seed, step, ctx.dist.rank, dev)
        model.train()
        loss = controlnet_loss(model, objective, staged, idx, g, sc, factor, precision, oc.channels_last)
        optimizer_step(loss, cn, opt, sched, oc.grad_clip, ema, scaler, step=step, where=ctx.run_dir)
        # --- logging (the only host sync: means since the last log), validation, checkpoints ---
        done = step + 1
        means.add(loss=loss)
        if log_due(done, oc.steps):
            m = means.means()
            info = f"loss={m['loss']:.4f}"
            timer.tick(done, m)
            if ctx.dist.is_main:
                ctx.tracker.log_metrics({"controlnet/train_loss": m["loss"]}, step=done)
        ctx.progress.advance(1, info)
        if ctx.dist.is_main and (done % oc.val_every == 0 or done == oc.steps):
            metrics = {
                "val_loss": _ema_val_loss(controlled, cn, ema, objective, val, oc.batch_size, oc.val_batches, dev)
            }
            ctx.tracker.log_metrics({"controlnet/val_loss": metrics["val_loss"]}, step=done)
        if ctx.dist.is_main and done % oc.ckpt_every == 0 and done < oc.steps:
            ctx.save(done, networks, {"controlnet": opt}, schedulers, cfg, oc.keep_checkpoints)

    # --- final checkpoint and a mask-conditioned sample grid on validation masks ---
    if not ctx.dist.is_main:
        return StageResult(ctx.run_dir, ctx.run_dir, metrics)
    ckpt = ctx.save(
        oc.steps,
        networks,
        {"controlnet": opt},
        schedulers,
        cfg,
        oc.keep_checkpoints,
        final=True,
        num_classes=train.num_classes,
        **metrics,
    )
    if ae_run is not None and train_from is None:
        gen = load_generator(cfg, ae_run, unet_run, ctx.run_dir, dev, train.num_classes)
        n = min(6, len(val))
        synth = gen.generate(val.masks[:n], cfg.sampling.preview(), seed=0)  # before any guidance calibration
        grid = control_grid(ctx.run_dir / "samples" / "controlnet.png", val.images[:n], val.masks[:n], synth)
        ctx.tracker.log_artifact(grid, "samples/controlnet")
    return StageResult(ctx.run_dir, ckpt.path, metrics)


def _ema_val_loss(
    controlled: ControlledUNet,
    cn: torch.nn.Module,
    ema: AveragedModel | None,
    objective: DiffusionObjective,
    val: LatentSet,
    batch: int,
    n_batches: int,
    dev: torch.device,
) -> float:
    """Validation loss with the EMA weights of the trained module ``cn`` swapped in temporarily."""
    backup = None
    if ema is not None:
        backup = {k: v.detach().clone() for k, v in cn.state_dict().items()}
        cn.load_state_dict(ema.module.state_dict())
    try:
        controlled.eval()
        return validation_loss(
            lambda x, t, c: controlled(x, t, c),
            objective,
            val,
            batch,  # type: ignore[arg-type]
            n_batches,
            dev,
            conditional=True,
        )
    finally:
        if backup is not None:
            cn.load_state_dict(backup)
