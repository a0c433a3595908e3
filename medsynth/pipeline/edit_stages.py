"""The counterfactual stages: ``medsynth edit`` (edits of the user's files) and the measured test-split edits."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from medsynth.pipeline.declare import StageResult, StageRun
from medsynth.pipeline.sampling_stages import resolved_sampling

log = logging.getLogger(__name__)


class EditOptions(BaseModel):
    """Options of ``medsynth edit``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    image: Path | None = None
    """The real image to edit."""
    mask: Path | None = None
    """Its mask (same grid)."""
    edit: str | None = None
    """remove | move:dx,dy | scale:f | mask:NEW_MASK_FILE."""
    batch: Path | None = None
    """CSV with columns image, mask, edit (instead of --image/--mask/--edit)."""
    out: Path | None = None
    """New output folder (required; never overwritten)."""


def _requests(opts: EditOptions) -> list[object]:
    from medsynth.errors import ConfigError
    from medsynth.synthesis.counterfactual_files import EditRequest, read_batch

    single = (opts.image, opts.mask, opts.edit)
    if opts.batch is not None:
        if any(v is not None for v in single):
            raise ConfigError("command line", "give either --batch or --image/--mask/--edit, not both")
        return list(read_batch(opts.batch))
    if any(v is None for v in single):
        raise ConfigError(
            "command line",
            "edit needs --image, --mask and --edit (or --batch edits.csv)",
            hint="medsynth edit -c CONFIG --image X --mask M --edit remove --out DIR",
        )
    from medsynth.config.counterfactual import parse_counterfactual_edit

    assert opts.image is not None and opts.mask is not None and opts.edit is not None
    from medsynth.errors import DataError

    for p in (opts.image, opts.mask):
        if not p.exists():
            raise DataError(p.resolve(), "file does not exist (command line)")  # before loading any network
    try:
        parse_counterfactual_edit(opts.edit)
    except ValueError as exc:
        raise ConfigError("command line", f"--edit: {exc}") from None
    return [EditRequest(opts.image.resolve(), opts.mask.resolve(), opts.edit)]


def run_edit(run: StageRun) -> StageResult:
    """Counterfactual edits of the user's image/mask files into a new folder (never cached, never overwritten)."""
    from medsynth.errors import ConfigError, OutputExistsError
    from medsynth.fileio import is_nonempty
    from medsynth.generator import load_generator
    from medsynth.synthesis.counterfactual_files import PROVENANCE, edit_files

    opts = run.options if isinstance(run.options, EditOptions) else EditOptions()
    if opts.out is None:
        raise ConfigError("command line", "edit needs --out", hint="medsynth edit -c CONFIG ... --out DIR")
    if is_nonempty(opts.out):
        raise OutputExistsError(opts.out)  # before loading anything
    requests = _requests(opts)
    cfg = resolved_sampling(run)
    gen = load_generator(cfg, run.path("autoencoder"), run.path("unet"), run.path("controlnet"), run.torch_device())
    record = edit_files(cfg, gen, requests, opts.out, run.progress)  # type: ignore[arg-type]
    prov = opts.out / PROVENANCE
    run.tracker.log_artifact(prov, "edit")
    run.tracker.log_artifact(opts.out / "counterfactual.png", "edit")
    return StageResult(
        metrics={"edit/n_edits": float(len(record["items"]))},
        outputs={"out": str(opts.out), "provenance": str(prov)},
        message=f"{len(record['items'])} edited scan(s) in {opts.out}",
    )


class CounterfactualResult(StageResult):
    """Result of the counterfactual stage (None: n/a, e.g. no edit of that kind)."""

    n_edits: int = 0
    ssim_outside: float | None = None
    dice_ratio: float | None = None
    fp_rate_removed: float | None = None


def run_counterfactual(run: StageRun) -> StageResult:
    """Edit lesion-bearing TEST scans (remove / move / scale) and measure the edits (evaluation/counterfactual.py)."""
    from medsynth.data.dataset import load_split
    from medsynth.evaluation.counterfactual import FIGURE, REPORT, evaluate_counterfactuals
    from medsynth.evaluation.segmenter import load_segmenter
    from medsynth.evaluation.validate import lesion_label
    from medsynth.generator import load_generator

    cfg = resolved_sampling(run)
    dev = run.torch_device()
    gen = load_generator(cfg, run.path("autoencoder"), run.path("unet"), run.path("controlnet"), dev)
    seg = load_segmenter(cfg, run.path("segmenter"), dev)
    test = load_split(run.path("preprocess"), "test")
    rep = evaluate_counterfactuals(cfg, gen, test, seg, lesion_label(cfg), run.out, run.progress)
    summary = rep.get("summary", {})
    metrics = {f"cf/{k}": float(v) for k, v in summary.items() if v is not None}
    for spec, entry in rep.get("per_edit", {}).items():
        tag = spec.replace(":", "_").replace(",", "_")
        for name in ("ssim_outside", "dice_ratio", "fp_rate_removed"):
            value = (entry.get(name) or {}).get("value")
            if value is not None:
                metrics[f"cf/{tag}/{name}"] = float(value)
    files = [str(run.out / REPORT)] + ([str(run.out / FIGURE)] if (run.out / FIGURE).is_file() else [])
    msg = rep.get("na") or (
        f"{rep['n_edits']} edits of {rep['n_scans']} test scans: SSIM outside the edit region "
        f"{summary.get('ssim_outside')}, lesion Dice ratio vs plain synthesis {summary.get('dice_ratio')}, "
        f"lesion found again after removal {summary.get('fp_rate_removed')}"
    )
    return CounterfactualResult(
        metrics=metrics,
        outputs={"report": files[0], **({"figure": files[1]} if len(files) > 1 else {})},
        artifacts={"counterfactual": files},
        headline={k: v for k, v in metrics.items() if k in ("cf/ssim_outside", "cf/dice_ratio", "cf/fp_rate_removed")},
        message=msg,
        n_edits=int(rep["n_edits"]),
        ssim_outside=summary.get("ssim_outside"),
        dice_ratio=summary.get("dice_ratio"),
        fp_rate_removed=summary.get("fp_rate_removed"),
    )
