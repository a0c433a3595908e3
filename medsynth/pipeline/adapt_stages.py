"""The adaptation stages: ``adapt`` (an adapter of the generator for new data) and the site-adaptation experiment."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medsynth.errors import ConfigError
from medsynth.pipeline.declare import StageResult, StageRun

log = logging.getLogger(__name__)


class AdaptOptions(BaseModel):
    """Options of ``medsynth adapt``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    data: Path | None = None
    """Dataset root of the new site (read with the config's data layout and labels)."""
    include: str | None = None
    """Regex on case ids: only these cases of --data are used."""
    method: str = "lora"
    """lora (peft LoRA of rank --rank) or full (fine-tune the same layers)."""
    rank: int = 4
    """LoRA rank r."""
    steps: int | None = None
    """Adaptation steps (default: adaptation.steps of the config)."""
    out: Path | None = None
    """Adapter folder (default: <output_dir>/<name>/adapt/<data folder>-<method>[-r<rank>])."""


class AdaptResult(StageResult):
    """An adapter folder and what it cost."""

    adapter: str = ""
    trainable_params: int = 0
    seconds: float = 0.0


def run_adapt(run: StageRun) -> StageResult:
    """Adapt the config's generator to the data of ``--data`` and save the adapter (safetensors + JSON)."""
    import shutil

    from medsynth.adaptation.adapt import AdaptSettings, adapt_generator, encode_for_adaptation
    from medsynth.data.dataset import load_split
    from medsynth.data.preprocess import run_preprocess

    opts = run.options if isinstance(run.options, AdaptOptions) else AdaptOptions()
    if opts.data is None:
        raise ConfigError("command line", "medsynth adapt needs --data DATASET_ROOT (the new site's images and masks)")
    cfg, ac = run.cfg, run.cfg.adaptation
    settings = AdaptSettings(
        method=opts.method,
        rank=opts.rank,
        alpha=ac.alpha,
        networks=tuple(ac.networks),
        steps=opts.steps or ac.steps,
        lr=ac.lr,
        batch_size=ac.batch_size,
        seed=ac.seed,
    )
    settings.check()
    if not Path(opts.data).exists():
        raise ConfigError("command line", f"--data {opts.data}: no such dataset folder")
    name = f"{Path(opts.data).name}-{opts.method}" + (f"-r{opts.rank}" if opts.method == "lora" else "")
    out = Path(opts.out) if opts.out is not None else run.out / name
    work = out.parent / f".{out.name}.data"
    data = cfg.data.model_copy(update={"root": str(opts.data), "include": opts.include})
    site_cfg = cfg.model_copy(update={"data": data})
    bundle = run.path("generator") / "bundle"
    try:
        run_preprocess(site_cfg, work / "cache")
        items = load_split(work / "cache", None)
        latents = encode_for_adaptation(cfg, items, bundle / "autoencoder", work / "latents", run.torch_device())
        res = adapt_generator(
            cfg,
            bundle,
            latents.parent,
            out,
            settings,
            device=run.torch_device(),
            progress=run.progress,
            info={"data": str(Path(opts.data).resolve()), "include": opts.include, "n_items": len(items)},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return AdaptResult(
        metrics={
            "adapt/trainable_params": float(res.spec.trainable_parameters),
            "adapt/seconds": res.seconds,
            **{f"adapt/{k}": v for k, v in res.metrics.items()},
        },
        outputs={"adapter": str(out)},
        model=str(out),
        adapter=str(out),
        trainable_params=res.spec.trainable_parameters,
        seconds=res.seconds,
        message=f"{opts.method} adapter ({res.spec.trainable_parameters} trainable parameters, {res.seconds:.1f}s, "
        f"{len(items)} items) -> {out}",
    )


class AdaptationResult(StageResult):
    """The site-adaptation table: one row per (k, method)."""

    site: str = ""
    rows: list[dict[str, Any]] = Field(default_factory=list)


def run_adaptation(run: StageRun) -> StageResult:
    """Adapt the generator to the held-out site from k patients; compare none / LoRA / full on the rest."""
    from medsynth.adaptation.experiment import REPORT_JSON, TABLE_CSV, TABLE_MD, run_site_adaptation
    from medsynth.pipeline.sampling_stages import resolved_sampling

    cfg = resolved_sampling(run)
    features = None if cfg.validation.feature_weights else run.path("features")
    report = run_site_adaptation(
        cfg,
        run.path("generator") / "bundle",
        run.path("segmenter"),
        features,
        run.out,
        run.ledger(),
        device=run.torch_device(),
        progress=run.progress,
    )
    metrics: dict[str, float] = {}
    for r in report["rows"]:
        for key in ("dice_ratio", "fid", "trainable_params", "adapt_seconds"):
            if r.get(key) is not None:
                metrics[f"adaptation/k{r['k']}/{r['method']}/{key}"] = float(r[key])
    return AdaptationResult(
        metrics=metrics,
        outputs={"table": str(run.out / TABLE_CSV), "summary_md": str(run.out / TABLE_MD)},
        artifacts={"adaptation": [str(run.out / f) for f in (TABLE_CSV, TABLE_MD, REPORT_JSON)]},
        site=report["site"],
        rows=report["rows"],
        message=f"site {report['site']}: {len(report['rows'])} cells -> {run.out / TABLE_MD}",
    )
