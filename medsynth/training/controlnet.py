"""ControlNet training on cached latents + full-resolution one-hot masks (base UNet frozen)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from medsynth.config.loader import config_dict, save_resolved
from medsynth.config.schema import MedsynthConfig
from medsynth.diffusion.objectives import DiffusionObjective
from medsynth.models.autoencoder import downsample_factor
from medsynth.models.controlnet import ControlledUNet, one_hot_mask
from medsynth.synthesis.generator import (
    CONTROLNET,
    CONTROLNET_EMA,
    build_controlled,
    load_generator,
    load_unet,
    make_objective,
)
from medsynth.training.autoencoder import StageResult, metrics_of
from medsynth.training.checkpoint import (
    completed_checkpoint,
    restore_training_state,
    resumable_checkpoint,
    save_checkpoint,
)
from medsynth.training.common import (
    autocast,
    batch_indices,
    make_ema,
    make_optimizer,
    set_threads,
    step_generator,
    wrap_ddp,
)
from medsynth.training.context import StageContext, StepTimer
from medsynth.training.denoising import bind_cond, denoising_loss, label_weight_map, validation_loss
from medsynth.training.latents import LatentSet, load_latents
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


def train_controlnet(
    cfg: MedsynthConfig,
    latent_dir: str | Path,
    unet_run: str | Path,
    ctx: StageContext,
    ae_run: str | Path | None = None,
) -> StageResult:
    """Train the ControlNet on masks, initialised from the trained UNet, which stays frozen.

    Args:
        cfg: Resolved config (``controlnet`` section).
        latent_dir: Folder with ``train.npz`` (and optionally ``val.npz``).
        unet_run: Run folder of the trained diffusion UNet.
        ctx: Run folder, resume flag, device, tracker and progress.
        ae_run: Autoencoder run folder; when given, a sample grid (image | mask | synthetic) is saved.

    Returns:
        Final checkpoint (``controlnet`` and ``controlnet_ema`` weights; ``num_classes`` in extras).
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
    controlled = build_controlled(cfg, unet, train.num_classes).to(dev)
    cn = controlled.controlnet
    opt, sched = make_optimizer(cn.parameters(), oc)
    ema = make_ema(cn, oc.ema_decay)
    networks: dict[str, torch.nn.Module] = {CONTROLNET: cn, **({CONTROLNET_EMA: ema} if ema else {})}
    start = 0
    latest = resumable_checkpoint(ctx.run_dir, ctx.input_key, ctx.resume)
    if latest is not None:
        start = restore_training_state(latest, networks, {"controlnet": opt}, {"controlnet": sched})
    model = wrap_ddp(controlled, ctx.dist, dev)
    timer = StepTimer("controlnet", start, oc.steps, ctx.dist.is_main)
    metrics: dict[str, float] = {}

    for step in range(start, oc.steps):
        # --- batch: scaled latents, one-hot masks (some dropped to the null mask), loss weights ---
        idx = batch_indices(len(train), step, oc.batch_size, oc.seed, ctx.dist.rank, ctx.dist.world_size)
        x0 = train.latents[idx].to(dev) * train.scale_factor
        onehot = one_hot_mask(train.masks[idx].to(dev).long(), train.num_classes)
        g = step_generator(oc.seed, step, ctx.dist.rank, dev)
        weights = label_weight_map(onehot, sc.label_weights, factor)
        cond = drop_masks(onehot, sc.mask_dropout, g)
        model.train()
        with autocast(dev, oc.amp):
            loss = denoising_loss(bind_cond(model, cond), objective, x0, g, weights)
        # --- update (ControlNet parameters only) ---
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if oc.grad_clip:
            torch.nn.utils.clip_grad_norm_(cn.parameters(), oc.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(cn)
        # --- logging, validation, checkpoints ---
        done = step + 1
        ctx.progress.advance(1, f"loss={loss.item():.4f}")
        timer.tick(done, {"loss": loss.item()})
        if ctx.dist.is_main and (done % 10 == 0 or done == oc.steps):
            ctx.tracker.log_metrics({"controlnet/train_loss": loss.item()}, step=done)
        if ctx.dist.is_main and (done % oc.val_every == 0 or done == oc.steps):
            metrics = {"val_loss": _ema_val_loss(controlled, ema, objective, val, oc.batch_size, oc.val_batches, dev)}
            ctx.tracker.log_metrics({"controlnet/val_loss": metrics["val_loss"]}, step=done)
        if ctx.dist.is_main and done % oc.ckpt_every == 0 and done < oc.steps:
            save_checkpoint(
                ctx.run_dir,
                done,
                networks,
                {"controlnet": opt},
                {"controlnet": sched},
                config_dict(cfg),
                extras=ctx.extras(),
                keep=oc.keep_checkpoints,
            )

    # --- final checkpoint and a mask-conditioned sample grid on validation masks ---
    if not ctx.dist.is_main:
        return StageResult(ctx.run_dir, ctx.run_dir, metrics)
    ckpt = save_checkpoint(
        ctx.run_dir,
        oc.steps,
        networks,
        {"controlnet": opt},
        {"controlnet": sched},
        config_dict(cfg),
        extras=ctx.extras(num_classes=train.num_classes, **metrics),
        keep=oc.keep_checkpoints,
        final=True,
    )
    if ae_run is not None:
        gen = load_generator(cfg, ae_run, unet_run, ctx.run_dir, dev, train.num_classes)
        n = min(6, len(val))
        synth = gen.generate(val.masks[:n], cfg.sampling, seed=0)
        grid = control_grid(ctx.run_dir / "samples" / "controlnet.png", val.images[:n], val.masks[:n], synth)
        ctx.tracker.log_artifact(grid, "samples/controlnet")
    return StageResult(ctx.run_dir, ckpt.path, metrics)


def _ema_val_loss(
    controlled: ControlledUNet,
    ema: AveragedModel | None,
    objective: DiffusionObjective,
    val: LatentSet,
    batch: int,
    n_batches: int,
    dev: torch.device,
) -> float:
    """Validation loss with the EMA ControlNet weights swapped in temporarily."""
    cn = controlled.controlnet
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
