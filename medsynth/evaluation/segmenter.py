"""The reference segmenter: a MONAI ``UNet`` trained on REAL images only, used to segment synthetic ones.

Anatomical plausibility as the field measures it: segment each synthetic image with a network that
never saw synthetic data and compare with the mask it was generated from, next to the same network's
Dice on the real image of that mask (:mod:`medsynth.evaluation.plausibility`).

Training reads the ``train`` split of a preprocessing cache (the ``val`` split, when present, gives
the validation Dice); it never reads synthetic data. Spatial sizes that are not a multiple of the
UNet's total stride are zero-padded (image 0, mask background) for training; :func:`predict` runs a
plain batched forward pass when the input has the training size, and MONAI
``sliding_window_inference`` (which pads and crops back) only when it does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsynth.checkpoint import (
    Checkpoint,
    completed_checkpoint,
    find_checkpoint,
    restore_training_state,
    resumable_checkpoint,
)
from medsynth.config.loader import save_resolved
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet, load_split
from medsynth.errors import DataError
from medsynth.evaluation.metrics import dice_per_label
from medsynth.training.autoencoder import StageResult, metrics_of
from medsynth.training.common import (
    autocast,
    batch_indices,
    make_ema,
    make_optimizer,
    make_scaler,
    optimizer_step,
    seeded_global_rng,
    set_threads,
    step_generator,
    unwrap,
    wrap_ddp,
)
from medsynth.training.context import StageContext, StepTimer
from medsynth.viz import overlay_rgb, representative_slice, save_grid, to_2d

SEG, SEG_EMA = "segmenter", "segmenter_ema"


class Segmenter(torch.nn.Module):
    """A trained segmentation network with what inference needs to know about it.

    Attributes:
        net: The MONAI ``UNet`` (logits ``(N, C, *S)``).
        num_classes: Output channels (max label + 1).
        roi_size: Spatial size the network was trained at (after padding).
        labels: Label vocabulary ``{index: name}``.
    """

    def __init__(self, net: torch.nn.Module, num_classes: int, roi_size: Sequence[int], labels: dict[int, str]) -> None:
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.roi_size = tuple(int(s) for s in roi_size)
        self.labels = dict(labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` ``(N, 1, *S)``."""
        out: torch.Tensor = self.net(x)
        return out


@dataclass(frozen=True)
class SegmenterResult(StageResult):
    """The stage result plus the trained segmenter (final weights, eval mode, on the stage's device)."""

    model: Segmenter | None = None


def total_stride(strides: Sequence[int]) -> int:
    """Product of the UNet strides: spatial sizes must be multiples of it."""
    return int(math.prod(int(s) for s in strides))


def build_segmenter(cfg: MedsynthConfig, num_classes: int) -> torch.nn.Module:
    """A fresh MONAI ``UNet`` for ``cfg.segmenter`` (2D/3D from ``preprocess.spatial_dims``)."""
    from monai.networks.nets import UNet

    sc = cfg.segmenter
    net: torch.nn.Module = UNet(
        spatial_dims=cfg.preprocess.spatial_dims,
        in_channels=cfg.data.n_channels,  # every contrast of a multi-contrast case is an input
        out_channels=num_classes,
        channels=tuple(sc.channels),
        strides=tuple(sc.strides),
        num_res_units=sc.num_res_units,
        norm=sc.norm,
        dropout=sc.dropout,
    )
    return net


def _padded_size(size: Sequence[int], multiple: int) -> tuple[int, ...]:
    return tuple(int(math.ceil(s / multiple) * multiple) for s in size)


def pad_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial dims of ``x`` ``(N, C, *S)`` at their ends up to ``size``."""
    pad: list[int] = []
    for s, t in zip(reversed(x.shape[2:]), reversed(tuple(size)), strict=True):
        pad += [0, int(t) - int(s)]
    return F.pad(x, pad) if any(pad) else x


def flip_batch(
    x: torch.Tensor, y: torch.Tensor, axes: Sequence[int], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each item of image ``x`` and mask ``y`` along each spatial axis in ``axes`` with probability 1/2."""
    axes = [a for a in axes if a < x.ndim - 2]
    if not axes:
        return x, y
    draw = torch.rand((x.shape[0], len(axes)), generator=g, device=g.device).cpu() < 0.5
    xs, ys = list(x.unbind(0)), list(y.unbind(0))
    for i in range(x.shape[0]):
        dims = [a + 1 for a, f in zip(axes, draw[i].tolist(), strict=True) if f]  # +1: channel dim of an item
        if dims:
            xs[i], ys[i] = xs[i].flip(dims), ys[i].flip(dims)
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 32,
    roi_size: Sequence[int] | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """Label maps of ``images`` ``(N, 1, *S)``: argmax of the logits, ``(N, 1, *S)`` uint8 on the CPU.

    A batched forward pass when ``S`` equals the training size (``roi_size``, read from a
    :class:`Segmenter` when not given) and is a multiple of the network's total stride; otherwise
    MONAI ``sliding_window_inference`` with windows of the training size (it pads smaller inputs
    and crops the output back).

    Args:
        model: A :class:`Segmenter` or any module mapping ``(B, 1, *S)`` to logits ``(B, C, *S)``.
        images: ``(N, 1, *S)`` intensities.
        batch_size: Images per forward pass (windows per pass for the sliding window).
        roi_size: Training spatial size (default: ``model.roi_size`` when present).
        stride: Total stride of a plain module without ``roi_size``: sizes that are not a multiple of it
            go through the sliding window (padded to the next multiple).
    """
    roi = tuple(roi_size) if roi_size is not None else getattr(model, "roi_size", None)
    spatial = tuple(int(s) for s in images.shape[2:])
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mult = stride or 1
    direct = (roi is None or tuple(roi) == spatial) and all(s % mult == 0 for s in spatial)
    outs = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(dev).float()
            if direct:
                logits = model(x)
            else:
                from monai.inferers import sliding_window_inference

                window = roi if roi is not None else _padded_size(spatial, mult)
                logits = sliding_window_inference(x, window, batch_size, model, overlap=0.25, mode="gaussian")
            outs.append(torch.as_tensor(logits).argmax(1, keepdim=True).to(torch.uint8).cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros((0, 1, *spatial), dtype=torch.uint8)


def validation_dice(
    model: torch.nn.Module, data: ArraySet, batch_size: int, labels: dict[int, str] | None = None
) -> dict[str, float]:
    """Mean foreground Dice of ``model`` on ``data``: per label over cases holding it, then averaged over labels."""
    labs = labels if labels is not None else data.labels
    pred = predict(model, data.images, batch_size)
    res = dice_per_label(pred, data.masks, labs)
    out: dict[str, float] = {}
    per = []
    for lab, s in res.summary().items():
        v = float(s["mean_dice"])
        out[f"val_dice_{labs.get(lab, str(lab))}"] = v
        if math.isfinite(v):
            per.append(v)
    out["val_dice"] = float(np.mean(per)) if per else float("nan")
    return out


def _grid(path: Path, model: torch.nn.Module, data: ArraySet, n: int = 6) -> Path:
    k = min(n, len(data))
    pred = predict(model, data.images[:k])
    rows = []
    for i in range(k):
        img, msk, prd = data.images[i, 0].numpy(), data.masks[i, 0].numpy(), pred[i, 0].numpy()
        idx = representative_slice(img, msk) if img.ndim == 3 else None
        rows.append(
            [
                to_2d(img, idx),
                overlay_rgb(to_2d(img, idx), to_2d(msk, idx)),
                overlay_rgb(to_2d(img, idx), to_2d(prd, idx)),
            ]
        )
    return save_grid(path, rows, col_titles=["image", "mask", "prediction"])


def train_segmenter(cfg: MedsynthConfig, cache_dir: str | Path, ctx: StageContext) -> SegmenterResult:
    """Train the reference segmenter on the REAL training split of a preprocessing cache.

    Args:
        cfg: Resolved config (``segmenter`` section, ``preprocess.spatial_dims``).
        cache_dir: Preprocessing cache folder (``train`` split; ``val`` for the validation Dice).
        ctx: Run folder, resume flag, device, tracker and progress; ``ctx.input_key`` makes a
            finished run with the same inputs a no-op and guards resuming.

    Returns:
        The final checkpoint (``segmenter`` weights, plus ``segmenter_ema`` with EMA; ``num_classes``,
        ``labels`` and ``roi_size`` in its extras), the validation Dice (mean over foreground labels
        and per label), and the loaded model.
    """
    sc, oc = cfg.segmenter, cfg.segmenter.train
    done_ckpt = completed_checkpoint(ctx.run_dir, ctx.input_key)
    if done_ckpt is not None:  # same inputs already trained: nothing to do
        loaded = load_segmenter(cfg, ctx.run_dir, ctx.device)
        return SegmenterResult(ctx.run_dir, done_ckpt.path, metrics_of(done_ckpt), loaded)
    set_threads(oc.num_threads)
    dev = ctx.device
    train = load_split(cache_dir, "train")
    try:
        val: ArraySet = load_split(cache_dir, "val")
    except DataError:
        val = train
    num_classes = train.num_classes
    labels = dict(train.labels)
    mult = total_stride(sc.strides)
    roi = _padded_size(train.images.shape[2:], mult)
    train_x, train_y = pad_to(train.images.float(), roi), pad_to(train.masks.long(), roi)
    if ctx.dist.is_main:
        save_resolved(cfg, ctx.run_dir)

    # --- network, optimiser (AdamW + warm-up), optional EMA, loss ---
    torch.manual_seed(oc.seed)
    net = build_segmenter(cfg, num_classes).to(dev)
    opt, sched = make_optimizer(net.parameters(), oc)
    scaler = make_scaler(dev, oc.amp)  # fp16 (pre-Ampere GPU) needs loss scaling
    ema = make_ema(net, oc.ema_decay)
    networks: dict[str, torch.nn.Module] = {SEG: net, **({SEG_EMA: ema} if ema else {})}
    start = 0
    latest = resumable_checkpoint(ctx.run_dir, ctx.input_key, ctx.resume)
    if latest is not None:
        start = restore_training_state(latest, networks, {"segmenter": opt}, {"segmenter": sched})
    model = wrap_ddp(net, ctx.dist, dev)
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(
        include_background=sc.include_background,
        to_onehot_y=True,
        softmax=True,
        lambda_dice=sc.dice_weight,
        lambda_ce=sc.ce_weight,
    )
    timer = StepTimer("segmenter", start, oc.steps, ctx.dist.is_main)
    n_quick = max(oc.batch_size * oc.val_batches, 1)
    val_quick = val.subset(list(range(min(n_quick, len(val)))))
    metrics: dict[str, float] = {}

    def eval_net() -> Segmenter:
        inner = ema.module if ema is not None else net
        return Segmenter(unwrap(inner), num_classes, roi, labels)

    for step in range(start, oc.steps):
        # --- batch (+ random flips drawn from a per-step generator, so a resume repeats them) ---
        idx = batch_indices(len(train), step, oc.batch_size, oc.seed, ctx.dist.rank, ctx.dist.world_size)
        x, y = train_x[idx].to(dev), train_y[idx].to(dev)
        if sc.augment_flips:
            x, y = flip_batch(x, y, sc.flip_axes, step_generator(oc.seed, step, ctx.dist.rank, dev))
        # --- forward (dropout draws seeded per step) and DiceCE loss ---
        model.train()
        with autocast(dev, oc.amp), seeded_global_rng(oc.seed, step, ctx.dist.rank, dev):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        # --- update: clip, step, warm-up schedule, EMA ---
        optimizer_step(loss, net, opt, sched, oc.grad_clip, ema, scaler=scaler, step=step, where=ctx.run_dir)
        # --- logging, validation Dice, checkpoints ---
        done, loss_v = step + 1, float(loss.detach())
        ctx.progress.advance(1, f"loss={loss_v:.4f}")
        timer.tick(done, {"loss": loss_v})
        if ctx.dist.is_main and (done % 10 == 0 or done == oc.steps):
            ctx.tracker.log_metrics({"segmenter/train_loss": loss_v}, step=done)
        if ctx.dist.is_main and done % oc.val_every == 0 and done < oc.steps:
            quick = validation_dice(eval_net(), val_quick, sc.predict_batch_size, labels)
            ctx.tracker.log_metrics({"segmenter/val_dice": quick["val_dice"]}, step=done)
        if ctx.dist.is_main and done % oc.ckpt_every == 0 and done < oc.steps:
            ctx.save(done, networks, {"segmenter": opt}, {"segmenter": sched}, cfg, oc.keep_checkpoints)

    # --- final validation on the whole val split, final checkpoint, prediction grid ---
    final = eval_net().to(dev).eval()
    if not ctx.dist.is_main:
        return SegmenterResult(ctx.run_dir, ctx.run_dir, metrics, final)
    metrics = validation_dice(final, val, sc.predict_batch_size, labels)
    ctx.tracker.log_metrics({f"segmenter/{k}": v for k, v in metrics.items()}, step=oc.steps)
    ckpt = ctx.save(
        oc.steps,
        networks,
        {"segmenter": opt},
        {"segmenter": sched},
        cfg,
        oc.keep_checkpoints,
        final=True,
        num_classes=num_classes,
        labels={str(k): v for k, v in labels.items()},
        roi_size=list(roi),
        val_split="val" if val is not train else "train",
        **metrics,
    )
    grid = _grid(ctx.run_dir / "samples" / "segmenter_val.png", final, val)
    ctx.tracker.log_artifact(grid, "samples/segmenter")
    return SegmenterResult(ctx.run_dir, ckpt.path, metrics, final)


def _inference_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    if (ckpt.path / f"{SEG_EMA}.safetensors").is_file():
        w = ckpt.weights(SEG_EMA)
        return {k.removeprefix("module."): v for k, v in w.items() if k != "n_averaged"}
    return ckpt.weights(SEG)


def load_segmenter(cfg: MedsynthConfig, run_dir: str | Path, device: torch.device | str = "cpu") -> Segmenter:
    """The trained segmenter (EMA weights when saved) from a run folder's final checkpoint, in eval mode.

    Raises:
        DataError: If the run has no final checkpoint.
    """
    ckpt = find_checkpoint(run_dir, "final")
    if ckpt is None:
        raise DataError(run_dir, "no final segmenter checkpoint", hint="train the segmenter first")
    ex: dict[str, Any] = ckpt.extras
    num_classes = int(ex["num_classes"])
    net = build_segmenter(cfg, num_classes)
    net.load_state_dict(_inference_weights(ckpt))
    labels = {int(k): str(v) for k, v in ex.get("labels", {}).items()}
    roi = [int(s) for s in ex["roi_size"]]
    return Segmenter(net, num_classes, roi, labels).to(torch.device(device)).eval()
