"""The stages that sample from the generator: guidance calibration, synthesis and export."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from medsynth.config.schema import MedsynthConfig
from medsynth.errors import ConfigError
from medsynth.fileio import sha256_file
from medsynth.pipeline.data_stages import DatasetResult
from medsynth.pipeline.declare import StageResult, StageRun
from medsynth.pipeline.digests import dataset_ref
from medsynth.tracking.base import Tracker

log = logging.getLogger(__name__)


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
    adapter: Path | None = None
    """Site adapter folder (from `medsynth adapt`) applied on top of the generator; needs --out."""

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
    adapter: Path | None = None,
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
    if adapter is not None:
        from medsynth.adapter import apply_adapter

        apply_adapter(gen, adapter)
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
    if opts.adapter is not None and opts.out is None:
        raise ConfigError("command line", "--adapter needs --out (the pipeline's synthetic/ is the base generator's)")
    cfg = resolved_sampling(run)
    target = opts.out if opts.out is not None else run.out
    overwrite = opts.overwrite or opts.out is None  # the pipeline owns synthetic/
    if opts.model:
        summary = synthesize_from_model(
            cfg, opts.model, target, overwrite, run.tracker, run.progress, run.device, opts.adapter
        )
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
            adapter=opts.adapter,
        )
    data = summary.to_json()
    manifest = Path(target) / "manifest.json"
    datasets = []
    artifacts: dict[str, list[str]] = {}
    if manifest.is_file():
        datasets.append(
            dataset_ref(f"{run.cfg.name}-synthetic", str(Path(target).resolve()), sha256_file(manifest), "synthetic")
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
    from medsynth.privacy import MAP_FILE, privacy_dir, pseudonymiser
    from medsynth.synthesis.export import export_dataset

    opts = run.options if isinstance(run.options, ExportOptions) else ExportOptions()
    if opts.out is None:
        raise ConfigError("command line", "export needs --out", hint="medsynth export -c CONFIG --out DIR")
    pseudo = pseudonymiser(run.cfg)
    summary = export_dataset(
        run.cfg,
        opts.out,
        opts.format,
        synthetic_dir=opts.synthetic or run.path("synthesize"),
        cache_dir=run.path("preprocess"),
        with_real=opts.with_real,
        native=opts.native,
        pseudonymise=pseudo,
    )
    table = pseudo.save_table(privacy_dir(run.cfg) / MAP_FILE)  # the way back stays here, never in the export
    if table is not None:
        log.info("case ids pseudonymised; the id table is %s (keep it with the raw data)", table)
    return StageResult(
        metrics={"export/n_real": summary.n_real, "export/n_synthetic": summary.n_synthetic},
        outputs={"dataset": str(opts.out)},
    )
