"""How well counterfactual edits of real TEST scans work: the measurements of the counterfactual stage.

Up to ``counterfactual.n_cases`` lesion-bearing test scans (lesion of at least ``min_lesion_voxels``,
spread evenly over the split) are edited with every entry of ``counterfactual.edits``
(:func:`medsynth.synthesis.counterfactual.counterfactual`); an edit that cannot apply to a scan (e.g.
a move that leaves the anatomy) is skipped and counted. Measured, with patient-bootstrap intervals:

* ``ssim_outside``: SSIM between the edited image and the autoencoder's round trip of the original,
  averaged over the SSIM windows that do not touch the dilated edit region (target
  ``min_ssim_outside``): what the edit leaves alone stays as it was.
* ``dice_ratio`` (move, scale): the reference segmenter's lesion Dice against the EDITED mask on the
  edited images, divided by its Dice on plain synthesis from the same edited masks (same sampler
  steps and guidance): does the lesion appear where the new mask puts it, as well as when drawn from
  noise (target ``min_dice_ratio``)?
* ``fp_rate_removed`` (remove): how often the segmenter still finds the lesion WHERE IT WAS (more than
  ``fp_min_voxels`` predicted lesion voxels inside the removed lesion's voxels) after it was removed,
  beside the same rate on plain synthesis from the lesion-free masks (the segmenter's own false
  positives there) and on the real scans (``found_rate_real``: can it find the lesion at all before
  the edit?); ``residual_removed`` is the mean fraction of the removed lesion's voxels still predicted
  as lesion.

The numbers are only as good as the generator and the reference segmenter; at toy sizes they say
that the machinery runs, not that edits look real.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.config.counterfactual import parse_counterfactual_edit
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet
from medsynth.evaluation.metrics import dice_per_label
from medsynth.evaluation.segmenter import predict
from medsynth.evaluation.stats import bootstrap_mean, bootstrap_ratio
from medsynth.fileio import write_json_atomic
from medsynth.generator import MaskGenerator
from medsynth.progress import NullProgress, Progress
from medsynth.synthesis.counterfactual import CounterfactualOutput, batched
from medsynth.synthesis.counterfactual_files import COLUMNS, figure_rows
from medsynth.synthesis.lesion_edits import apply_lesion_edit

log = logging.getLogger(__name__)

__all__ = ["REPORT", "evaluate_counterfactuals", "masked_ssim", "select_cases"]

REPORT, FIGURE = "counterfactual.json", "counterfactual.png"


def select_cases(masks: torch.Tensor, lesion: int, n: int, min_voxels: int) -> list[int]:
    """Indices of up to ``n`` items whose lesion has at least ``min_voxels`` voxels, evenly spread."""
    sizes = (masks == lesion).flatten(1).sum(1)
    ok = [i for i in range(masks.shape[0]) if int(sizes[i]) >= min_voxels]
    if len(ok) <= n:
        return ok
    picks = np.linspace(0, len(ok) - 1, n).round().astype(int)
    return [ok[int(p)] for p in sorted(set(picks.tolist()))]


def _window(spatial: tuple[int, ...]) -> int:
    win = min(11, *spatial)
    return max(win - (1 - win % 2), 1)


def masked_ssim(x: torch.Tensor, y: torch.Tensor, exclude: torch.Tensor) -> list[float]:
    """Per-item mean SSIM of ``x`` vs ``y`` over the windows that do not touch ``exclude``.

    Args:
        x: ``(B, 1, *S)`` images in [0, 1].
        y: ``(B, 1, *S)`` references in [0, 1].
        exclude: ``(B, 1, *S)`` bool region to leave out (every window touching it is dropped).

    Returns:
        One value per item (NaN when every window touches the region).
    """
    from monai.metrics.regression import compute_ssim_and_cs

    d = x.ndim - 2
    win = _window(tuple(int(s) for s in x.shape[2:]))
    ssim_map, _ = compute_ssim_and_cs(
        x.float(), y.float(), d, kernel_size=[win] * d, kernel_sigma=[1.5] * d, data_range=1.0
    )
    pool = torch.nn.functional.max_pool3d if d == 3 else torch.nn.functional.max_pool2d
    touched = pool(exclude.float(), kernel_size=win, stride=1) > 0  # same "valid" size as the SSIM map
    out = []
    for i in range(x.shape[0]):
        keep = ~touched[i, 0]
        out.append(float(ssim_map[i, 0][keep].mean()) if keep.any() else math.nan)
    return out


def _lesion_dice(pred: torch.Tensor, target: torch.Tensor, lesion: int) -> np.ndarray:
    res = dice_per_label(pred, target, [lesion])
    return np.asarray(res.dice[:, 0], dtype=np.float64)


def _found_in(pred: torch.Tensor, region: torch.Tensor, lesion: int, min_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item: lesion predicted inside ``region`` (more than ``min_voxels`` voxels), and the fraction of it.

    Args:
        pred: ``(N, 1, *S)`` predicted labels.
        region: ``(N, 1, *S)`` bool, the voxels to look in (a removed lesion's voxels).
        lesion: Lesion label.
        min_voxels: More predicted voxels than this inside the region count as found.

    Returns:
        ``(found, fraction)``: float arrays ``(N,)`` of 0/1 flags and of predicted / region voxels.
    """
    if pred.shape != region.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and region {tuple(region.shape)} differ")
    hit = ((pred == lesion) & region).flatten(1).sum(1).double()
    size = region.flatten(1).sum(1).double().clamp_min(1)
    return (hit > min_voxels).double().numpy(), (hit / size).numpy()


def _estimate(values: Any, patients: list[str], cfg: MedsynthConfig, seed: int) -> dict[str, Any]:
    n_boot = cfg.validation.n_bootstrap
    return bootstrap_mean(np.asarray(values, dtype=np.float64), patients, n_boot, seed=seed).to_json()


def evaluate_counterfactuals(
    cfg: MedsynthConfig,
    gen: MaskGenerator,
    test: ArraySet,
    segmenter: torch.nn.Module,
    lesion: int,
    out_dir: str | Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Edit test scans, measure the edits (see the module doc), write ``counterfactual.json`` and the figure.

    Args:
        cfg: Resolved config (``sampling`` with a numeric guidance scale).
        gen: The trained generator.
        test: The real TEST split.
        segmenter: The reference segmenter (trained on real training data).
        lesion: The lesion label.
        out_dir: Folder of the report and the figure.
        progress: Advanced once per edited scan.

    Returns:
        The report: ``summary`` (headline numbers, ``None`` = n/a), ``per_edit`` and ``items``.
    """
    cc, sampling = cfg.counterfactual, cfg.sampling
    progress = progress or NullProgress()
    steps = cc.steps or sampling.steps
    scale = cc.guidance_scale if cc.guidance_scale is not None else sampling.scale
    fill = cfg.preprocess.derived_label.index if cfg.preprocess.derived_label.enabled else None
    picked = select_cases(test.masks, lesion, cc.n_cases, cc.min_lesion_voxels)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    src_idx, edited_masks = [], []
    for spec in cc.edits:
        for i in picked:
            try:
                edited, _ = apply_lesion_edit(spec, test.masks[i].numpy().astype(np.uint8), lesion, fill)
            except ValueError as exc:
                skipped[spec] = skipped.get(spec, 0) + 1
                log.info("counterfactual %s skipped for %s: %s", spec, test.item_ids[i], exc)
                continue
            src_idx.append(i)
            edited_masks.append(edited)
            rows.append({"item_id": test.item_ids[i], "patient": test.patients[i], "edit": spec})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "n_scans": len(picked),
        "n_edits": len(rows),
        "skipped": skipped,
        "settings": {"steps": steps, "guidance_scale": scale, "dilate": cc.dilate, "region_noise": cc.region_noise},
        "targets": {"min_ssim_outside": cc.min_ssim_outside, "min_dice_ratio": cc.min_dice_ratio},
    }
    if not rows:
        report.update(summary={}, per_edit={}, items=[], na="no lesion-bearing test scan could be edited")
        write_json_atomic(out_dir / REPORT, report)
        return report
    idx = torch.as_tensor(src_idx)
    images, masks = test.images[idx].float(), test.masks[idx].to(torch.uint8)
    edited_t = torch.from_numpy(np.stack(edited_masks))
    bs = sampling.batch_size
    seeds = [
        int(np.random.default_rng([cc.seed, j, 23]).integers(2**31 - 1)) for j in range((len(rows) + bs - 1) // bs)
    ]
    res: CounterfactualOutput = batched(
        gen,
        images,
        masks,
        edited_t,
        bs,
        seeds,
        steps=steps,
        guidance_scale=scale,
        dilate=cc.dilate,
        region_noise=cc.region_noise,
    )
    progress.advance(len(rows), "counterfactual edits")
    plain_sampling = sampling.model_copy(update={"guidance_scale": scale})
    plain = torch.cat(
        [
            gen.generate(edited_t[s : s + bs], plain_sampling, seed=seeds[j])
            for j, s in enumerate(range(0, len(rows), bs))
        ]
    )
    seg_bs = cfg.experiment.predict_batch_size
    pred_cf = predict(segmenter, res.images, seg_bs)
    pred_plain = predict(segmenter, plain, seg_bs)
    ssim = masked_ssim(res.images, res.reconstructions, res.region)
    dice_cf = _lesion_dice(pred_cf, edited_t, lesion)
    dice_plain = _lesion_dice(pred_plain, edited_t, lesion)
    removed_region = masks == lesion  # (N, 1, *S), as the predictions
    found_cf, residual = _found_in(pred_cf, removed_region, lesion, cc.fp_min_voxels)
    found_plain, _ = _found_in(pred_plain, removed_region, lesion, cc.fp_min_voxels)
    found_real, _ = _found_in(predict(segmenter, images, seg_bs), removed_region, lesion, cc.fp_min_voxels)
    for k, row in enumerate(rows):
        name, _ = parse_counterfactual_edit(row["edit"], allow_mask=False)
        row.update(
            ssim_outside=_nan_none(ssim[k]),
            region_voxels=int(res.region[k].sum()),
            lesion_voxels=int((edited_t[k] == lesion).sum()),
        )
        if name == "remove":
            row.update(
                found_after_removal=bool(found_cf[k]),
                found_in_plain_synthesis=bool(found_plain[k]),
                found_in_real=bool(found_real[k]),
                residual_fraction=float(residual[k]),
            )
        else:
            row.update(dice_edit=_nan_none(dice_cf[k]), dice_plain=_nan_none(dice_plain[k]))
    report["items"] = rows
    found = {"removed": found_cf, "plain": found_plain, "real": found_real, "residual": residual}
    report["per_edit"], report["summary"] = _summaries(cfg, rows, ssim, dice_cf, dice_plain, found)
    report["figure"] = str(_figure(out_dir / FIGURE, images, edited_t, res, rows, cc.n_figure))
    write_json_atomic(out_dir / REPORT, report)
    return report


def _nan_none(v: float) -> float | None:
    return None if not math.isfinite(float(v)) else float(v)


def _summaries(
    cfg: MedsynthConfig,
    rows: list[dict[str, Any]],
    ssim: list[float],
    dice_cf: np.ndarray,
    dice_plain: np.ndarray,
    found: dict[str, np.ndarray],
) -> tuple[dict[str, Any], dict[str, float | None]]:
    cc = cfg.counterfactual
    pats = [r["patient"] for r in rows]
    kinds = [parse_counterfactual_edit(r["edit"], allow_mask=False)[0] for r in rows]
    n_boot, seed = cfg.validation.n_bootstrap, cc.seed
    per_edit: dict[str, Any] = {}
    for spec in dict.fromkeys(r["edit"] for r in rows):
        sel = [k for k, r in enumerate(rows) if r["edit"] == spec]
        p = [pats[k] for k in sel]
        entry: dict[str, Any] = {"n": len(sel), "ssim_outside": _estimate([ssim[k] for k in sel], p, cfg, seed)}
        if kinds[sel[0]] == "remove":
            entry["fp_rate_removed"] = _estimate(found["removed"][sel], p, cfg, seed)
            entry["fp_rate_plain"] = _estimate(found["plain"][sel], p, cfg, seed)
            entry["found_rate_real"] = _estimate(found["real"][sel], p, cfg, seed)
            entry["residual_removed"] = _estimate(found["residual"][sel], p, cfg, seed)
        else:
            entry["dice_edit"] = _estimate(dice_cf[sel], p, cfg, seed)
            entry["dice_plain"] = _estimate(dice_plain[sel], p, cfg, seed)
            entry["dice_ratio"] = bootstrap_ratio(dice_cf[sel], dice_plain[sel], p, n_boot, seed=seed).to_json()
        per_edit[spec] = entry
    placed = [k for k, kind in enumerate(kinds) if kind != "remove"]
    removed = [k for k, kind in enumerate(kinds) if kind == "remove"]
    ssim_all = bootstrap_mean(np.asarray(ssim), pats, n_boot, seed=seed)
    summary: dict[str, float | None] = {
        "ssim_outside": _nan_none(ssim_all.value),
        "ssim_outside_lo": _nan_none(ssim_all.lo),
        "ssim_outside_min": _nan_none(float(np.nanmin(ssim))) if np.isfinite(ssim).any() else None,
        "n_edits": float(len(rows)),
    }
    if placed:
        r = bootstrap_ratio(dice_cf[placed], dice_plain[placed], [pats[k] for k in placed], n_boot, seed=seed)
        summary.update(
            dice_ratio=_nan_none(r.value),
            dice_ratio_lo=_nan_none(r.lo),
            dice_edit=_nan_none(float(np.nanmean(dice_cf[placed]))) if np.isfinite(dice_cf[placed]).any() else None,
            dice_plain=_nan_none(float(np.nanmean(dice_plain[placed])))
            if np.isfinite(dice_plain[placed]).any()
            else None,
        )
    if removed:
        summary.update(
            fp_rate_removed=float(found["removed"][removed].mean()),
            fp_rate_plain=float(found["plain"][removed].mean()),
            found_rate_real=float(found["real"][removed].mean()),
            residual_removed=float(found["residual"][removed].mean()),
        )
    ssim_v, ratio_v = summary.get("ssim_outside"), summary.get("dice_ratio")
    summary["ssim_met"] = None if ssim_v is None else float(ssim_v >= cc.min_ssim_outside)
    summary["dice_met"] = None if ratio_v is None else float(ratio_v >= cc.min_dice_ratio)
    return per_edit, summary


def _figure(
    path: Path,
    images: torch.Tensor,
    edited: torch.Tensor,
    res: CounterfactualOutput,
    rows: list[dict[str, Any]],
    n: int,
) -> Path:
    from medsynth import viz

    order: list[int] = []
    for spec in dict.fromkeys(r["edit"] for r in rows):  # the first items of every edit, in turn
        order += [k for k, r in enumerate(rows) if r["edit"] == spec][
            : max(1, n // max(1, len(set(r["edit"] for r in rows))))
        ]
    order = order[: max(n, 1)]
    sub = CounterfactualOutput(
        *(getattr(res, f)[order] for f in ("images", "reconstructions", "region", "latent_region", "z0", "latents"))
    )
    panels = figure_rows(images[order], edited[order], sub, len(order))
    titles = [f"{rows[k]['item_id']} {rows[k]['edit']}" for k in order]
    return viz.save_grid(path, panels, titles=titles, col_titles=COLUMNS)
