"""Per-label overlap and intensity metrics on integer label maps.

Conventions of :func:`dice_per_label` (per case and label ``l``, ``P`` = predicted voxels of ``l``,
``T`` = target voxels of ``l``):

* ``T`` non-empty: ``2|P∩T| / (|P| + |T|)`` — identical to ``monai.metrics.compute_dice``;
* ``T`` empty, ``P`` non-empty: 0 (a false positive; MONAI gives 0 with ``ignore_empty=False``);
* ``T`` and ``P`` both empty: **NaN**, flagged in ``both_empty`` — never the 0/0 of a naive formula
  and not MONAI's 1 either. Such cases say nothing about overlap; they are reported separately
  (count, and the false-positive rate of :func:`false_positive_rate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

LabelSpec = Mapping[int, str] | Sequence[int]
"""Labels to evaluate: a ``{index: name}`` vocabulary or a list of indices."""


def label_names(labels: LabelSpec, include_background: bool = False) -> dict[int, str]:
    """``{index: name}`` of the labels to evaluate (background 0 dropped unless asked for)."""
    out = (
        {int(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {int(k): str(k) for k in labels}
    )
    return {k: v for k, v in sorted(out.items()) if include_background or k != 0}


def _as_label_tensor(x: torch.Tensor | npt.NDArray[np.generic]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.is_floating_point():
        t = t.round()
    return t.detach().cpu().long().reshape(t.shape[0], -1)


@dataclass(frozen=True)
class DiceResult:
    """Per-case, per-label Dice with the empty cases made explicit.

    Attributes:
        labels: Label indices, one per column.
        dice: ``(N, L)`` Dice; NaN exactly where ``both_empty``.
        both_empty: ``(N, L)`` neither prediction nor target holds the label.
        target_present: ``(N, L)`` the target (conditioning mask) holds the label.
        pred_voxels: ``(N, L)`` predicted voxel counts of each label.
        target_voxels: ``(N, L)`` target voxel counts of each label.
    """

    labels: tuple[int, ...]
    dice: npt.NDArray[np.float64]
    both_empty: npt.NDArray[np.bool_]
    target_present: npt.NDArray[np.bool_]
    pred_voxels: npt.NDArray[np.int64]
    target_voxels: npt.NDArray[np.int64]

    def column(self, label: int) -> int:
        """Column index of ``label``."""
        return self.labels.index(int(label))

    def present(self, label: int) -> npt.NDArray[np.float64]:
        """Dice of the cases whose target holds ``label`` (the values a mean Dice averages)."""
        j = self.column(label)
        return np.asarray(self.dice[self.target_present[:, j], j], dtype=np.float64)

    def summary(self) -> dict[int, dict[str, float | int]]:
        """Per label: mean Dice over target-present cases, and the case counts of each kind."""
        out: dict[int, dict[str, float | int]] = {}
        for j, lab in enumerate(self.labels):
            vals = self.dice[self.target_present[:, j], j]
            out[lab] = {
                "mean_dice": float(np.mean(vals)) if vals.size else float("nan"),
                "n_target_present": int(self.target_present[:, j].sum()),
                "n_both_empty": int(self.both_empty[:, j].sum()),
                "n_false_positive_empty_target": int(
                    ((~self.target_present[:, j]) & (self.pred_voxels[:, j] > 0)).sum()
                ),
            }
        return out


def dice_per_label(
    pred: torch.Tensor | npt.NDArray[np.generic],
    target: torch.Tensor | npt.NDArray[np.generic],
    labels: LabelSpec,
    include_background: bool = False,
) -> DiceResult:
    """Dice of every case and label of two integer label maps (empty cases explicit; see module doc).

    Args:
        pred: ``(N, 1, *S)`` or ``(N, *S)`` predicted labels.
        target: Target labels of the same shape (the conditioning mask).
        labels: Labels to evaluate (background 0 is skipped unless ``include_background``).
        include_background: Evaluate label 0 too.

    Returns:
        A :class:`DiceResult`.
    """
    p, t = _as_label_tensor(pred), _as_label_tensor(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    labs = tuple(label_names(labels, include_background))
    n = p.shape[0]
    inter = np.zeros((n, len(labs)), dtype=np.int64)
    pv = np.zeros_like(inter)
    tv = np.zeros_like(inter)
    for j, lab in enumerate(labs):
        pm, tm = p == lab, t == lab
        inter[:, j] = (pm & tm).sum(1).numpy()
        pv[:, j] = pm.sum(1).numpy()
        tv[:, j] = tm.sum(1).numpy()
    denom = pv + tv
    both_empty = denom == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(both_empty, np.nan, 2.0 * inter / np.maximum(denom, 1)).astype(np.float64)
    return DiceResult(labs, dice, both_empty, tv > 0, pv, tv)


def _fp_flags(p: torch.Tensor, t: torch.Tensor, label: int, min_voxels: int) -> tuple[torch.Tensor, torch.Tensor]:
    absent = ~(t == label).any(1)
    return absent, absent & ((p == label).sum(1) > min_voxels)


def false_positive_flags(
    pred: torch.Tensor | npt.NDArray[np.generic],
    target: torch.Tensor | npt.NDArray[np.generic],
    label: int,
    min_voxels: int = 0,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """``(absent, fp)`` per case: the target lacks ``label``; it does and more than ``min_voxels`` are predicted."""
    absent, fp = _fp_flags(_as_label_tensor(pred), _as_label_tensor(target), int(label), min_voxels)
    return absent.numpy(), fp.numpy()


def false_positive_rate(
    pred: torch.Tensor | npt.NDArray[np.generic],
    target: torch.Tensor | npt.NDArray[np.generic],
    labels: LabelSpec,
    min_voxels: int = 0,
) -> dict[int, dict[str, float | int]]:
    """Per label, among cases whose target (conditioning mask) lacks it: how often it is predicted anyway.

    A case counts as a false positive when MORE than ``min_voxels`` voxels are predicted as the label.

    Returns:
        ``{label: {"rate": fraction (NaN without such cases), "n_cases": cases lacking the label,
        "n_false_positive": cases flagged}}``.
    """
    p, t = _as_label_tensor(pred), _as_label_tensor(target)
    out: dict[int, dict[str, float | int]] = {}
    for lab in label_names(labels):
        absent, fp = _fp_flags(p, t, lab, min_voxels)
        n_abs, n_fp = int(absent.sum()), int(fp.sum())
        out[lab] = {"rate": n_fp / n_abs if n_abs else float("nan"), "n_cases": n_abs, "n_false_positive": n_fp}
    return out


def per_label_wasserstein(
    real_images: torch.Tensor | npt.NDArray[np.generic],
    real_masks: torch.Tensor | npt.NDArray[np.generic],
    synth_images: torch.Tensor | npt.NDArray[np.generic],
    synth_masks: torch.Tensor | npt.NDArray[np.generic],
    labels: LabelSpec,
    bins: int | None = 256,
    include_background: bool = True,
) -> dict[int, dict[str, float | int | str]]:
    """1D Wasserstein distance between real and synthetic intensities inside each label.

    Uses ``scipy.stats.wasserstein_distance``. With ``bins`` the intensities of both sets are first
    histogrammed on shared bins over their joint range and the distance is computed between the
    weighted bin centres (fast for millions of voxels; error at most one bin width); ``bins=None``
    gives the exact distance between the raw samples.

    Args:
        real_images: ``(N, 1, *S)`` real intensities; ``real_masks`` their labels.
        synth_images: ``(M, 1, *S)`` synthetic intensities; ``synth_masks`` their conditioning masks.
        labels: Labels to compare.
        bins: Histogram bins, or None for the exact distance.
        include_background: Compare label 0 too (default: yes — the background intensity matters).

    Returns:
        ``{label: {"name", "wasserstein" (NaN when a set lacks the label), "n_real", "n_synth"}}``.
    """
    from scipy.stats import wasserstein_distance

    ri = np.asarray(real_images, dtype=np.float64).ravel()
    rm = np.asarray(real_masks).astype(np.int64).ravel()
    si = np.asarray(synth_images, dtype=np.float64).ravel()
    sm = np.asarray(synth_masks).astype(np.int64).ravel()
    if ri.shape != rm.shape or si.shape != sm.shape:
        raise ValueError("images and masks must have the same shape")
    out: dict[int, dict[str, float | int | str]] = {}
    for lab, name in label_names(labels, include_background).items():
        a, b = ri[rm == lab], si[sm == lab]
        if a.size == 0 or b.size == 0:
            w = float("nan")
        elif bins is None:
            w = float(wasserstein_distance(a, b))
        else:
            lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
            if hi <= lo:
                w = 0.0
            else:
                edges = np.linspace(lo, hi, bins + 1)
                centres = 0.5 * (edges[:-1] + edges[1:])
                ha, _ = np.histogram(a, edges)
                hb, _ = np.histogram(b, edges)
                w = float(wasserstein_distance(centres, centres, ha, hb))
        out[lab] = {"name": name, "wasserstein": w, "n_real": int(a.size), "n_synth": int(b.size)}
    return out


def label_contrast(
    images: torch.Tensor | npt.NDArray[np.generic],
    masks: torch.Tensor | npt.NDArray[np.generic],
    label: int,
    reference: Sequence[int] | None = None,
) -> npt.NDArray[np.float64]:
    """Per case: mean intensity inside ``label`` minus mean intensity of a reference region.

    A direct, segmenter-free measure of whether a structure is *visible* where the mask puts it:
    a FLAIR tumour is brighter than the brain around it, so its real contrast is positive, and a
    generator that ignores the tumour label gives about 0.

    Args:
        images: ``(N, 1, *S)`` intensities (any range; differences are in the same units).
        masks: ``(N, 1, *S)`` label maps.
        label: The structure.
        reference: Labels forming the reference region (e.g. the derived brain label); None: every
            foreground label other than ``label``.

    Returns:
        ``(N,)`` contrasts; NaN where the case lacks ``label`` or the reference region.
    """
    img = torch.as_tensor(np.asarray(images, dtype=np.float64)).reshape(len(images), -1)
    lab = _as_label_tensor(masks)
    if img.shape != lab.shape:
        raise ValueError(f"images {tuple(img.shape)} and masks {tuple(lab.shape)} differ in shape")
    inside = lab == int(label)
    if reference is None:
        ref = (lab > 0) & ~inside
    else:
        ref = torch.isin(lab, torch.as_tensor([int(r) for r in reference]))
        ref &= ~inside
    n_in, n_ref = inside.sum(1), ref.sum(1)
    mean_in = (img * inside).sum(1) / n_in.clamp(min=1)
    mean_ref = (img * ref).sum(1) / n_ref.clamp(min=1)
    out = (mean_in - mean_ref).numpy()
    out[(n_in == 0).numpy() | (n_ref == 0).numpy()] = np.nan
    return out.astype(np.float64)
