"""Anatomical plausibility: the real-trained segmenter's Dice on synthetic images vs on the real ones.

For every conditioning mask ``m_i`` there is the real image it came from and one synthetic image
generated from it. A segmenter trained on real data only segments both; per label we report

* Dice(segmentation of the real image, ``m_i``) — the segmenter's own ceiling on real data;
* Dice(segmentation of the synthetic image, ``m_i``) — how well the synthetic image shows the label
  where the mask put it;
* their ratio (synthetic / real, ratio of means over the same cases) and the paired difference;
* the false-positive rate on cases whose mask lacks the label (does the generator draw a tumour
  where none was asked for, or the segmenter hallucinate one on real images?).

:func:`contrast_report` adds a segmenter-free view: is the label *visible* where the mask says
(mean intensity inside it minus that of a reference region, on real and synthetic images)?

Mean Dice averages the cases whose mask holds the label; cases where neither mask nor prediction
holds it have no Dice (NaN, counted in ``n_both_empty_*``) and speak through the false-positive rate.
Intervals resample patients (:mod:`medsynth.evaluation.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medsynth.evaluation.metrics import (
    LabelSpec,
    dice_per_label,
    false_positive_flags,
    label_contrast,
    label_names,
)
from medsynth.evaluation.stats import bootstrap_mean, bootstrap_ratio, paired_comparison
from medsynth.viz import overlay_rgb, representative_slice, save_grid, to_2d

Array = torch.Tensor | npt.NDArray[np.generic]


def _f(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def plausibility_report(
    pred_real: Array,
    pred_synth: Array,
    masks: Array,
    patients: Sequence[str],
    item_ids: Sequence[str],
    labels: LabelSpec,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    fp_min_voxels: int = 0,
) -> dict[str, Any]:
    """Per-label plausibility statistics and the per-case table.

    Args:
        pred_real: ``(N, 1, *S)`` segmentation of the real images.
        pred_synth: ``(N, 1, *S)`` segmentation of the synthetic images (item ``i`` generated from ``masks[i]``).
        masks: ``(N, 1, *S)`` conditioning masks (the real images' ground truth).
        patients: Patient of each item (the bootstrap resamples patients).
        item_ids: Id of each item.
        labels: Labels to report (background skipped).
        n_boot: Bootstrap resamples.
        seed: Seed of the bootstrap and the paired test.
        ci: Confidence level.
        fp_min_voxels: A mask lacking a label is a false positive when more voxels than this are predicted.

    Returns:
        ``{"per_label": {name: {...}}, "rows": [...], "n_cases", "n_patients", "definitions"}``; each
        per-label entry holds ``dice_real``, ``dice_synth``, ``ratio`` (Estimate JSON: value, lo, hi,
        ...), ``difference`` (synthetic − real, with a Wilcoxon p-value on patient means),
        ``fp_real``/``fp_synth`` (rate Estimate + counts), ``n_cases_present`` and ``n_both_empty_*``.
        Rows: ``index, item_id, patient, label, name, label_in_mask, dice_real, dice_synth, fp_real,
        fp_synth`` (Dice None where undefined).
    """
    n = len(item_ids)
    if len(patients) != n:
        raise ValueError(f"{len(patients)} patients for {n} items")
    names = label_names(labels)
    real = dice_per_label(pred_real, masks, names)
    synth = dice_per_label(pred_synth, masks, names)
    if real.dice.shape[0] != n or synth.dice.shape[0] != n:
        raise ValueError(f"predictions hold {real.dice.shape[0]}/{synth.dice.shape[0]} cases for {n} items")
    per_label: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for j, (lab, name) in enumerate(names.items()):
        present = real.target_present[:, j]
        dr = np.where(present, real.dice[:, j], np.nan)
        ds = np.where(present, synth.dice[:, j], np.nan)
        absent, fp_r = false_positive_flags(pred_real, masks, lab, fp_min_voxels)
        _, fp_s = false_positive_flags(pred_synth, masks, lab, fp_min_voxels)
        fp_rate_r = bootstrap_mean(np.where(absent, fp_r, np.nan), patients, n_boot, ci, seed)
        fp_rate_s = bootstrap_mean(np.where(absent, fp_s, np.nan), patients, n_boot, ci, seed)
        per_label[name] = {
            "label": lab,
            "n_cases_present": int(present.sum()),
            "n_cases_absent": int(absent.sum()),
            "n_both_empty_real": int(real.both_empty[:, j].sum()),
            "n_both_empty_synth": int(synth.both_empty[:, j].sum()),
            "dice_real": bootstrap_mean(dr, patients, n_boot, ci, seed).to_json(),
            "dice_synth": bootstrap_mean(ds, patients, n_boot, ci, seed).to_json(),
            "ratio": bootstrap_ratio(ds, dr, patients, n_boot, ci, seed).to_json(),
            "difference": paired_comparison(ds, dr, patients, n_boot, ci, seed),
            "fp_real": {**fp_rate_r.to_json(), "n_false_positive": int(fp_r.sum())},
            "fp_synth": {**fp_rate_s.to_json(), "n_false_positive": int(fp_s.sum())},
        }
        for i in range(n):
            rows.append(
                {
                    "index": i,
                    "item_id": str(item_ids[i]),
                    "patient": str(patients[i]),
                    "label": lab,
                    "name": name,
                    "label_in_mask": bool(present[i]),
                    "dice_real": _f(float(real.dice[i, j])),
                    "dice_synth": _f(float(synth.dice[i, j])),
                    "fp_real": bool(fp_r[i]),
                    "fp_synth": bool(fp_s[i]),
                }
            )
    return {
        "per_label": per_label,
        "rows": rows,
        "n_cases": n,
        "n_patients": len(set(patients)),
        "definitions": {
            "dice": "mean over cases whose conditioning mask holds the label; 95% CI by resampling patients "
            "(mean over all cases of the resampled patients)",
            "ratio": "mean synthetic Dice / mean real Dice over the same cases and resampled patients",
            "difference": "synthetic - real Dice; p-value: Wilcoxon signed-rank on per-patient means",
            "fp": f"fraction of cases whose mask lacks the label where more than {fp_min_voxels} voxels of it "
            "are predicted",
            "both_empty": "cases where neither mask nor prediction holds the label: no Dice (NaN), counted only",
        },
    }


def contrast_report(
    images_real: Array,
    images_synth: Array,
    masks: Array,
    patients: Sequence[str],
    labels: LabelSpec,
    reference: Sequence[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Per label: is it visible where the mask puts it? Contrast on real vs synthetic images.

    Contrast of a case = mean intensity inside the label minus the mean of the reference region
    (:func:`medsynth.evaluation.metrics.label_contrast`), on the real image and on the synthetic image
    generated from the same mask. A generator that ignores the label gives about 0 whatever the real
    contrast; one that draws it gives about the real value.

    Args:
        images_real: ``(N, 1, *S)`` real images; ``images_synth`` the synthetic image of each mask.
        images_synth: ``(N, 1, *S)``.
        masks: ``(N, 1, *S)`` conditioning masks.
        patients: Patient of each case (the bootstrap resamples patients).
        labels: Labels to report (background and the reference labels skipped).
        reference: Labels of the reference region (e.g. a derived brain label); None: all other foreground.
        n_boot: Bootstrap resamples.
        seed: Seed of the bootstrap.
        ci: Confidence level.

    Returns:
        ``{name: {"label", "reference", "n_cases", "contrast_real", "contrast_synth", "ratio", "visible"}}``:
        Estimate JSONs of the mean contrasts over cases holding the label, their ratio (synthetic /
        real) and ``visible``, the fraction of cases whose synthetic contrast has the real one's sign
        and at least half its size. Labels without cases are left out.
    """
    ref = None if reference is None else [int(r) for r in reference]
    out: dict[str, Any] = {}
    for lab, name in label_names(labels).items():
        if ref is not None and lab in ref:
            continue
        cr = label_contrast(images_real, masks, lab, ref)
        cs = label_contrast(images_synth, masks, lab, ref)
        ok = ~np.isnan(cr)
        if not ok.any():
            continue
        visible = np.where(ok, (np.sign(cs) == np.sign(cr)) & (np.abs(cs) >= 0.5 * np.abs(cr)), np.nan)
        out[name] = {
            "label": lab,
            "reference": ref if ref is not None else "other foreground",
            "n_cases": int(ok.sum()),
            "contrast_real": bootstrap_mean(cr, patients, n_boot, ci, seed).to_json(),
            "contrast_synth": bootstrap_mean(cs, patients, n_boot, ci, seed).to_json(),
            "ratio": bootstrap_ratio(cs, cr, patients, n_boot, ci, seed).to_json(),
            "visible": bootstrap_mean(visible.astype(np.float64), patients, n_boot, ci, seed).to_json(),
        }
    return out


def worst_rows(rows: Sequence[dict[str, Any]], n: int, label: int | None = None) -> list[dict[str, Any]]:
    """The ``n`` rows with the lowest synthetic Dice among cases whose mask holds the label (ties: by index)."""
    ok = [
        r for r in rows if r["label_in_mask"] and r["dice_synth"] is not None and (label is None or r["label"] == label)
    ]
    return sorted(ok, key=lambda r: (r["dice_synth"], r["index"], r["label"]))[: max(n, 0)]


def _panel(a: Array, i: int) -> npt.NDArray[np.generic]:
    return np.asarray(a[i, 0].detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)[i, 0])


def worst_cases_figure(
    path: str | Path,
    images_real: Array,
    images_synth: Array,
    masks: Array,
    pred_real: Array,
    pred_synth: Array,
    rows: Sequence[dict[str, Any]],
    n: int = 5,
    label: int | None = None,
) -> Path:
    """PNG of the ``n`` worst synthetic cases (lowest synthetic Dice), one row each.

    Columns: real image + mask, real image + its segmentation, synthetic image + mask, synthetic image
    + its segmentation. 3D items show the slice (last axis) with the most voxels of the row's label.

    Args:
        path: Output PNG.
        images_real, images_synth, masks, pred_real, pred_synth: ``(N, 1, *S)`` arrays, item-aligned.
        rows: The ``rows`` of :func:`plausibility_report`.
        n: Number of cases drawn.
        label: Only rows of this label (default: all labels).

    Returns:
        ``path``.
    """
    grid: list[list[npt.NDArray[np.generic]]] = []
    titles: list[str] = []
    for r in worst_rows(rows, n, label):
        i, lab = int(r["index"]), int(r["label"])
        ir, isy, m = _panel(images_real, i), _panel(images_synth, i), _panel(masks, i)
        pr, ps = _panel(pred_real, i), _panel(pred_synth, i)
        k = representative_slice(ir, np.asarray(m) == lab) if ir.ndim == 3 else None
        grid.append(
            [
                overlay_rgb(to_2d(ir, k), to_2d(m, k)),
                overlay_rgb(to_2d(ir, k), to_2d(pr, k)),
                overlay_rgb(to_2d(isy, k), to_2d(m, k)),
                overlay_rgb(to_2d(isy, k), to_2d(ps, k)),
            ]
        )
        dr = "n/a" if r["dice_real"] is None else f"{r['dice_real']:.2f}"
        titles.append(f"{r['item_id']} {r['name']}\nsynth {r['dice_synth']:.2f} / real {dr}")
    return save_grid(
        path,
        grid,
        titles=titles,
        col_titles=["real + mask", "real + segmentation", "synthetic + mask", "synthetic + segmentation"],
    )
