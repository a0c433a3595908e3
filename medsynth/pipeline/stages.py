"""The pipeline's stages, declared once each, in pipeline order.

Each declaration names the config sections the stage reads, the stages it runs after, its code
version and the library function below that does the work (a thin adapter from a
:class:`~medsynth.pipeline.declare.StageRun` to the library). Reading this file top to bottom is
reading the pipeline.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medsynth.config.schema import MedsynthConfig
from medsynth.fileio import sha256_file, sha256_json
from medsynth.pipeline.declare import Stage, StageResult, StageRun
from medsynth.pipeline.registry import register_stage
from medsynth.tracking.base import Tracker

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# digests shared by several stages


def dataset_fingerprint(cfg: MedsynthConfig) -> str:
    """Digest of the dataset as discovered: case ids, files, sizes and modification times.

    Generates the phantom first when the config asks for it. Cheap (no file is read); the
    preprocessing cache still hashes every file's content per case.
    """
    from medsynth.data.layouts import discover
    from medsynth.data.sources import ensure_dataset

    ensure_dataset(cfg)
    rows = []
    for case in discover(cfg.data).cases:
        files: list[list[str | int | None] | None] = []
        for f in (case.image, case.mask):
            if f is None:
                files.append(None)
                continue
            p = Path(f)
            st = p.stat() if p.exists() else None
            files.append([str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
        rows.append([case.case_id, files])
    return sha256_json(rows)


def files_fingerprint(path: str | Path) -> str:
    """Digest of the files under ``path`` (or of one file): paths, sizes and modification times."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    rows = []
    for p in files:
        st = p.stat() if p.exists() else None
        rows.append([str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
    return sha256_json(rows)


def external_test_fingerprint(cfg: MedsynthConfig) -> str | None:
    """Digest of the experiment's external test set (None when there is none)."""
    ext = cfg.experiment.external_test
    return files_fingerprint(ext) if ext else None


def mask_source_fingerprint(cfg: MedsynthConfig) -> str | None:
    """Digest of the mask files a folder/manifest synthesis source reads (None for the split source).

    Paths, sizes and modification times of every file under the folder (or of the manifest and the
    files it names), so edited masks re-run the synthesis stage.
    """
    sc = cfg.synthesis
    if sc.source == "split" or not sc.masks_path:
        return None
    root = Path(sc.masks_path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    if root.is_file() and root.suffix.lower() == ".csv":
        import csv

        with open(root, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for col in ("mask", "image"):
                    if row.get(col):
                        p = Path(row[col]) if Path(row[col]).is_absolute() else root.parent / row[col]
                        files.append(p)
    rows = []
    for p in files:
        st = p.stat() if p.exists() else None
        rows.append([str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
    return sha256_json(rows)


def _file_digest(*parts: str) -> Any:
    def digest(run: StageRun) -> str:
        return sha256_file(run.out.joinpath(*parts))

    return digest


def _checkpoint_digest(run: StageRun) -> str:
    from medsynth.checkpoint import find_checkpoint

    ckpt = find_checkpoint(run.out, "final")
    if ckpt is None:
        raise ValueError(f"{run.out}: no final checkpoint")
    return sha256_json(ckpt.file_hashes())


# ---------------------------------------------------------------------------------------------
# check and preprocess


def _dataset_ref(cfg: MedsynthConfig, name: str, source: str, digest: str, context: str) -> dict[str, str]:
    return {"name": name, "source": source, "digest": digest, "context": context}


def run_check(run: StageRun) -> StageResult:
    """QC report of every image/mask pair (fails the pipeline on bad cases under ``qc.policy=fail``)."""
    from medsynth.data.qc_report import OVERLAYS, REPORT_JSON, REPORT_MD, enforce_policy
    from medsynth.data.qc_report import run_check as qc_check

    report = qc_check(run.cfg, run.out, run.progress)
    result = StageResult(
        metrics={"qc/n_cases": report.n_cases, "qc/n_bad": report.n_bad},
        outputs={"report": str(run.out / REPORT_MD)},
        artifacts={"qc": [str(run.out / n) for n in (REPORT_JSON, REPORT_MD, OVERLAYS)]},
    )
    for folder, paths in result.artifacts.items():  # attach the report before a failing policy stops us
        for p in paths:
            run.tracker.log_artifact(Path(p), folder)
    enforce_policy(report)
    return result.model_copy(update={"artifacts": {}})


def _process_chunk(cfg: MedsynthConfig, staging: str, chunk: list[Any]) -> list[Any]:
    from medsynth.data import preprocess as pp

    return [pp.process_case(w, cfg, Path(staging)) for w in chunk]


class PreprocessOptions(BaseModel):
    """Options of the preprocess stage."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    chunk_size: int = 64
    """Cases per fanned-out task."""


def run_preprocess(run: StageRun) -> StageResult:
    """Preprocess the dataset into the on-disk cache (cases whose inputs are unchanged are reused)."""
    import shutil
    import time

    from medsynth.data import preprocess as pp

    t0 = time.monotonic()
    cfg = run.cfg
    plan = pp.plan(cfg, run.out)
    log.info("%s; %d cases, %d to process", plan.discovery_message, len(plan.work), len(plan.todo))
    chunk = run.options.chunk_size if isinstance(run.options, PreprocessOptions) else 64
    todo = plan.todo
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    staging = pp.staging_dir(plan.cache_dir)
    try:
        results = []
        for part in run.fan_out(functools.partial(_process_chunk, plan.cfg, str(staging)), chunks):
            results.extend(part)
            run.progress.advance(len(part))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    s = pp.commit(plan, results, staging, time.monotonic() - t0)
    manifest = pp.load_manifest(s.cache_dir)
    run_ds = _dataset_ref(cfg, cfg.name, str(Path(cfg.data.root).resolve()), manifest["dataset"]["digest"], "training")
    log.info(
        "%d items (%d processed, %d cached, %d excluded) in %s",
        s.n_items,
        s.n_processed,
        s.n_cached,
        len(s.excluded),
        s.cache_dir,
    )
    return DatasetResult(
        metrics={
            "n_cases": s.n_cases,
            "n_items": s.n_items,
            "n_processed": s.n_processed,
            "n_cached": s.n_cached,
            "n_excluded": len(s.excluded),
        },
        outputs={"cache_dir": str(s.cache_dir), "manifest": str(s.manifest)},
        artifacts={"preprocess": [str(s.cache_dir / "splits.json")]},
        datasets=[run_ds],
        message=f"{s.n_cases} cases ({s.n_processed} processed, {s.n_cached} cached, {len(s.excluded)} excluded) -> "
        f"{s.n_items} items in {s.cache_dir} [{s.seconds:.1f}s]",
    )


class DatasetResult(StageResult):
    """A stage result that also records dataset inputs (name, source, digest, context) of its run."""

    datasets: list[dict[str, str]] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# training stages: one adapter for all of them


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
    import json

    metrics = {}
    for split in files:
        meta = json.loads((run.out / f"{split}.json").read_text(encoding="utf-8"))
        metrics[f"latents/n_{split}"] = float(meta.get("n", 0))
    return StageResult(outputs=files, metrics=metrics)


def _latents_digest(run: StageRun) -> str:
    import json

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


def _bundle_digest(run: StageRun) -> str:
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


# ---------------------------------------------------------------------------------------------
# guidance calibration


class CalibrationResult(StageResult):
    """Result of the guidance calibration: the chosen scale and why."""

    guidance_scale: float = 1.0
    met: bool = False
    reason: str = ""


def run_calibrate(run: StageRun) -> StageResult:
    """Sweep classifier-free guidance scales on the VALIDATION split and choose the one synthesis uses.

    The smallest scale whose lesion Dice ratio (reference segmenter, synthetic/real) reaches
    ``sampling.calibration.min_dice_ratio`` with the lesion contrast ratio inside
    ``[contrast_low, contrast_high]``; else the best trade-off (see ``evaluation/calibration.py``).
    """
    import json

    from medsynth.data.dataset import load_split
    from medsynth.errors import DataError
    from medsynth.evaluation.calibration import calibrate_guidance, plot_sweep
    from medsynth.evaluation.segmenter import load_segmenter
    from medsynth.fileio import write_text_atomic
    from medsynth.generator import load_generator

    cfg = run.cfg
    dev = run.torch_device()
    pre = run.path("preprocess")
    try:
        val = load_split(pre, "val")
    except DataError as exc:
        raise DataError(
            pre,
            "guidance calibration needs a validation split",
            hint="set data.split.val > 0, or pin sampling.guidance_scale",
        ) from exc
    gen = load_generator(cfg, run.path("autoencoder"), run.path("unet"), run.path("controlnet"), dev)
    seg = load_segmenter(cfg, run.path("segmenter"), dev)
    choice = calibrate_guidance(cfg, gen, val, seg)
    run.out.mkdir(parents=True, exist_ok=True)
    data = write_text_atomic(run.out / "calibration.json", json.dumps(choice.model_dump(mode="json"), indent=2) + "\n")
    plot = plot_sweep(run.out / "guidance_sweep.png", choice, cfg.sampling.calibration)
    log.info("guidance calibration: %s", choice.reason)
    for i, row in enumerate(r for r in choice.rows if r.get("scale") is not None):
        numbers = {
            f"calibration/{k}": float(v)
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        run.tracker.log_metrics(numbers, step=i)  # the sweep as curves over the scales (step = index)
    metrics = {"calibration/guidance_scale": choice.scale, "calibration/met": float(choice.met)}
    for name, v in (("dice_ratio", choice.dice_ratio), ("contrast_ratio", choice.contrast_ratio), ("fp", choice.fp)):
        if v is not None:
            metrics[f"calibration/chosen_{name}"] = float(v)
    return CalibrationResult(
        metrics=metrics,
        outputs={"calibration": str(data), "plot": str(plot)},
        artifacts={"calibration": [str(data), str(plot)]},
        headline={"calibration/guidance_scale": choice.scale},
        message=choice.reason,
        guidance_scale=choice.scale,
        met=choice.met,
        reason=choice.reason,
    )


def resolved_sampling(run: StageRun) -> MedsynthConfig:
    """The config with ``sampling.guidance_scale`` resolved: pinned, or the calibrated value."""
    return with_calibrated_guidance(run.cfg, run.root)


def with_calibrated_guidance(cfg: MedsynthConfig, root: Path) -> MedsynthConfig:
    """``cfg`` with an ``auto`` guidance scale replaced by the calibration stage's choice (when it ran)."""
    if not needs_calibration(cfg):
        return cfg
    from medsynth.pipeline.keys import read_stamp
    from medsynth.pipeline.registry import get_stage

    stamp = read_stamp(root, get_stage("calibrate"))
    if stamp is None:
        return cfg  # sampling.scale then says, in one line, that calibration has to run first
    scale = float(stamp.result["guidance_scale"])
    update: dict[str, Any] = {}
    if cfg.sampling.guidance_scale == "auto":
        update["sampling"] = cfg.sampling.with_scale(scale)
    pool = cfg.experiment.pool_sampling
    if pool is not None and pool.guidance_scale == "auto":
        update["experiment"] = cfg.experiment.model_copy(update={"pool_sampling": pool.with_scale(scale)})
    return cfg.model_copy(update=update)


def needs_calibration(cfg: MedsynthConfig) -> bool:
    """True when synthesis or the experiment pool leaves the guidance scale to the calibration (``auto``)."""
    pool = cfg.experiment.pool_sampling
    return cfg.sampling.guidance_scale == "auto" or (pool is not None and pool.guidance_scale == "auto")


# ---------------------------------------------------------------------------------------------
# synthesis


class SynthesizeOptions(BaseModel):
    """Options of ``medsynth synthesize`` (the pipeline runs it with none of them)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    out: Path | None = None
    """Output dataset folder (never overwritten without --overwrite); default: the pipeline's synthetic/."""
    masks: str | None = None
    """Mask source: split | folder | manifest."""
    masks_path: str | None = None
    """Folder of mask files or CSV manifest."""
    split: str | None = None
    """Split whose masks are used (source 'split')."""
    n_per_mask: int | None = None
    """Images generated per (edited) mask."""
    edits: str | None = None
    """Comma-separated edits: none, flip, elastic, transplant."""
    overwrite: bool = False
    """Replace an existing output folder."""
    model: str | None = None
    """Registered generator (models:/<name>/<version>) instead of the config's runs."""
    model_grid: bool = False
    """Write mask-file sources on the model's grid instead of each mask's own geometry."""

    def standalone(self) -> bool:
        """A registered generator needs no local training stages."""
        return self.model is not None

    def overrides(self) -> list[str]:
        """The config overrides these options stand for."""
        extra = []
        for key, value in (
            ("source", self.masks),
            ("masks_path", self.masks_path),
            ("split", self.split),
            ("n_per_mask", self.n_per_mask),
        ):
            if value is not None:
                extra.append(f"synthesis.{key}={value}")
        if self.edits:
            extra.append(f"synthesis.edits=[{self.edits}]")
        if self.model_grid:
            extra.append("synthesis.output_geometry=model")
        return extra


class SynthesisResult(DatasetResult):
    """Result of the synthesis stage: the augmented dataset."""

    out_dir: str = ""
    n_images: int = 0


def synthesize_from_model(
    cfg: MedsynthConfig,
    model_uri: str,
    out_dir: str | Path,
    overwrite: bool = False,
    tracker: Tracker | None = None,
    progress: Any = None,
    device: str | None = None,
) -> Any:
    """Synthesise with a registered generator (``models:/<name>/<version>``) instead of local runs.

    The networks come from the registered bundle; masks, edits and sampling from ``cfg``.
    """
    from medsynth.device import resolve_device
    from medsynth.pipeline.runner import stage_root
    from medsynth.synthesis.bundle import load_bundle
    from medsynth.synthesis.masks import load_masks, mask_vocabulary
    from medsynth.synthesis.run import memorisation_guard, synthesize
    from medsynth.tracking.mlflow_store import download_model, tracking_uri

    root = stage_root(cfg)
    cfg = with_calibrated_guidance(cfg, root)
    safe = model_uri.removeprefix("models:/").replace("/", "-")
    bundle = download_model(model_uri, root / "registry" / safe, tracking_uri(cfg))
    gen = load_bundle(bundle, resolve_device(device))
    pre = root / "preprocess"
    masks = load_masks(cfg, pre)
    return synthesize(
        cfg,
        gen,
        masks,
        out_dir,
        overwrite=overwrite,
        progress=progress,
        tracker=tracker,
        labels=mask_vocabulary(cfg),
        guard=memorisation_guard(cfg, pre),
    )


def run_synthesize(run: StageRun) -> StageResult:
    """Generate the augmented dataset from the configured masks (the pipeline's copy: ``synthetic/``)."""
    from medsynth.synthesis.run import synthesize_from_config

    opts = run.options if isinstance(run.options, SynthesizeOptions) else SynthesizeOptions()
    cfg = resolved_sampling(run)
    target = opts.out if opts.out is not None else run.out
    overwrite = opts.overwrite or opts.out is None  # the pipeline owns synthetic/
    if opts.model:
        summary = synthesize_from_model(cfg, opts.model, target, overwrite, run.tracker, run.progress, run.device)
    else:
        summary = synthesize_from_config(
            cfg,
            run.path("autoencoder"),
            run.path("unet"),
            run.path("controlnet"),
            run.path("preprocess"),
            target,
            device=run.device,
            overwrite=overwrite,
            progress=run.progress,
            tracker=run.tracker,
        )
    data = summary.to_json()
    manifest = Path(target) / "manifest.json"
    datasets = []
    artifacts: dict[str, list[str]] = {}
    if manifest.is_file():
        datasets.append(
            _dataset_ref(
                run.cfg, f"{run.cfg.name}-synthetic", str(Path(target).resolve()), sha256_file(manifest), "synthetic"
            )
        )
        artifacts["synthesis"] = [str(manifest)]
    numbers = {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return SynthesisResult(
        metrics={f"synthesis/{k}": v for k, v in numbers.items()},
        outputs={"out_dir": str(target), "manifest": str(manifest)},
        artifacts=artifacts,
        datasets=datasets,
        out_dir=str(target),
        n_images=int(data.get("n_images", 0) or 0),
    )


# ---------------------------------------------------------------------------------------------
# validation, experiment, report


def run_validate(run: StageRun) -> StageResult:
    """Plausibility, visibility, realism, diversity and memorisation of images from test masks."""
    from medsynth.evaluation.validate import REPORT_JSON, flat_metrics, run_validation
    from medsynth.generator import load_generator

    cfg = resolved_sampling(run)
    gen = load_generator(cfg, run.path("autoencoder"), run.path("unet"), run.path("controlnet"), run.torch_device())
    features_run = None if cfg.validation.feature_weights else run.path("features")
    rep = run_validation(
        cfg, gen, run.path("preprocess"), run.path("segmenter"), features_run, run.out, run.tracker, run.progress
    )
    metrics = flat_metrics(rep)
    return StageResult(
        metrics=metrics,
        outputs={"report": str(run.out / REPORT_JSON)},
        headline=_validation_headline(cfg, metrics),
    )


def _validation_report_name() -> str:
    from medsynth.evaluation.validate import REPORT_JSON

    return str(REPORT_JSON)


def _validation_headline(cfg: MedsynthConfig, metrics: dict[str, float]) -> dict[str, float]:
    from medsynth.data.preprocess import output_labels
    from medsynth.evaluation.validate import lesion_label

    out = {
        k: v
        for k, v in metrics.items()
        if k in ("val/fid_in_domain", "val/kid_in_domain", "val/memorised_fraction", "val/diversity")
    }
    try:
        lesion = lesion_label(cfg)
    except Exception:
        lesion = None
    if lesion is not None:
        name = output_labels(cfg).get(lesion, str(lesion))
        for suffix in ("ratio", "contrast_ratio"):
            k = f"val/{name}_{suffix}"
            if k in metrics:
                out[k] = metrics[k]
    return out


def run_experiment(run: StageRun) -> StageResult:
    """The downstream augmentation grid: synthetic pool from training masks, then every cell.

    Cells already recorded under the same grid key are not retrained; the pool resumes per batch.
    """
    from medsynth.data.dataset import load_split
    from medsynth.errors import DataError
    from medsynth.evaluation.experiment import grid_cells, make_pool, run_grid
    from medsynth.generator import load_generator
    from medsynth.progress import LogProgress

    cfg = resolved_sampling(run)
    pre = run.path("preprocess")
    dev = run.torch_device()
    train = load_split(pre, "train")
    test = load_split(pre, "test")
    try:
        val = load_split(pre, "val")
    except DataError:
        val = None
    pool = None
    if any(c.ratio > 0 for c in grid_cells(cfg)):
        gen = load_generator(cfg, run.path("autoencoder"), run.path("unet"), run.path("controlnet"), dev)
        pool_progress = LogProgress(len(train) * cfg.experiment.pool_per_mask, "synthetic pool")
        pool = make_pool(gen, train, cfg, run.out / "pool", pool_progress)
    external = None
    if cfg.experiment.external_test:
        from medsynth.evaluation.external import load_external_test

        external = load_external_test(cfg, cfg.experiment.external_test)

    def cell_map(work: Any, cells: list[Any], on_done: Any) -> None:
        for rec in run.fan_out(work, cells):
            on_done(rec)

    grid_progress = LogProgress(len(grid_cells(cfg)), "experiment grid (cells)", every_s=30.0)
    res = run_grid(cfg, train, val, test, pool, run.out, run.child_runs, grid_progress, dev, cell_map, external)
    headline: dict[str, float] = {}
    for row in res.summary:
        if row.delta_vs_real is not None and not (row.arm == "real" and row.ratio == 0):  # vs real only
            pct = round(row.fraction * 100)
            headline[f"exp/delta_{row.task}_{row.metric}_{row.arm}_r{row.ratio}_f{pct}"] = float(row.delta_vs_real)
    growth = {f"exp/real_only_grows_{t}": float(g.grows) for t, g in res.growth.items() if g.grows is not None}
    return StageResult(
        metrics={"exp/n_cells": len(res.cells), "exp/n_trained": len(res.trained), **growth, **headline},
        outputs={
            "summary_md": str(res.summary_md),
            "summary_csv": str(res.summary_csv),
            "plot": str(res.plot),
            "cells": str(res.cells_path),
        },
        artifacts={"experiment": [str(res.summary_md), str(res.summary_csv), str(res.plot)]},
        headline={**headline, **growth},
    )


class ExportOptions(BaseModel):
    """Options of ``medsynth export``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    out: Path | None = None
    """New dataset folder (required; never overwritten)."""
    format: str = "nnunetv2"
    """nnunetv2 | msd | folder."""
    with_real: bool = False
    """Add the real training cases of the preprocessing cache."""
    native: bool = False
    """Each case on its source mask's own grid and intensity scale."""
    synthetic: Path | None = None
    """Synthetic dataset to export (default: the pipeline's synthetic/ folder)."""

    def standalone(self) -> bool:
        """An explicit synthetic folder needs no pipeline stage to run first."""
        return self.synthetic is not None


def run_export(run: StageRun) -> StageResult:
    """Export the augmented dataset (synthetic, optionally with the real cases) as nnU-Net v2, MSD or a folder."""
    from medsynth.errors import ConfigError
    from medsynth.synthesis.export import export_dataset

    opts = run.options if isinstance(run.options, ExportOptions) else ExportOptions()
    if opts.out is None:
        raise ConfigError("command line", "export needs --out", hint="medsynth export -c CONFIG --out DIR")
    summary = export_dataset(
        run.cfg,
        opts.out,
        opts.format,
        synthetic_dir=opts.synthetic or run.path("synthesize"),
        cache_dir=run.path("preprocess"),
        with_real=opts.with_real,
        native=opts.native,
    )
    return StageResult(
        metrics={"export/n_real": summary.n_real, "export/n_synthetic": summary.n_synthetic},
        outputs={"dataset": str(opts.out)},
    )


class ReportOptions(BaseModel):
    """Options of the report stage (set by the pipeline)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    pipeline_run_id: str | None = None
    """The pipeline execution (parent run) to report."""


def run_report(run: StageRun) -> StageResult:
    """The report of one pipeline execution, rendered from its tracked runs (same renderer as the whitepaper)."""
    from medsynth.report.whitepaper import build_whitepaper
    from medsynth.tracking.mlflow_store import tracking_uri

    cfg = run.cfg
    opts = run.options if isinstance(run.options, ReportOptions) else ReportOptions()
    if opts.pipeline_run_id is None:
        return StageResult(outputs={})
    name = cfg.tracking.experiment or cfg.name
    md = build_whitepaper(
        tracking_uri(cfg),
        [name],
        run.out,
        None,
        command=f"medsynth run ({cfg.name})",
        run_ids={name: opts.pipeline_run_id},
    )
    n_fig = len(list((run.out / "figures").rglob("*.png")))
    return StageResult(
        outputs={"report": str(md)}, metrics={"report/figures": n_fig}, artifacts={"report": [str(run.out)]}
    )


# ---------------------------------------------------------------------------------------------
# the graph

TRAIN = ("train",)

register_stage(
    Stage(
        "check",
        run_check,
        reads=("data", "qc", "phantom"),
        folder="qc",
        cli=("check",),
        inputs=dataset_fingerprint,
        digest=_file_digest("qc_report.json"),
        help="Check every image/mask pair and write the QC report (JSON, Markdown, overlays).",
    )
)
register_stage(
    Stage(
        "preprocess",
        run_preprocess,
        reads=("data", "preprocess", "qc", "phantom"),
        cli=("preprocess",),
        options=PreprocessOptions,
        result=DatasetResult,
        inputs=dataset_fingerprint,
        digest=_file_digest("manifest.json"),
        fan_out=True,
        progress_total=lambda cfg: 0,
        help="Preprocess the dataset into the on-disk cache (unchanged cases are not redone).",
    )
)
register_stage(
    Stage(
        "autoencoder",
        run_autoencoder,
        reads=("autoencoder",),
        ignores=("autoencoder.tiling",),  # decoding/encoding in tiles: read by the stages that decode
        after=("preprocess",),
        result=TrainResult,
        cli=("train", "autoencoder"),
        register="autoencoder",
        digest=_checkpoint_digest,
        progress_total=lambda cfg: cfg.autoencoder.train.steps,
        help="Train the KL autoencoder (L1 + KL, optional patch-adversarial loss) and its latent scale factor.",
    )
)
register_stage(
    Stage(
        "latents",
        run_latents,
        reads=("autoencoder.tiling",),
        after=("autoencoder", "preprocess"),
        cli=("train", "latents"),
        digest=_latents_digest,
        help="Encode the train/val splits once with the trained autoencoder (latent means).",
    )
)
register_stage(
    Stage(
        "unet",
        run_unet,
        reads=("diffusion",),
        after=("latents",),
        result=TrainResult,
        cli=("train", "diffusion"),
        register="unet",
        digest=_checkpoint_digest,
        progress_total=lambda cfg: cfg.diffusion.train.steps,
        help="Train the latent diffusion UNet (epsilon, v-prediction or rectified flow).",
    )
)
register_stage(
    Stage(
        "controlnet",
        run_controlnet,
        reads=("controlnet",),
        after=("unet", "latents"),
        result=TrainResult,
        cli=("train", "controlnet"),
        register="controlnet",
        digest=_checkpoint_digest,
        progress_total=lambda cfg: cfg.controlnet.train.steps,
        help="Train the ControlNet on full-resolution masks, initialised from the frozen UNet.",
    )
)
register_stage(
    Stage(
        "segmenter",
        run_segmenter,
        reads=("segmenter",),
        after=("preprocess",),
        result=TrainResult,
        cli=("train", "segmenter"),
        register="segmenter",
        digest=_checkpoint_digest,
        progress_total=lambda cfg: cfg.segmenter.train.steps,
        help="Train the reference segmenter on the real training split (for plausibility).",
    )
)
register_stage(
    Stage(
        "calibrate",
        run_calibrate,
        reads=("sampling", "autoencoder.tiling"),
        after=("autoencoder", "unet", "controlnet", "segmenter", "preprocess"),
        result=CalibrationResult,
        folder="calibration",
        cli=("calibrate",),
        enabled=needs_calibration,
        digest=_file_digest("calibration.json"),
        help="Choose the guidance scale on the validation split (sampling.guidance_scale: auto): the smallest "
        "scale whose lesion Dice ratio and contrast ratio match the real images.",
    )
)
register_stage(
    Stage(
        "generator",
        run_generator,
        reads=("sampling",),  # the bundle's config: sampling defaults of the registered model
        after=("autoencoder", "unet", "controlnet", "calibrate"),
        cli=("train", "generator"),
        register="generator",
        digest=_bundle_digest,
        help="Bundle the trained autoencoder, UNet and ControlNet (+ config) as the registered generator.",
    )
)
register_stage(
    Stage(
        "features",
        run_features,
        reads=("validation.features",),
        after=("preprocess",),
        result=TrainResult,
        cli=("train", "features"),
        digest=_checkpoint_digest,
        enabled=lambda cfg: not cfg.validation.feature_weights,
        progress_total=lambda cfg: cfg.validation.features.train.steps,
        help="Train the in-domain feature encoder for realism distances (skipped with validation.feature_weights).",
    )
)
register_stage(
    Stage(
        "synthesize",
        run_synthesize,
        reads=("synthesis", "sampling", "autoencoder.tiling"),
        after=("generator", "calibrate", "preprocess"),
        result=SynthesisResult,
        folder="synthetic",
        cli=("synthesize",),
        inputs=mask_source_fingerprint,
        options=SynthesizeOptions,
        managed=lambda o: not (isinstance(o, SynthesizeOptions) and (o.out is not None or o.model is not None)),
        digest=_file_digest("manifest.json"),
        help="Synthesise image/mask pairs from real or edited masks into an augmented dataset with provenance.",
    )
)
register_stage(
    Stage(
        "validate",
        run_validate,
        reads=("validation", "sampling", "autoencoder.tiling"),
        after=("generator", "calibrate", "segmenter", "features", "preprocess"),
        version=3,  # 2: label contrast; 3: contrast, worst cases and diversity on the lesion label only
        folder="validation",
        cli=("validate",),
        digest=lambda run: _file_digest(_validation_report_name())(run),
        help="Validate synthetic images: plausibility (real-data segmenter Dice, synthetic vs real, with CIs), "
        "visibility, realism, diversity and memorisation.",
    )
)
register_stage(
    Stage(
        "experiment",
        run_experiment,
        reads=("experiment", "sampling", "segmenter", "autoencoder.tiling"),
        after=("generator", "calibrate", "preprocess"),
        inputs=external_test_fingerprint,
        cli=("experiment",),
        fan_out=True,
        digest=_file_digest("summary.csv"),
        help="Downstream augmentation grid: a task model on limited real data, with and without synthetic data, "
        "over real-data fractions, synthetic ratios and seeds.",
    )
)
register_stage(
    Stage(
        "export",
        run_export,
        after=("synthesize", "preprocess"),
        cli=("export",),
        options=ExportOptions,
        managed=lambda o: False,  # the user's own folder: never cached, never overwritten
        in_pipeline=False,
        help="Export the augmented dataset (real + synthetic, provenance CSV) as nnU-Net v2, MSD or a folder.",
    )
)
register_stage(
    Stage(
        "report",
        run_report,
        after=("check", "generator", "calibrate", "synthesize", "validate", "experiment"),
        options=ReportOptions,
        enabled=lambda cfg: cfg.tracking.enabled,
        managed=lambda o: isinstance(o, ReportOptions) and o.pipeline_run_id is not None,
        help="The report of one pipeline execution, built from its tracked runs.",
    )
)
