"""The training stages: one adapter for every training loop, the latent cache and the generator bundle."""

from __future__ import annotations

import json
import logging
from typing import Any

from medsynth.fileio import sha256_file, sha256_json
from medsynth.pipeline.declare import StageResult, StageRun

log = logging.getLogger(__name__)


class TrainResult(StageResult):
    """Result of a training stage: its final checkpoint."""

    checkpoint: str = ""


def _train(run: StageRun, prefix: str, steps: int, train: Any) -> TrainResult:
    """Run a training loop in the stage folder under the stage key (resumes a checkpoint of the same key)."""
    from medsynth.training.context import StageContext

    ctx = StageContext.create(run.out, run.resume, run.tracker, run.progress, run.device, run.key)
    res = train(ctx)
    metrics = {k if "/" in k else f"{prefix}/{k}": float(v) for k, v in res.metrics.items()}
    return TrainResult(
        metrics=metrics,
        model=str(res.checkpoint),
        checkpoint=str(res.checkpoint),
        outputs={"checkpoint": str(res.checkpoint)},
        step=steps,
    )


def run_autoencoder(run: StageRun) -> StageResult:
    """Train the KL autoencoder (L1 + KL, optional patch-adversarial loss) and its latent scale factor."""
    from medsynth.training.autoencoder import train_autoencoder

    cfg = run.cfg
    return _train(
        run, "ae", cfg.autoencoder.train.steps, lambda ctx: train_autoencoder(cfg, run.path("preprocess"), ctx)
    )


def run_latents(run: StageRun) -> StageResult:
    """Encode the train and val splits once with the trained autoencoder (latent means)."""
    from medsynth.errors import DataError
    from medsynth.training.latents import encode_split

    dev = run.torch_device()
    files: dict[str, str] = {}
    for split in ("train", "val"):
        try:
            files[split] = str(
                encode_split(run.cfg, run.path("preprocess"), run.path("autoencoder"), run.out, split, dev)
            )
        except DataError:
            if split == "train":
                raise
            log.info("no validation split: the UNet/ControlNet validate on training latents")

    metrics = {}
    for split in files:
        meta = json.loads((run.out / f"{split}.json").read_text(encoding="utf-8"))
        metrics[f"latents/n_{split}"] = float(meta.get("n", 0))
    return StageResult(outputs=files, metrics=metrics)


def latents_digest(run: StageRun) -> str:

    shas = {}
    for split in ("train", "val"):
        f = run.out / f"{split}.json"
        if f.is_file():
            shas[split] = json.loads(f.read_text(encoding="utf-8")).get("file_sha256")
    if "train" not in shas:
        raise ValueError(f"{run.out}: no training latents")
    return sha256_json(shas)


def run_unet(run: StageRun) -> StageResult:
    """Train the latent diffusion UNet (epsilon, v-prediction or rectified flow)."""
    from medsynth.training.diffusion import train_diffusion

    cfg = run.cfg
    return _train(
        run,
        "unet",
        cfg.diffusion.train.steps,
        lambda ctx: train_diffusion(cfg, run.path("latents"), ctx, ae_run=run.path("autoencoder")),
    )


def run_controlnet(run: StageRun) -> StageResult:
    """Train the ControlNet on full-resolution masks, initialised from the frozen UNet."""
    from medsynth.training.controlnet import train_controlnet

    cfg = run.cfg
    return _train(
        run,
        "controlnet",
        cfg.controlnet.train.steps,
        lambda ctx: train_controlnet(cfg, run.path("latents"), run.path("unet"), ctx, ae_run=run.path("autoencoder")),
    )


def run_generator(run: StageRun) -> StageResult:
    """Bundle the three final checkpoints + config: the generator the registry stores."""
    from medsynth.pipeline.sampling_stages import resolved_sampling
    from medsynth.synthesis.bundle import export_bundle

    runs = {s: run.path(s) for s in ("autoencoder", "unet", "controlnet")}
    # the bundle's config carries the calibrated guidance scale (the registered model's default)
    bundle = export_bundle(resolved_sampling(run), runs, run.out / "bundle")
    weights = list(bundle.rglob("*.safetensors"))
    size_mb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**20
    return StageResult(
        outputs={"bundle": str(bundle)},
        model=str(bundle),
        metrics={"generator/weight_files": float(len(weights)), "generator/size_mb": size_mb},
    )


def bundle_digest(run: StageRun) -> str:
    files = sorted(p for p in (run.out / "bundle").rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{run.out}: no generator bundle")
    return sha256_json({str(p.relative_to(run.out)): sha256_file(p) for p in files})


def run_segmenter(run: StageRun) -> StageResult:
    """Train the reference segmenter on the real training split only."""
    from medsynth.evaluation.segmenter import train_segmenter

    cfg = run.cfg
    return _train(
        run, "segmenter", cfg.segmenter.train.steps, lambda ctx: train_segmenter(cfg, run.path("preprocess"), ctx)
    )


def run_features(run: StageRun) -> StageResult:
    """Train the in-domain feature encoder used for realism distances (Fréchet distance, KID)."""
    from medsynth.evaluation.features import train_feature_encoder

    cfg = run.cfg
    return _train(
        run,
        "features",
        cfg.validation.features.train.steps,
        lambda ctx: train_feature_encoder(cfg, run.path("preprocess"), ctx),
    )
