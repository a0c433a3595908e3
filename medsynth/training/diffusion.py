"""Diffusion UNet training on cached latents (epsilon, v-prediction or rectified flow)."""

from __future__ import annotations

from pathlib import Path

import torch

from medsynth.config.loader import save_resolved
from medsynth.config.schema import MedsynthConfig
from medsynth.models.unet import build_diffusion_unet
from medsynth.synthesis.generator import UNET, UNET_EMA, load_generator, make_objective
from medsynth.training.autoencoder import StageResult, metrics_of
from medsynth.training.checkpoint import (
    completed_checkpoint,
    restore_training_state,
    resumable_checkpoint,
)
from medsynth.training.common import (
    autocast,
    batch_indices,
    make_ema,
    make_optimizer,
    optimizer_step,
    set_threads,
    step_generator,
    wrap_ddp,
)
from medsynth.training.context import StageContext, StepTimer
from medsynth.training.denoising import bind_cond, denoising_loss, unconditional, validation_loss
from medsynth.training.latents import LatentSet, load_latents
from medsynth.viz import save_grid, to_2d


def _val_set(latent_dir: Path, train: LatentSet) -> LatentSet:
    f = latent_dir / "val.npz"
    return load_latents(f) if f.is_file() else train


def train_diffusion(
    cfg: MedsynthConfig, latent_dir: str | Path, ctx: StageContext, ae_run: str | Path | None = None
) -> StageResult:
    """Train the latent diffusion UNet (unconditional) on the cached training latents.

    Args:
        cfg: Resolved config (``diffusion`` section).
        latent_dir: Folder with ``train.npz`` (and optionally ``val.npz``) from the encode stage.
        ctx: Run folder, resume flag, device, tracker and progress.
        ae_run: Autoencoder run folder; when given, sample grids are decoded and saved.

    Returns:
        Final checkpoint (``unet`` and ``unet_ema`` weights) and the last validation loss.
    """
    sc, oc = cfg.diffusion, cfg.diffusion.train
    done_ckpt = completed_checkpoint(ctx.run_dir, ctx.input_key)
    if done_ckpt is not None:  # same inputs already trained: nothing to do
        return StageResult(ctx.run_dir, done_ckpt.path, metrics_of(done_ckpt))
    set_threads(oc.num_threads)
    dev = ctx.device
    latent_dir = Path(latent_dir)
    train = load_latents(latent_dir / "train.npz")
    val = _val_set(latent_dir, train)
    objective = make_objective(cfg, list(train.latents.shape[2:]))
    if ctx.dist.is_main:
        save_resolved(cfg, ctx.run_dir)

    # --- network, optimiser, EMA, resume ---
    torch.manual_seed(oc.seed)
    unet = build_diffusion_unet(sc, cfg.preprocess.spatial_dims, int(train.latents.shape[1])).to(dev)
    opt, sched = make_optimizer(unet.parameters(), oc)
    ema = make_ema(unet, oc.ema_decay)
    networks: dict[str, torch.nn.Module] = {UNET: unet, **({UNET_EMA: ema} if ema else {})}
    start = 0
    latest = resumable_checkpoint(ctx.run_dir, ctx.input_key, ctx.resume)
    if latest is not None:
        start = restore_training_state(latest, networks, {"unet": opt}, {"unet": sched})
    model = wrap_ddp(unet, ctx.dist, dev)
    timer = StepTimer("diffusion", start, oc.steps, ctx.dist.is_main)
    metrics: dict[str, float] = {}
    drawn: list[tuple[int, ...]] = []  # this process's batch indices per step (a record for checks)

    for step in range(start, oc.steps):
        # --- batch and loss ---
        idx = batch_indices(len(train), step, oc.batch_size, oc.seed, ctx.dist.rank, ctx.dist.world_size)
        drawn.append(tuple(int(i) for i in idx))
        x0 = train.latents[idx].to(dev) * train.scale_factor
        g = step_generator(oc.seed, step, ctx.dist.rank, dev)
        model.train()
        with autocast(dev, oc.amp):
            loss = denoising_loss(bind_cond(unconditional(model), None), objective, x0, g)
        # --- update ---
        optimizer_step(loss, unet, opt, sched, oc.grad_clip, ema)
        # --- logging, validation, checkpoints ---
        done = step + 1
        ctx.progress.advance(1, f"loss={loss.item():.4f}")
        timer.tick(done, {"loss": loss.item()})
        if ctx.dist.is_main and (done % 10 == 0 or done == oc.steps):
            ctx.tracker.log_metrics({"unet/train_loss": loss.item()}, step=done)
        if ctx.dist.is_main and (done % oc.val_every == 0 or done == oc.steps):
            eval_net = ema.module if ema is not None else unet
            vl = validation_loss(
                unconditional(eval_net),
                objective,
                val,
                oc.batch_size,
                oc.val_batches,
                dev,
                conditional=False,
            )
            metrics = {"val_loss": vl}
            ctx.tracker.log_metrics({"unet/val_loss": metrics["val_loss"]}, step=done)
        if ctx.dist.is_main and done % oc.ckpt_every == 0 and done < oc.steps:
            ctx.save(done, networks, {"unet": opt}, {"unet": sched}, cfg, oc.keep_checkpoints)

    # --- final checkpoint and an unconditional sample grid ---
    if not ctx.dist.is_main:
        return StageResult(ctx.run_dir, ctx.run_dir, metrics, drawn=tuple(drawn))
    ckpt = ctx.save(
        oc.steps,
        networks,
        {"unet": opt},
        {"unet": sched},
        cfg,
        oc.keep_checkpoints,
        final=True,
        scale_factor=train.scale_factor,
        **metrics,
    )
    if ae_run is not None:
        gen = load_generator(cfg, ae_run, ctx.run_dir, None, dev, train.num_classes)
        imgs = gen.generate(
            None,
            cfg.sampling.model_copy(update={"guidance_scale": 1.0}),
            seed=0,
            n=8,
            image_shape=list(train.images.shape[2:]),
        )
        rows = [
            [to_2d(train.images[i, 0].numpy()) for i in range(min(4, len(train)))],
            [to_2d(imgs[i, 0].numpy()) for i in range(4)],
            [to_2d(imgs[i, 0].numpy()) for i in range(4, 8)],
        ]
        grid = save_grid(ctx.run_dir / "samples" / "unconditional.png", rows, titles=["real", "sampled", "sampled"])
        ctx.tracker.log_artifact(grid, "samples/unet")
    return StageResult(ctx.run_dir, ckpt.path, metrics, drawn=tuple(drawn))
