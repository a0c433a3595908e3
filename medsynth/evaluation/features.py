"""An in-domain feature encoder for FID/KID, trained by medsynth itself (no weights are downloaded).

Inception, RadImageNet and MedicalNet weights cannot be fetched here, and ImageNet features say
little about MRI anyway. This module trains a small CNN on the REAL training images for a few
hundred steps to regress, from the image alone, targets derived from the data itself:

* the square-root voxel fraction of every foreground label of the image's mask (how much tumour,
  brain, CSF... the image shows), and, with ``label_fractions_intensity`` (the default),
* the image's intensity deciles (its contrast and brightness distribution).

The globally average-pooled output of its last conv block (``channels[-1]`` numbers) is the feature
vector. A user may instead give ``validation.feature_weights``: a ``.safetensors`` state dict of this
architecture, or a TorchScript file whose module maps ``(N, 1, *S)`` images in ``[0, 1]`` to
``(N, F)`` features (or to feature maps, which are average-pooled) — e.g. an exported RadImageNet or
MedicalNet network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medsynth.checkpoint import (
    completed_checkpoint,
    find_checkpoint,
    restore_training_state,
    resumable_checkpoint,
)
from medsynth.config.evaluation import FeatureEncoderConfig
from medsynth.config.loader import save_resolved
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet, load_split
from medsynth.errors import DataError
from medsynth.training.autoencoder import StageResult, metrics_of
from medsynth.training.common import (
    autocast,
    batch_indices,
    make_optimizer,
    make_scaler,
    optimizer_step,
    set_threads,
)
from medsynth.training.context import StageContext, StepTimer

ENCODER = "feature_encoder"
DECILES = torch.linspace(0.1, 0.9, 9)


class FeatureEncoder(torch.nn.Module):
    """Stride-2 conv blocks (MONAI ``Convolution``, GroupNorm, PReLU), global average pooling, linear head.

    Args:
        spatial_dims: 2 or 3.
        channels: Output channels of each block (each block halves the size); the last is the feature size.
        num_outputs: Regression targets of the head (training only).
    """

    def __init__(self, spatial_dims: int, channels: Sequence[int], num_outputs: int) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        layers: list[torch.nn.Module] = []
        c_in = 1
        for c in channels:
            norm = ("group", {"num_groups": math.gcd(8, int(c))})
            layers.append(Convolution(spatial_dims, c_in, int(c), strides=2, kernel_size=3, norm=norm, act="PRELU"))
            layers.append(Convolution(spatial_dims, int(c), int(c), strides=1, kernel_size=3, norm=norm, act="PRELU"))
            c_in = int(c)
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c_in, num_outputs)
        self.spatial_dims = spatial_dims
        self.feature_dim = c_in

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, channels[-1])`` globally average-pooled features of ``x`` ``(N, 1, *S)``."""
        h: torch.Tensor = self.body(x)
        return h.flatten(2).mean(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Regression outputs (the training targets)."""
        out: torch.Tensor = self.head(self.features(x))
        return out


class ScriptedFeatures(torch.nn.Module):
    """A user's TorchScript feature network; feature maps ``(N, C, *s)`` are average-pooled to ``(N, C)``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, F)`` features."""
        out = self.module(x)
        if isinstance(out, list | tuple):
            out = out[-1]
        f = torch.as_tensor(out)
        return f.flatten(2).mean(2) if f.ndim > 2 else f.reshape(f.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`features`."""
        return self.features(x)


def feature_targets(images: torch.Tensor, masks: torch.Tensor, num_classes: int, objective: str) -> torch.Tensor:
    """Training targets of ``images``/``masks`` ``(N, 1, *S)``: sqrt label fractions (labels 1..C-1) [+ deciles]."""
    m = masks.long().flatten(1)
    frac = torch.stack([(m == lab).float().mean(1) for lab in range(1, num_classes)], 1) if num_classes > 1 else None
    parts = [frac.sqrt()] if frac is not None else []
    if objective == "label_fractions_intensity" or not parts:
        parts.append(torch.quantile(images.float().flatten(1), DECILES.to(images.device), dim=1).T)
    return torch.cat(parts, 1)


def _num_outputs(num_classes: int, objective: str) -> int:
    n = num_classes - 1
    return n + (len(DECILES) if objective == "label_fractions_intensity" or n == 0 else 0)


def build_feature_encoder(fc: FeatureEncoderConfig, spatial_dims: int, num_classes: int) -> FeatureEncoder:
    """A fresh :class:`FeatureEncoder` for ``fc`` and the label count of the data."""
    return FeatureEncoder(spatial_dims, fc.channels, _num_outputs(num_classes, fc.objective))


@torch.no_grad()
def _val_loss(enc: FeatureEncoder, data: ArraySet, objective: str, batch: int, dev: torch.device) -> float:
    enc.eval()
    tot, n = 0.0, 0
    for i in range(0, len(data), batch):
        x = data.images[i : i + batch].to(dev)
        t = feature_targets(x, data.masks[i : i + batch].to(dev), data.num_classes, objective)
        tot += float(F.mse_loss(enc(x), t, reduction="sum")) / t.shape[1]
        n += x.shape[0]
    enc.train()
    return tot / max(n, 1)


def train_feature_encoder(cfg: MedsynthConfig, cache_dir: str | Path, ctx: StageContext) -> StageResult:
    """Train the in-domain feature encoder on the REAL training split (regression of mask/intensity targets).

    Args:
        cfg: Resolved config (``validation.features``, ``preprocess.spatial_dims``).
        cache_dir: Preprocessing cache folder (``train``; ``val`` for the validation loss when present).
        ctx: Run folder, resume flag, device, tracker and progress (``input_key`` as in the other stages).

    Returns:
        Final checkpoint (``feature_encoder`` weights; ``num_classes``/``num_outputs`` in extras) and
        the validation MSE.
    """
    fc = cfg.validation.features
    oc = fc.train
    done_ckpt = completed_checkpoint(ctx.run_dir, ctx.input_key)
    if done_ckpt is not None:
        return StageResult(ctx.run_dir, done_ckpt.path, metrics_of(done_ckpt))
    set_threads(oc.num_threads)
    dev = ctx.device
    train = load_split(cache_dir, "train").one_channel()  # one contrast at a time (per-channel realism)
    try:
        val: ArraySet = load_split(cache_dir, "val").one_channel()
    except DataError:
        val = train
    save_resolved(cfg, ctx.run_dir)

    # --- network and optimiser ---
    torch.manual_seed(oc.seed)
    enc = build_feature_encoder(fc, cfg.preprocess.spatial_dims, train.num_classes).to(dev)
    opt, sched = make_optimizer(enc.parameters(), oc)
    scaler = make_scaler(dev, oc.amp)  # fp16 (pre-Ampere GPU) needs loss scaling
    start = 0
    latest = resumable_checkpoint(ctx.run_dir, ctx.input_key, ctx.resume)
    if latest is not None:
        start = restore_training_state(latest, {ENCODER: enc}, {"encoder": opt}, {"encoder": sched})
    timer = StepTimer("feature-encoder", start, oc.steps, True)
    val_sub = val.subset(list(range(min(len(val), oc.batch_size * oc.val_batches))))
    metrics: dict[str, float] = {}

    for step in range(start, oc.steps):
        # --- batch and targets ---
        idx = batch_indices(len(train), step, oc.batch_size, oc.seed)
        x = train.images[idx].to(dev)
        target = feature_targets(x, train.masks[idx].to(dev), train.num_classes, fc.objective)
        # --- regression step ---
        enc.train()
        with autocast(dev, oc.amp):
            loss = F.mse_loss(enc(x).float(), target)
        optimizer_step(loss, enc, opt, sched, oc.grad_clip, scaler=scaler, step=step, where=ctx.run_dir)
        # --- logging, validation, checkpoints ---
        done, loss_v = step + 1, float(loss.detach())
        ctx.progress.advance(1, f"loss={loss_v:.4f}")
        timer.tick(done, {"loss": loss_v})
        if done % 10 == 0 or done == oc.steps:
            ctx.tracker.log_metrics({"features/train_loss": loss_v}, step=done)
        if done % oc.val_every == 0 or done == oc.steps:
            metrics = {"val_mse": _val_loss(enc, val_sub, fc.objective, oc.batch_size, dev)}
            ctx.tracker.log_metrics({"features/val_mse": metrics["val_mse"]}, step=done)
        if done % oc.ckpt_every == 0 and done < oc.steps:
            ctx.save(done, {ENCODER: enc}, {"encoder": opt}, {"encoder": sched}, cfg, oc.keep_checkpoints)

    ckpt = ctx.save(
        oc.steps,
        {ENCODER: enc},
        {"encoder": opt},
        {"encoder": sched},
        cfg,
        oc.keep_checkpoints,
        final=True,
        num_classes=train.num_classes,
        num_outputs=enc.head.out_features,
        **metrics,
    )
    return StageResult(ctx.run_dir, ckpt.path, metrics)


def load_feature_encoder(
    cfg: MedsynthConfig, run_dir: str | Path | None = None, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """The feature encoder: ``validation.feature_weights`` when set, else the final checkpoint of ``run_dir``.

    Returns:
        A module in eval mode with a ``features(x) -> (N, F)`` method.

    Raises:
        DataError: If the weights file or the checkpoint is missing or does not fit.
    """
    dev = torch.device(device)
    fc = cfg.validation.features
    dims = cfg.preprocess.spatial_dims
    user = cfg.validation.feature_weights
    if user:
        path = Path(user)
        if not path.is_file():
            raise DataError(path, "feature-encoder weights file does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
            if "head.weight" not in sd:
                raise DataError(path, "not a medsynth feature-encoder state dict (no head.weight)")
            enc = FeatureEncoder(dims, fc.channels, int(sd["head.weight"].shape[0]))
            try:
                enc.load_state_dict(sd)
            except RuntimeError as exc:
                raise DataError(path, f"weights do not fit validation.features.channels: {exc}") from None
            return enc.to(dev).eval()
        scripted = torch.jit.load(str(path), map_location=dev)
        return ScriptedFeatures(scripted).to(dev).eval()
    if run_dir is None:
        raise DataError("validation.feature_weights", "no feature encoder: give weights or a trained run folder")
    ckpt = find_checkpoint(run_dir, "final")
    if ckpt is None:
        raise DataError(run_dir, "no final feature-encoder checkpoint", hint="train the feature encoder first")
    ex: dict[str, Any] = ckpt.extras
    enc = FeatureEncoder(dims, fc.channels, int(ex["num_outputs"]))
    ckpt.load_into(ENCODER, enc)
    return enc.to(dev).eval()


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``(N, F)`` float64 CPU features of ``images`` ``(N, 1, *S)`` (``encoder.features`` when it has one).

    Multi-contrast images ``(N, C, *S)`` give the features of each channel side by side, ``(N, C * F)``
    (the encoder sees one contrast at a time).
    """
    if images.ndim > 2 and images.shape[1] > 1:
        return torch.cat(
            [extract_features(encoder, images[:, k : k + 1], batch_size) for k in range(images.shape[1])], 1
        )
    fn = getattr(encoder, "features", encoder)
    dev = next(encoder.parameters()).device if any(True for _ in encoder.parameters()) else torch.device("cpu")
    encoder.eval()
    out = [
        torch.as_tensor(fn(images[i : i + batch_size].to(dev).float())).double().cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.zeros((0, 0), dtype=torch.float64)
