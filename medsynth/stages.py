"""One function per pipeline stage, from a config to the stage's outputs on disk.

The CLI and the Prefect flows both call these, so a stage behaves the same however it is run.
Each stage's outputs live under ``<output_dir>/<name>/<stage>/`` and each stage computes an
*input key* (its config section + hashes of what it reads): a stage whose outputs already carry the
same key does nothing, and a killed stage resumes from its last checkpoint with that key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsynth.config.schema import MedsynthConfig
from medsynth.fileio import sha256_file, sha256_json
from medsynth.progress import LogProgress, Progress
from medsynth.tracking.base import NullTracker, Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePaths:
    """Where each stage of a config writes."""

    root: Path

    @classmethod
    def of(cls, cfg: MedsynthConfig) -> StagePaths:
        """Paths of a config: ``<output_dir>/<name>``."""
        return cls(Path(cfg.output_dir) / cfg.name)

    @property
    def qc(self) -> Path:
        """QC report folder."""
        return self.root / "qc"

    @property
    def preprocess(self) -> Path:
        """Preprocessing cache."""
        return self.root / "preprocess"

    @property
    def autoencoder(self) -> Path:
        """Autoencoder run."""
        return self.root / "autoencoder"

    @property
    def latents(self) -> Path:
        """Latent cache."""
        return self.root / "latents"

    @property
    def unet(self) -> Path:
        """Diffusion UNet run."""
        return self.root / "unet"

    @property
    def controlnet(self) -> Path:
        """ControlNet run."""
        return self.root / "controlnet"

    @property
    def segmenter(self) -> Path:
        """Reference segmenter run (real data only)."""
        return self.root / "segmenter"

    @property
    def features(self) -> Path:
        """In-domain feature encoder run."""
        return self.root / "features"

    @property
    def validation(self) -> Path:
        """Validation report folder."""
        return self.root / "validation"

    @property
    def experiment(self) -> Path:
        """Downstream experiment grid folder."""
        return self.root / "experiment"

    @property
    def report(self) -> Path:
        """Report of the latest pipeline execution (built from its tracked runs)."""
        return self.root / "report"

    @property
    def synthetic(self) -> Path:
        """Augmented (synthetic) dataset."""
        return self.root / "synthetic"


RUNTIME_ONLY = ("num_threads",)
"""Fields that change how fast a stage runs, not what it produces: left out of input keys."""


def _section(cfg: MedsynthConfig, name: str) -> Any:
    data = getattr(cfg, name).model_dump(mode="json")
    if isinstance(data.get("train"), dict):
        data["train"] = {k: v for k, v in data["train"].items() if k not in RUNTIME_ONLY}
    return data


def _final_hashes(run_dir: Path) -> dict[str, str]:
    from medsynth.training.checkpoint import find_checkpoint

    ckpt = find_checkpoint(run_dir, "final")
    return ckpt.file_hashes() if ckpt else {}


def autoencoder_key(cfg: MedsynthConfig) -> str:
    """Input key of the autoencoder stage: its section, the preprocessing section and the manifest."""
    p = StagePaths.of(cfg)
    return sha256_json(
        {
            "ae": _section(cfg, "autoencoder"),
            "pre": _section(cfg, "preprocess"),
            "manifest": sha256_file(p.preprocess / "manifest.json"),
        }
    )


def latents_key(cfg: MedsynthConfig) -> str:
    """Input key of the latent cache: the final autoencoder weights and the manifest."""
    p = StagePaths.of(cfg)
    return sha256_json({"ae": _final_hashes(p.autoencoder), "manifest": sha256_file(p.preprocess / "manifest.json")})


def unet_key(cfg: MedsynthConfig) -> str:
    """Input key of the UNet stage: its section and the training latents."""
    p = StagePaths.of(cfg)
    return sha256_json({"unet": _section(cfg, "diffusion"), "latents": _latents_sha(p)})


def controlnet_key(cfg: MedsynthConfig) -> str:
    """Input key of the ControlNet stage: its section, the UNet weights and the training latents."""
    p = StagePaths.of(cfg)
    return sha256_json({"cn": _section(cfg, "controlnet"), "unet": _final_hashes(p.unet), "latents": _latents_sha(p)})


def _is_cached(run_dir: Path, key: str | None) -> bool:
    from medsynth.training.checkpoint import completed_checkpoint

    return completed_checkpoint(run_dir, key) is not None


def _latents_sha(p: StagePaths) -> str | None:
    f = p.latents / "train.json"
    return json.loads(f.read_text(encoding="utf-8")).get("file_sha256") if f.is_file() else None


def _train_stage(
    run_dir: Path,
    key: str,
    train: Callable[[Any], Any],
    resume: bool,
    tracker: Tracker | None,
    progress: Progress | None,
    device: str | None,
) -> dict[str, Any]:
    """Run one training loop in ``run_dir`` under its input key; the summary says whether it was cached."""
    from medsynth.training.autoencoder import summarize
    from medsynth.training.context import StageContext

    ctx = StageContext.create(run_dir, resume, tracker or NullTracker(), progress, device, key)
    cached = _is_cached(run_dir, key)
    return {**summarize(train(ctx)), "cached": cached}


def run_autoencoder(
    cfg: MedsynthConfig,
    resume: bool = True,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train (or skip, if trained from the same inputs) the autoencoder."""
    from medsynth.training.autoencoder import train_autoencoder

    p = StagePaths.of(cfg)
    return _train_stage(
        p.autoencoder,
        autoencoder_key(cfg),
        lambda ctx: train_autoencoder(cfg, p.preprocess, ctx),
        resume,
        tracker,
        progress,
        device,
    )


def run_encode(cfg: MedsynthConfig, device: str | None = None) -> dict[str, Any]:
    """Encode the train and val splits into the latent cache (skipped when up to date)."""
    import torch

    from medsynth.errors import DataError
    from medsynth.training.latents import encode_split

    p = StagePaths.of(cfg)
    key = latents_key(cfg)
    stamp = p.latents / "key.json"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("key") == key:
        return {"latent_dir": str(p.latents), "cached": True}
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = {}
    for split in ("train", "val"):
        try:
            files[split] = str(encode_split(cfg, p.preprocess, p.autoencoder, p.latents, split, dev))
        except DataError:
            if split == "train":
                raise
            log.info("no validation split: the UNet/ControlNet validate on training latents")
    from medsynth.fileio import write_json_atomic

    write_json_atomic(stamp, {"key": key})
    return {"latent_dir": str(p.latents), "files": files, "cached": False}


def run_unet(
    cfg: MedsynthConfig,
    resume: bool = True,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train (or skip) the latent diffusion UNet."""
    from medsynth.training.diffusion import train_diffusion

    p = StagePaths.of(cfg)
    return _train_stage(
        p.unet,
        unet_key(cfg),
        lambda ctx: train_diffusion(cfg, p.latents, ctx, ae_run=p.autoencoder),
        resume,
        tracker,
        progress,
        device,
    )


def run_controlnet(
    cfg: MedsynthConfig,
    resume: bool = True,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train (or skip) the mask ControlNet."""
    from medsynth.training.controlnet import train_controlnet

    p = StagePaths.of(cfg)
    return _train_stage(
        p.controlnet,
        controlnet_key(cfg),
        lambda ctx: train_controlnet(cfg, p.latents, p.unet, ctx, ae_run=p.autoencoder),
        resume,
        tracker,
        progress,
        device,
    )


def synthesis_key(cfg: MedsynthConfig) -> str:
    """Input key of the synthesis stage: its section, sampling, the generator weights and the manifest."""
    p = StagePaths.of(cfg)
    return sha256_json(
        {
            "syn": _section(cfg, "synthesis"),
            "sampling": _section(cfg, "sampling"),
            "gen": [_final_hashes(p.autoencoder), _final_hashes(p.unet), _final_hashes(p.controlnet)],
            "manifest": sha256_file(p.preprocess / "manifest.json"),
        }
    )


def export_generator(cfg: MedsynthConfig) -> Path:
    """Bundle the final generator checkpoints + config (what the registry stores as ``generator``)."""
    from medsynth.synthesis.bundle import export_bundle

    p = StagePaths.of(cfg)
    runs = {"autoencoder": p.autoencoder, "unet": p.unet, "controlnet": p.controlnet}
    return export_bundle(cfg, runs, p.root / "generator_bundle")


def synthesize_from_model(
    cfg: MedsynthConfig,
    model_uri: str,
    out_dir: str | Path,
    overwrite: bool = False,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Synthesise with a registered generator (``models:/<name>/<version>``) instead of local runs.

    The networks come from the registered bundle; masks, edits and sampling from ``cfg``.
    """
    import torch

    from medsynth.synthesis.bundle import load_bundle
    from medsynth.synthesis.masks import load_masks, mask_vocabulary
    from medsynth.synthesis.run import memorisation_guard, synthesize
    from medsynth.tracking.mlflow_store import download_model, tracking_uri

    p = StagePaths.of(cfg)
    safe = model_uri.removeprefix("models:/").replace("/", "-")
    bundle = download_model(model_uri, p.root / "registry" / safe, tracking_uri(cfg))
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_bundle(bundle, dev)
    masks = load_masks(cfg, p.preprocess)
    summary = synthesize(
        cfg,
        gen,
        masks,
        out_dir,
        overwrite=overwrite,
        progress=progress,
        tracker=tracker,
        labels=mask_vocabulary(cfg),
        guard=memorisation_guard(cfg, p.preprocess),
    )
    return {**summary.to_json(), "model": model_uri}


def run_synthesize(
    cfg: MedsynthConfig,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Generate the augmented dataset from the configured masks.

    With ``out_dir`` None the dataset goes to the config's ``synthetic/`` folder, which the pipeline
    owns: it is skipped when its stored input key matches and replaced otherwise. An explicit
    ``out_dir`` is never overwritten without ``overwrite``.
    """
    from medsynth.fileio import write_json_atomic
    from medsynth.synthesis.run import synthesize_from_config

    p = StagePaths.of(cfg)
    key = synthesis_key(cfg)
    managed = out_dir is None
    target = Path(out_dir) if out_dir is not None else p.synthetic
    stamp = target / "key.json"
    if managed:
        if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("key") == key:
            return {"out_dir": str(target), "cached": True}
        overwrite = True
    summary = synthesize_from_config(
        cfg,
        p.autoencoder,
        p.unet,
        p.controlnet,
        p.preprocess,
        target,
        device=device,
        overwrite=overwrite,
        progress=progress,
        tracker=tracker,
    )
    write_json_atomic(stamp, {"key": key})
    return {**summary.to_json(), "cached": False}


def segmenter_key(cfg: MedsynthConfig) -> str:
    """Input key of the reference segmenter: its section and the preprocessing manifest."""
    p = StagePaths.of(cfg)
    return sha256_json({"seg": _section(cfg, "segmenter"), "manifest": sha256_file(p.preprocess / "manifest.json")})


def features_key(cfg: MedsynthConfig) -> str:
    """Input key of the in-domain feature encoder: its settings and the preprocessing manifest."""
    p = StagePaths.of(cfg)
    feats = cfg.validation.features.model_dump(mode="json")
    feats["train"] = {k: v for k, v in feats["train"].items() if k not in RUNTIME_ONLY}
    return sha256_json({"features": feats, "manifest": sha256_file(p.preprocess / "manifest.json")})


VALIDATION_REPORT_VERSION = 3
"""Bumped when the validation report gains a measurement, so a cached report is recomputed.

2: label contrast; 3: contrast of the lesion label only, worst cases and diversity on the lesion label.
"""


def validation_key(cfg: MedsynthConfig) -> str:
    """Input key of the validation report: its section, sampling, generator, segmenter and encoder weights."""
    p = StagePaths.of(cfg)
    return sha256_json(
        {
            "report": VALIDATION_REPORT_VERSION,
            "val": _section(cfg, "validation"),
            "sampling": _section(cfg, "sampling"),
            "gen": [_final_hashes(p.autoencoder), _final_hashes(p.unet), _final_hashes(p.controlnet)],
            "seg": _final_hashes(p.segmenter),
            "features": _final_hashes(p.features),
            "manifest": sha256_file(p.preprocess / "manifest.json"),
        }
    )


def run_segmenter(
    cfg: MedsynthConfig,
    resume: bool = True,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train (or skip) the reference segmenter on the real training split."""
    from medsynth.evaluation.segmenter import train_segmenter

    p = StagePaths.of(cfg)
    return _train_stage(
        p.segmenter,
        segmenter_key(cfg),
        lambda ctx: train_segmenter(cfg, p.preprocess, ctx),
        resume,
        tracker,
        progress,
        device,
    )


def run_features(
    cfg: MedsynthConfig,
    resume: bool = True,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train (or skip) the in-domain feature encoder used for realism distances.

    Skipped entirely when ``validation.feature_weights`` points to the user's own encoder.
    """
    if cfg.validation.feature_weights:
        return {"feature_weights": cfg.validation.feature_weights, "cached": True}
    from medsynth.evaluation.features import train_feature_encoder

    p = StagePaths.of(cfg)
    return _train_stage(
        p.features,
        features_key(cfg),
        lambda ctx: train_feature_encoder(cfg, p.preprocess, ctx),
        resume,
        tracker,
        progress,
        device,
    )


def run_validate(
    cfg: MedsynthConfig, tracker: Tracker | None = None, progress: Progress | None = None, device: str | None = None
) -> dict[str, Any]:
    """Write the validation report (skipped when its stored input key matches)."""
    import torch

    from medsynth.evaluation.validate import REPORT_JSON, flat_metrics, run_validation
    from medsynth.fileio import write_json_atomic
    from medsynth.synthesis.generator import load_generator

    p = StagePaths.of(cfg)
    key = validation_key(cfg)
    stamp = p.validation / "key.json"
    report_file = p.validation / REPORT_JSON
    if stamp.is_file() and report_file.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("key") == key:
        return {"report": str(report_file), "cached": True}
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_generator(cfg, p.autoencoder, p.unet, p.controlnet, dev)
    features_run = None if cfg.validation.feature_weights else p.features
    rep = run_validation(cfg, gen, p.preprocess, p.segmenter, features_run, p.validation, tracker, progress)
    write_json_atomic(stamp, {"key": key})
    return {"report": str(report_file), "cached": False, **flat_metrics(rep)}


def run_experiment(
    cfg: MedsynthConfig,
    tracker_factory: Any = None,
    cell_map: Any = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The downstream augmentation grid: synthetic pool from training masks, then every cell.

    Cells already recorded in ``experiment/cells.jsonl`` with the same grid key are not retrained;
    the pool resumes per batch.
    """
    import torch

    from medsynth.data.dataset import load_split
    from medsynth.errors import DataError
    from medsynth.evaluation.experiment import grid_cells, make_pool, run_grid
    from medsynth.synthesis.generator import load_generator

    p = StagePaths.of(cfg)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = load_split(p.preprocess, "train")
    test = load_split(p.preprocess, "test")
    try:
        val = load_split(p.preprocess, "val")
    except DataError:
        val = None
    pool = None
    if any(c.ratio > 0 for c in grid_cells(cfg)):
        gen = load_generator(cfg, p.autoencoder, p.unet, p.controlnet, dev)
        pool_progress = progress or LogProgress(len(train) * cfg.experiment.pool_per_mask, "synthetic pool")
        pool = make_pool(gen, train, cfg, p.experiment / "pool", pool_progress)
    external = None
    if cfg.experiment.external_test:
        from medsynth.evaluation.external import load_external_test

        external = load_external_test(cfg, cfg.experiment.external_test)
    grid_progress = progress or LogProgress(len(grid_cells(cfg)), "experiment grid (cells)", every_s=30.0)
    res = run_grid(cfg, train, val, test, pool, p.experiment, tracker_factory, grid_progress, dev, cell_map, external)
    return {
        "tasks": ",".join(res.tasks),
        "metric": res.metric,
        **{f"real_only_grows_{t}": float(g.grows) for t, g in res.growth.items() if g.grows is not None},
        "n_cells": len(res.cells),
        "n_trained": len(res.trained),
        "n_skipped": len(res.skipped),
        "summary_md": str(res.summary_md),
        "summary_csv": str(res.summary_csv),
        "plot": str(res.plot),
        "cells": str(res.cells_path),
        "cached": not res.trained,
    }


def run_report(cfg: MedsynthConfig, pipeline_run_id: str, bench_dir: str | Path | None = None) -> dict[str, Any]:
    """Build the report of one pipeline execution from its tracked runs (``<output>/<name>/report/``).

    The same renderer as ``medsynth report`` (the whitepaper), for this config's experiment only.

    Args:
        cfg: Resolved config (tracking section: store and experiment name).
        pipeline_run_id: The pipeline's parent run (may still be running).
        bench_dir: Optional benchmark results folder to include.

    Returns:
        ``{"report": path of the Markdown file, "figures": count}``.
    """
    from medsynth.report.whitepaper import build_whitepaper
    from medsynth.tracking.mlflow_store import tracking_uri

    name = cfg.tracking.experiment or cfg.name
    out = StagePaths.of(cfg).report
    md = build_whitepaper(
        tracking_uri(cfg), [name], out, bench_dir, command=f"medsynth run ({cfg.name})", run_ids={name: pipeline_run_id}
    )
    return {"report": str(md), "figures": len(list((out / "figures").rglob("*.png")))}
