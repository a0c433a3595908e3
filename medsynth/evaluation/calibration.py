"""Guidance calibration: measure a classifier-free guidance sweep and choose the scale.

**Measurement** (:func:`sweep_guidance`, the one definition the guidance benchmark also uses). For each
guidance scale, one image is generated per selected mask (:func:`select_masks`: masks holding the
lesion, spread over the split, and lesion-free masks with a comparable reference area), with the
same seeds at every scale, and measured next to the real images of those masks:

* **contrast**: mean intensity inside the lesion minus the mean of the reference region
  (:func:`medsynth.evaluation.plausibility.contrast_report`); ``contrast_rel`` = synthetic / real;
  ``visible`` = fraction of lesion masks whose synthetic contrast has the real sign and half its size;
* **Dice** of the reference segmenter (trained on real data only) for the lesion against the
  conditioning mask, ``dice_rel`` = synthetic / real, and its **false-positive rate** on the masks
  lacking the lesion (:func:`medsynth.evaluation.plausibility.plausibility_report`, patient-bootstrap CIs);
* seconds per scale (and network evaluations when the generator counts them).

**Choice** (:func:`choose_guidance`): the SMALLEST scale whose lesion Dice ratio is at least
``min_dice_ratio`` (0.95) and whose contrast ratio lies in ``[contrast_low, contrast_high]``
([0.8, 1.25]). When no scale meets both, the best trade-off: the scale with the smallest total
shortfall ``max(0, min_dice_ratio - dice_rel) + max(0, ln(contrast_low / c), ln(c / contrast_high))``
(contrast is judged on a log scale: 2x too bright is as far off as 2x too dark), ties to the smaller
scale. The choice carries a one-line reason.

:func:`calibrate_guidance` runs both on the validation split with the ``sampling.calibration``
settings; the pipeline stage that wires it (and tracks the sweep with :func:`plot_sweep`) lives in
the orchestration layer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from medsynth.config.schema import MedsynthConfig
from medsynth.config.stages import GuidanceCalibrationConfig
from medsynth.data.dataset import ArraySet
from medsynth.errors import DataError
from medsynth.fileio import write_atomic

__all__ = [
    "GuidanceChoice",
    "calibrate_guidance",
    "choose_guidance",
    "plot_sweep",
    "select_masks",
    "sweep_guidance",
    "with_scale",
]


class GuidanceChoice(BaseModel):
    """The calibrated guidance scale and why.

    Attributes:
        scale: The chosen guidance scale.
        met: Whether it meets both criteria (else it is the best trade-off).
        reason: One line naming the criteria and the chosen scale's numbers.
        dice_ratio: Its lesion Dice ratio (synthetic / real).
        contrast_ratio: Its lesion contrast ratio (synthetic / real).
        fp: Its false-positive rate on lesion-free masks.
        rows: The sweep (one row per scale, plus the real-image row first when measured).
    """

    model_config = ConfigDict(frozen=True)

    scale: float
    met: bool
    reason: str
    dice_ratio: float | None = None
    contrast_ratio: float | None = None
    fp: float | None = None
    rows: list[dict[str, Any]] = []


def _num(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _shortfall(dice_rel: float | None, contrast_rel: float | None, min_dice: float, lo: float, hi: float) -> float:
    if dice_rel is None or contrast_rel is None or contrast_rel <= 0:
        return math.inf
    return max(0.0, min_dice - dice_rel) + max(0.0, math.log(lo / contrast_rel), math.log(contrast_rel / hi))


def choose_guidance(
    sweep_rows: Sequence[dict[str, Any]],
    min_dice_ratio: float = 0.95,
    contrast_range: tuple[float, float] = (0.8, 1.25),
) -> GuidanceChoice:
    """Choose the guidance scale from a sweep (see the module doc for the rule).

    Args:
        sweep_rows: Rows with ``guidance`` (rows with None, e.g. the real images, are skipped),
            ``dice_rel`` and ``contrast_rel``; ``fp`` optional.
        min_dice_ratio: Lesion Dice ratio a scale must reach.
        contrast_range: Accepted lesion contrast ratio ``(low, high)``.

    Returns:
        A :class:`GuidanceChoice`.

    Raises:
        ValueError: If no row has a guidance scale.
    """
    lo, hi = contrast_range
    rows = sorted((r for r in sweep_rows if r.get("guidance") is not None), key=lambda r: float(r["guidance"]))
    if not rows:
        raise ValueError("the guidance sweep has no row with a guidance scale")
    crit = f"lesion Dice ratio >= {min_dice_ratio:g} and contrast ratio in [{lo:g}, {hi:g}]"

    def pick(r: dict[str, Any], met: bool, why: str) -> GuidanceChoice:
        return GuidanceChoice(
            scale=float(r["guidance"]),
            met=met,
            reason=why,
            dice_ratio=_num(r.get("dice_rel")),
            contrast_ratio=_num(r.get("contrast_rel")),
            fp=_num(r.get("fp")),
            rows=[dict(x) for x in sweep_rows],
        )

    def desc(r: dict[str, Any]) -> str:
        d, c = _num(r.get("dice_rel")), _num(r.get("contrast_rel"))
        ds = "n/a" if d is None else f"{d:.2f}"
        cs = "n/a" if c is None else f"{c:.2f}"
        return f"Dice ratio {ds}, contrast ratio {cs}"

    for r in rows:
        d, c = _num(r.get("dice_rel")), _num(r.get("contrast_rel"))
        if d is not None and c is not None and d >= min_dice_ratio and lo <= c <= hi:
            return pick(r, True, f"guidance {float(r['guidance']):g}: the smallest scale with {crit} ({desc(r)})")
    scored = [
        (_shortfall(_num(r.get("dice_rel")), _num(r.get("contrast_rel")), min_dice_ratio, lo, hi), r) for r in rows
    ]
    best_score, best = min(scored, key=lambda t: (t[0], float(t[1]["guidance"])))
    if not math.isfinite(best_score):
        best = rows[0]
        return pick(
            best, False, f"guidance {float(best['guidance']):g}: no scale could be measured; the smallest is used"
        )
    return pick(
        best,
        False,
        f"guidance {float(best['guidance']):g}: no scale meets {crit}; best trade-off ({desc(best)}, "
        f"shortfall {best_score:.3f})",
    )


def select_masks(
    data: ArraySet, label: int, n_with: int, n_free: int, min_voxels: int, reference: Sequence[int] | None
) -> tuple[ArraySet, ArraySet]:
    """Split-spread subsets of ``data``: masks holding ``label`` and masks lacking it.

    Args:
        data: The split (validation for calibration, test for the benchmark).
        label: The structure.
        n_with: Masks with at least ``min_voxels`` of ``label`` (evenly spread over the split order).
        n_free: Masks without ``label`` whose reference area is at least half the median of the first set.
        min_voxels: Smallest structure counted.
        reference: Reference labels (None: any foreground).

    Returns:
        ``(with_label, without_label)``.

    Raises:
        DataError: If the split has no mask holding ``label``.
    """
    flat = data.masks.reshape(len(data), -1).long()
    count = (flat == label).sum(1)
    ref = torch.isin(flat, torch.tensor(reference)) if reference else (flat > 0) & (flat != label)
    ref_area = ref.sum(1)

    def spread(idx: torch.Tensor, n: int) -> list[int]:
        if len(idx) <= n:
            return [int(i) for i in idx]
        pick = torch.linspace(0, len(idx) - 1, n).round().long()
        return [int(i) for i in idx[pick]]

    with_idx = spread(torch.nonzero(count >= max(min_voxels, 1)).flatten(), n_with)
    if not with_idx:
        raise DataError("guidance sweep", f"no mask of the split holds label {label} with >= {min_voxels} voxels")
    floor = 0.5 * float(ref_area[with_idx].float().median())
    free_idx = spread(torch.nonzero((count == 0) & (ref_area >= floor)).flatten(), n_free)
    return data.subset(with_idx), data.subset(free_idx)


def with_scale(cfg: MedsynthConfig, scale: float, steps: int | None = None) -> MedsynthConfig:
    """``cfg`` with ``sampling.guidance_scale`` pinned to ``scale`` (and optionally other sampling steps)."""
    s = cfg.sampling.model_copy(update={"guidance_scale": float(scale), **({"steps": steps} if steps else {})})
    return cfg.model_copy(update={"sampling": s})


def _concat(a: ArraySet, b: ArraySet) -> ArraySet:
    return dataclasses.replace(
        a,
        images=torch.cat([a.images, b.images]),
        masks=torch.cat([a.masks, b.masks]),
        affines=np.concatenate([a.affines, b.affines]),
        item_ids=a.item_ids + b.item_ids,
        patients=a.patients + b.patients,
    )


def sweep_guidance(
    gen: Any,
    seg: torch.nn.Module,
    data: ArraySet,
    cfg: MedsynthConfig,
    scales: Sequence[float],
    label: int,
    reference: Sequence[int] | None,
    seed: int = 0,
    n_boot: int = 200,
    wrap: Callable[[Any], Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[float, torch.Tensor]]:
    """Generate an image per mask of ``data`` at each guidance scale and measure it (see the module doc).

    Args:
        gen: The trained generator (:class:`~medsynth.generator.MaskGenerator`).
        seg: The reference segmenter.
        data: Masks (with and without the structure) and their real images.
        cfg: Config (sampler, steps, batch size).
        scales: Guidance scales; 1.0 (no guidance) is the cost baseline when present.
        label: The structure.
        reference: Reference labels of the contrast.
        seed: Base seed (batch ``i`` uses ``seed + i`` at every scale).
        n_boot: Bootstrap resamples of the Dice / false-positive intervals.
        wrap: Optional ``wrap(gen)`` used for each scale's generation (e.g. a generator that counts
            network evaluations); when the result has ``calls``, the row gets ``nfe`` per image.

    Returns:
        ``(rows, images)``: the first row is the real images (``guidance`` None), then one per scale
        with ``guidance``, ``seconds``, ``cost_ratio``, ``contrast``, ``contrast_rel``, ``visible``,
        ``dice`` (+ ``dice_lo``/``dice_hi``), ``dice_rel``, ``fp`` (+ CI) and, when counted, ``nfe``;
        ``images`` maps each scale to its ``(N, 1, *S)`` images.
    """
    from medsynth.evaluation.plausibility import contrast_report, plausibility_report
    from medsynth.evaluation.segmenter import predict
    from medsynth.evaluation.validate import generate_for

    bs = cfg.sampling.batch_size
    name = data.labels.get(label, str(label))
    pred_real = predict(seg, data.images, bs)
    real: dict[str, Any] = {}
    device = getattr(gen, "device", None)

    def sync() -> None:
        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(images: torch.Tensor) -> dict[str, Any]:
        rep = plausibility_report(
            pred_real, predict(seg, images, bs), data.masks, data.patients, data.item_ids, {label: name}, n_boot
        )["per_label"][name]
        con = contrast_report(data.images, images, data.masks, data.patients, {label: name}, reference, n_boot)[name]
        real.update(contrast=con["contrast_real"]["value"], dice=rep["dice_real"]["value"], fp=rep["fp_real"]["value"])
        return {
            "contrast": con["contrast_synth"]["value"],
            "contrast_rel": con["ratio"]["value"],
            "visible": con["visible"]["value"],
            "dice": rep["dice_synth"]["value"],
            "dice_lo": rep["dice_synth"]["lo"],
            "dice_hi": rep["dice_synth"]["hi"],
            "dice_rel": rep["ratio"]["value"],
            "fp": rep["fp_synth"]["value"],
            "fp_lo": rep["fp_synth"]["lo"],
            "fp_hi": rep["fp_synth"]["hi"],
        }

    rows: list[dict[str, Any]] = []
    images: dict[float, torch.Tensor] = {}
    generate_for(gen, data.masks[:1], with_scale(cfg, 1.0, steps=2), seed=seed)  # warm-up, untimed
    for g in scales:
        counted = wrap(gen) if wrap is not None else gen
        sync()
        t0 = time.perf_counter()
        synth = generate_for(counted, data.masks, with_scale(cfg, g), seed=seed)
        sync()
        seconds = time.perf_counter() - t0
        images[g] = synth
        row: dict[str, Any] = {"row": f"guidance {g:g}", "guidance": g, "seconds": seconds}
        calls = getattr(counted, "calls", None)
        if calls is not None:
            row["nfe"] = calls / -(-len(data) // bs)
        rows.append({**row, **measure(synth)})
    rows.insert(0, {"row": "real images", "guidance": None, "contrast_rel": 1.0, **real})
    base = next((r for r in rows if r["guidance"] == 1.0), None)
    for r in rows[1:]:
        r["cost_ratio"] = r["seconds"] / base["seconds"] if base and base["seconds"] > 0 else None
    return rows, images


def calibrate_guidance(
    cfg: MedsynthConfig,
    gen: Any,
    val_split: ArraySet,
    segmenter: torch.nn.Module,
    scales: Sequence[float] | None = None,
    calibration: GuidanceCalibrationConfig | None = None,
) -> GuidanceChoice:
    """Sweep guidance scales on the VALIDATION split and choose one (:func:`choose_guidance`).

    Args:
        cfg: Resolved config (sampler settings; the lesion label and contrast reference).
        gen: The trained generator.
        val_split: The patient-level validation split (never the test split: the choice is tuned here).
        segmenter: The reference segmenter (trained on real training data only).
        scales: Scales to sweep (default ``sampling.calibration.scales``).
        calibration: Settings (default ``cfg.sampling.calibration``).

    Returns:
        The :class:`GuidanceChoice` (its ``rows`` hold the sweep, real-image row first).

    Raises:
        DataError: If the validation split holds no lesion mask large enough.
    """
    from medsynth.evaluation.validate import contrast_reference, lesion_label

    cal = calibration or cfg.sampling.calibration
    label = lesion_label(cfg)
    reference = contrast_reference(cfg)
    held, free = select_masks(val_split, label, cal.n_with, cal.n_free, cal.min_voxels, reference)
    data = _concat(held, free) if len(free) else held
    rows, _ = sweep_guidance(
        gen, segmenter, data, cfg, list(scales or cal.scales), label, reference, cal.seed, cal.n_bootstrap
    )
    return choose_guidance(rows, cal.min_dice_ratio, (cal.contrast_low, cal.contrast_high))


def plot_sweep(path: str | Path, choice: GuidanceChoice, calibration: GuidanceCalibrationConfig) -> Path:
    """Lesion Dice ratio and contrast ratio vs guidance scale, the accepted band and the chosen scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in choice.rows if r.get("guidance") is not None]
    g = np.array([float(r["guidance"]) for r in rows])
    dice = np.array([_num(r.get("dice_rel")) or np.nan for r in rows], dtype=float)
    con = np.array([_num(r.get("contrast_rel")) or np.nan for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(g, dice, "o-", label="lesion Dice ratio (synthetic / real)")
    ax.plot(g, con, "s--", label="lesion contrast ratio (synthetic / real)")
    ax.axhspan(
        calibration.contrast_low, calibration.contrast_high, color="tab:orange", alpha=0.12, label="contrast band"
    )
    ax.axhline(calibration.min_dice_ratio, color="tab:blue", lw=0.8, ls=":", label="Dice ratio floor")
    ax.axvline(choice.scale, color="k", lw=1.0, label=f"chosen {choice.scale:g}")
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("ratio")
    ax.set_title(choice.reason[:90], fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = write_atomic(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return out
