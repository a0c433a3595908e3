"""Autoencoder training: L1 + KL (+ patch-adversarial after a warm-up), EMA, latent scale factor."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medsynth.checkpoint import (
    Checkpoint,
    completed_checkpoint,
    restore_training_state,
    resumable_checkpoint,
)
from medsynth.config.loader import save_resolved
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet, load_split
from medsynth.errors import DataError
from medsynth.generator import AE, AE_EMA
from medsynth.models.autoencoder import build_autoencoder, build_discriminator, encode_mean
from medsynth.training.common import (
    batch_indices,
    batch_layout,
    channels_last,
    make_ema,
    make_optimizer,
    maybe_compile,
    optimizer_step,
    seeded_global_rng,
    set_threads,
    stage_split,
    wrap_ddp,
)
from medsynth.training.context import StageContext, StepMeans, StepTimer, log_due
from medsynth.training.precision import policy_for
from medsynth.viz import save_grid, to_2d

DISC = "discriminator"


@dataclass(frozen=True)
class StageResult:
    """Outcome of a training stage: its final checkpoint and summary metrics.

    ``drawn`` holds, for each optimiser step this process ran (in order), the dataset indices of the
    batch it drew (recorded by the diffusion loop; empty where a loop does not record it or nothing ran).
    """

    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float]
    drawn: tuple[tuple[int, ...], ...] = field(default=(), kw_only=True)


def _one_channel(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S)`` as ``(B * C, 1, *S)``: the pretrained perceptual networks take one contrast at a time."""
    return x.reshape(-1, 1, *x.shape[2:])


def metrics_of(ckpt: Checkpoint) -> dict[str, float]:
    """The numeric extras of a checkpoint (its recorded metrics)."""
    return {k: float(v) for k, v in ckpt.extras.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of N(mu, sigma²) from N(0, 1), summed over latent dims, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between images in ``[0, data_range]``."""
    mse = float(F.mse_loss(x.float(), y.float()))
    return 10.0 * math.log10(data_range**2 / max(mse, 1e-12))


@torch.no_grad()
def latent_scale_factor(ae: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 32) -> float:
    """1 / std of the latent means of ``images`` ``(N, 1, *S)`` (stored with the checkpoint)."""
    zs = [encode_mean(ae, images[i : i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)]
    return float(1.0 / torch.cat(zs).std().clamp_min(1e-8))


@torch.no_grad()
def reconstruct(ae: Any, images: torch.Tensor, device: torch.device, batch: int = 32) -> torch.Tensor:
    """Deterministic reconstructions (decode of the latent mean) of ``images`` ``(N, 1, *S)``."""
    out = []
    for i in range(0, len(images), batch):
        z = encode_mean(ae, images[i : i + batch].to(device))
        out.append(ae.decode(z).float().clamp(0, 1).cpu())
    return torch.cat(out)


def _sample_grid(path: Path, images: torch.Tensor, recon: torch.Tensor, n: int = 6) -> Path:
    rows = [[to_2d(images[i, 0].numpy()), to_2d(recon[i, 0].numpy())] for i in range(min(n, len(images)))]
    return save_grid(path, rows, col_titles=["image", "reconstruction"])


def train_autoencoder(cfg: MedsynthConfig, cache_dir: str | Path, ctx: StageContext) -> StageResult:
    """Train the KL autoencoder on the training split of a preprocessing cache.

    Args:
        cfg: Resolved config (``autoencoder`` section, ``preprocess.spatial_dims``).
        cache_dir: Preprocessing cache folder.
        ctx: Run folder, resume flag, device, tracker and progress.

    Returns:
        The final checkpoint (EMA weights under ``autoencoder_ema``; ``scale_factor`` in its extras)
        and validation metrics (L1, PSNR).
    """
    sc = cfg.autoencoder
    oc = sc.train
    done_ckpt = completed_checkpoint(ctx.run_dir, ctx.input_key)
    if done_ckpt is not None:  # same inputs already trained: nothing to do
        return StageResult(ctx.run_dir, done_ckpt.path, metrics_of(done_ckpt))
    set_threads(oc.num_threads)
    dev = ctx.device
    train = load_split(cache_dir, "train")
    try:
        val: ArraySet = load_split(cache_dir, "val")
    except DataError:
        val = train
    dims = cfg.preprocess.spatial_dims
    if ctx.dist.is_main:
        save_resolved(cfg, ctx.run_dir)

    # --- networks, optimisers, EMA ---
    torch.manual_seed(oc.seed)
    ae = channels_last(build_autoencoder(sc, dims, cfg.data.n_channels).to(dev), oc.channels_last, dims)
    opt, sched = make_optimizer(ae.parameters(), oc, dev)
    ema = make_ema(ae, oc.ema_decay)
    disc = build_discriminator(sc, dims, cfg.data.n_channels).to(dev) if sc.adv_weight > 0 else None
    if disc is not None:
        channels_last(disc, oc.channels_last, dims)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=sc.disc_lr) if disc is not None else None
    precision = policy_for(dev, oc.amp)  # bf16 / fp16 + loss scaling / fp32 by device capability
    scaler, scaler_d = precision.make_scaler(), (precision.make_scaler() if disc is not None else None)
    perceptual = None
    if sc.perceptual_weights and sc.perceptual_weight > 0:
        from monai.losses import PerceptualLoss

        if not Path(sc.perceptual_weights).is_file():
            raise DataError(sc.perceptual_weights, "perceptual-loss weights file does not exist")
        perceptual = PerceptualLoss(
            dims, network_type="resnet50", pretrained=True, pretrained_path=sc.perceptual_weights
        ).to(dev)
    networks: dict[str, torch.nn.Module] = {AE: ae, **({AE_EMA: ema} if ema else {})}
    if disc is not None:
        networks[DISC] = disc
    optimizers: dict[str, torch.optim.Optimizer] = {"ae": opt, **({"disc": opt_d} if opt_d else {})}
    schedulers: dict[str, Any] = {"ae": sched}  # plus the loss scalers of fp16 training (their state resumes)
    schedulers.update({k: v for k, v in (("ae_scaler", scaler), ("disc_scaler", scaler_d)) if v is not None})
    start = 0
    latest = resumable_checkpoint(ctx.run_dir, ctx.input_key, ctx.resume)
    if latest is not None:
        start = restore_training_state(latest, networks, optimizers, schedulers)
    model = maybe_compile(wrap_ddp(ae, ctx.dist, dev), oc.compile)
    d_model = wrap_ddp(disc, ctx.dist, dev) if disc is not None else None
    from monai.losses import PatchAdversarialLoss

    adv = PatchAdversarialLoss(criterion="least_squares")
    timer = StepTimer("autoencoder", start, oc.steps, ctx.dist.is_main)
    val_x = val.images[: max(oc.batch_size * oc.val_batches, 1)]
    metrics: dict[str, float] = {}
    means, info = StepMeans(), ""
    train_images = stage_split(train.images, dev, oc.device_data_mb)  # on the GPU once when it fits

    for step in range(start, oc.steps):
        # --- batch ---
        idx = batch_indices(len(train), step, oc.batch_size, oc.seed, ctx.dist.rank, ctx.dist.world_size)
        x = batch_layout(train_images[idx].to(dev, non_blocking=True), oc.channels_last)
        # --- generator step: reconstruction + KL (+ adversarial, + perceptual) ---
        model.train()
        with precision.autocast():
            # the posterior sample is drawn from the global RNG: seed it per step so resuming is exact
            with seeded_global_rng(oc.seed, step, ctx.dist.rank, dev):
                recon, mu, sigma = model(x)
            l1 = F.l1_loss(recon.float(), x)
            kl = kl_loss(mu.float(), sigma.float())
            loss = l1 + sc.kl_weight * kl
            if perceptual is not None:
                loss = loss + sc.perceptual_weight * perceptual(_one_channel(recon.float()), _one_channel(x))
            use_adv = d_model is not None and step >= sc.adv_start
            if use_adv and d_model is not None:
                g_adv = adv(d_model(recon.float())[-1], target_is_real=True, for_discriminator=False)
                loss = loss + sc.adv_weight * g_adv
        optimizer_step(loss, ae, opt, sched, oc.grad_clip, ema, scaler, step=step, where=ctx.run_dir)
        # --- discriminator step ---
        if use_adv and d_model is not None and disc is not None and opt_d is not None:
            with precision.autocast():
                d_fake = adv(d_model(recon.detach().float())[-1], target_is_real=False, for_discriminator=True)
                d_real = adv(d_model(x)[-1], target_is_real=True, for_discriminator=True)
                d_loss = 0.5 * (d_fake + d_real)
            optimizer_step(d_loss, disc, opt_d, scaler=scaler_d)
        # --- logging (the only host sync: means since the last log), validation, checkpoints ---
        done = step + 1
        means.add(loss=loss, l1=l1, kl=kl)
        if log_due(done, oc.steps):
            m = means.means()
            info = f"l1={m['l1']:.4f}"
            timer.tick(done, m)
            if ctx.dist.is_main:
                ctx.tracker.log_metrics({f"ae/train_{k}": v for k, v in m.items()}, step=done)
        ctx.progress.advance(1, info)
        if ctx.dist.is_main and (done % oc.val_every == 0 or done == oc.steps):
            eval_net = ema.module if ema is not None else ae
            eval_net.eval()
            rec = reconstruct(eval_net, val_x, dev)
            metrics = {"val_l1": float(F.l1_loss(rec, val_x)), "val_psnr": psnr(rec, val_x)}
            ctx.tracker.log_metrics({f"ae/{k}": v for k, v in metrics.items()}, step=done)
            grid = _sample_grid(ctx.run_dir / "samples" / f"recon_step{done:07d}.png", val_x, rec)
            ctx.tracker.log_artifact(grid, "samples/autoencoder")
        if ctx.dist.is_main and done % oc.ckpt_every == 0 and done < oc.steps:
            ctx.save(done, networks, optimizers, schedulers, cfg, oc.keep_checkpoints)

    # --- latent scale factor from the training data, final checkpoint ---
    final_net = ema.module if ema is not None else ae
    final_net.eval()
    scale = latent_scale_factor(final_net, train.images[: min(len(train), 512)], dev)
    ckpt: Checkpoint | None = None
    if ctx.dist.is_main:
        ckpt = ctx.save(
            oc.steps,
            networks,
            optimizers,
            schedulers,
            cfg,
            oc.keep_checkpoints,
            final=True,
            scale_factor=scale,
            **metrics,
        )
        ctx.tracker.log_metrics({"ae/scale_factor": scale}, step=oc.steps)
    path = ckpt.path if ckpt else ctx.run_dir
    return StageResult(ctx.run_dir, path, {**metrics, "scale_factor": scale})


def summarize(result: StageResult) -> dict[str, Any]:
    """JSON summary of a stage result."""
    return {"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint), **result.metrics}
