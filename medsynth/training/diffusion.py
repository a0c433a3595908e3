"""Diffusion UNet training on cached latents (epsilon, v-prediction or rectified flow)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from medsynth.checkpoint import (
    completed_checkpoint,
    restore_training_state,
    resumable_checkpoint,
)
from medsynth.config.loader import save_resolved
from medsynth.config.schema import MedsynthConfig
from medsynth.generator import UNET, UNET_EMA, load_generator, make_objective, unconditional
from medsynth.models.unet import build_diffusion_unet
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
from medsynth.training.denoising import bind_cond, denoising_loss, validation_loss
from medsynth.training.latents import LatentSet, load_latents
from medsynth.training.precision import policy_for
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
    dims = cfg.preprocess.spatial_dims
    unet = channels_last(build_diffusion_unet(sc, dims, int(train.latents.shape[1])).to(dev), oc.channels_last, dims)
    opt, sched = make_optimizer(unet.parameters(), oc, dev)
    ema = make_ema(unet, oc.ema_decay)
    precision = policy_for(dev, oc.amp)  # bf16 / fp16 + loss scaling / fp32 by device capability
    scaler = precision.make_scaler()
    networks: dict[str, torch.nn.Module] = {UNET: unet, **({UNET_EMA: ema} if ema else {})}
    schedulers: dict[str, Any] = {"unet": sched, **({"unet_scaler": scaler} if scaler is not None else {})}
    start = 0
    latest = resumable_checkpoint(ctx.run_dir, ctx.input_key, ctx.resume)
    if latest is not None:
        start = restore_training_state(latest, networks, {"unet": opt}, schedulers)
    model = maybe_compile(wrap_ddp(unet, ctx.dist, dev), oc.compile)
    timer = StepTimer("diffusion", start, oc.steps, ctx.dist.is_main)
    metrics: dict[str, float] = {}
    means, info = StepMeans(), ""
    # the split on the GPU once when it fits (pinned host memory otherwise); unchanged on CPU
    staged = replace(train, latents=stage_split(train.latents, dev, oc.device_data_mb))
    drawn: list[tuple[int, ...]] = []  # this process's batch indices per step (a record for checks)

    for step in range(start, oc.steps):
        # --- batch and loss ---
        idx = batch_indices(len(train), step, oc.batch_size, oc.seed, ctx.dist.rank, ctx.dist.world_size)
        drawn.append(tuple(int(i) for i in idx))
        x0 = batch_layout(staged.latents[idx].to(dev, non_blocking=True) * train.scale_factor, oc.channels_last)
        g = step_generator(oc.seed, step, ctx.dist.rank, dev)
        model.train()
        with precision.autocast():
            loss = denoising_loss(bind_cond(unconditional(model), None), objective, x0, g)
        # --- update ---
        optimizer_step(loss, unet, opt, sched, oc.grad_clip, ema, scaler, step=step, where=ctx.run_dir)
        # --- logging (the only host sync: means since the last log), validation, checkpoints ---
        done = step + 1
        means.add(loss=loss)
        if log_due(done, oc.steps):
            m = means.means()
            info = f"loss={m['loss']:.4f}"
            timer.tick(done, m)
            if ctx.dist.is_main:
                ctx.tracker.log_metrics({"unet/train_loss": m["loss"]}, step=done)
        ctx.progress.advance(1, info)
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
            ctx.save(done, networks, {"unet": opt}, schedulers, cfg, oc.keep_checkpoints)

    # --- final checkpoint and an unconditional sample grid ---
    if not ctx.dist.is_main:
        return StageResult(ctx.run_dir, ctx.run_dir, metrics, drawn=tuple(drawn))
    ckpt = ctx.save(
        oc.steps,
        networks,
        {"unet": opt},
        schedulers,
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
