"""Training and scoring ONE grid cell of the downstream experiment, per task.

* ``presence``: a MONAI classifier (:mod:`medsynth.evaluation.classifier`) predicts whether the
  target label (the lesion/tumour) is present in an image. Test metrics: AUROC, sensitivity at 90%
  specificity, balanced accuracy and F1 at 0.5 and at the Youden threshold chosen on the validation
  split. The per-case test scores are the predicted probabilities.
* ``segmentation``: the reference segmenter's UNet trained from scratch on the cell's data. When the
  label vocabulary names a lesion (or ``experiment.target_label`` is set), test metrics are the Dice
  of that label on the test items that hold it (``dice``) and the false-positive rate on the items
  that do not (``fp_rate``: more than ``validation.fp_min_voxels`` voxels predicted as the label);
  otherwise (e.g. hippocampus) ``dice`` is the mean Dice over the foreground labels each case holds.
  The per-case test scores are those Dice values (NaN on lesion-free items).

Both train until their validation score (AUROC / mean per-case Dice on the patient-level validation
split) stops improving and keep their best-on-validation weights
(:mod:`medsynth.evaluation.convergence`); the validation curve and the chosen step are part of the
cell's record (:class:`CellRecord`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict

from medsynth.config.experiment import Task
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet
from medsynth.errors import ConfigError
from medsynth.evaluation.classifier import (
    binary_metrics,
    classical_augment,
    predict_proba,
    sensitivity_at_specificity,
    train_classifier,
    youden_threshold,
)
from medsynth.evaluation.convergence import ConvergenceRecord, fit_until_converged, make_schedule
from medsynth.evaluation.metrics import dice_per_label, false_positive_flags
from medsynth.evaluation.selection import Cell, CellData
from medsynth.progress import Progress
from medsynth.tracking.base import NullTracker, Tracker
from medsynth.training.common import autocast, batch_indices, make_scaler, optimizer_step, seeded_global_rng

__all__ = [
    "CellRecord",
    "case_dice",
    "presence_labels",
    "resolve_target_label",
    "run_cell",
    "segmentation_scores",
    "segmentation_target",
    "train_cell_segmenter",
]


class CellRecord(BaseModel):
    """The result of one grid cell (one line of the grid's ledger; the summary is computed from these).

    Attributes:
        cell: Cell name (``<task>-<arm>-f<fraction>-r<ratio>-s<seed>``).
        task, arm, fraction, ratio, seed: The cell's coordinates.
        n_real, n_real_available, n_synthetic, n_real_patients, synthetic_with_replacement: Its data.
        metrics: Test metrics (None where undefined).
        test_scores: Per test item: presence probability, or segmentation Dice (None where undefined).
        convergence: Validation curve, chosen and stopping step.
        external_metrics: Metrics on the external test set, when one is configured.
        external_scores: Per external item scores.
        seconds: Wall time of the cell.
        worker: Where it ran (process id and thread name: shows the task runner's fan-out).
    """

    model_config = ConfigDict(frozen=True)

    cell: str
    task: Task
    arm: str
    fraction: float
    ratio: int
    seed: int
    n_real: int
    n_real_available: int
    n_synthetic: int
    n_real_patients: int
    synthetic_with_replacement: bool
    metrics: dict[str, float | None]
    test_scores: list[float | None]
    convergence: ConvergenceRecord
    external_metrics: dict[str, float | None] | None = None
    external_scores: list[float | None] | None = None
    seconds: float = 0.0
    worker: dict[str, str | int] = {}


def _clean(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


# --------------------------------------------------------------------------------------------------
# labels


def resolve_target_label(labels: dict[int, str], configured: int | None = None) -> int:
    """The presence task's label: ``configured`` (checked), else the highest label named like a
    lesion/tumour, else the highest foreground label.

    Raises:
        ConfigError: If the configured label is not a foreground label, or there is none.
    """
    from medsynth.synthesis.edits import LESION_NAME

    fg = {k: v for k, v in labels.items() if k != 0}
    if configured is not None:
        if configured not in fg:
            raise ConfigError("config", f"experiment.target_label {configured} is not a foreground label of {labels}")
        return configured
    if not fg:
        raise ConfigError("config", f"the label vocabulary {labels} has no foreground label to classify")
    named = [k for k, v in fg.items() if LESION_NAME.search(v)]
    return max(named) if named else max(fg)


def segmentation_target(labels: dict[int, str], configured: int | None = None) -> int | None:
    """The segmentation task's lesion label: ``configured``, else the highest label named like a lesion,
    else None (then the task scores the mean Dice over all foreground labels)."""
    from medsynth.synthesis.edits import LESION_NAME

    if configured is not None:
        return resolve_target_label(labels, configured)
    named = [k for k, v in labels.items() if k != 0 and LESION_NAME.search(v)]
    return max(named) if named else None


def presence_labels(
    masks: torch.Tensor | npt.NDArray[Any], target_label: int, min_voxels: int = 1
) -> npt.NDArray[np.int64]:
    """``(N,)`` 1 where a mask ``(N, 1, *S)`` holds at least ``min_voxels`` voxels of ``target_label``, else 0."""
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    counts = (m.reshape(m.shape[0], -1) == int(target_label)).sum(1)
    return (counts >= int(min_voxels)).numpy().astype(np.int64)


def case_dice(
    pred: torch.Tensor, target: torch.Tensor, labels: dict[int, str]
) -> tuple[npt.NDArray[np.float64], dict[str, float]]:
    """Per case: mean Dice over the foreground labels its target holds (NaN when it holds none); and
    per label: mean Dice over the cases holding it."""
    res = dice_per_label(pred, target, labels)
    present = res.target_present
    counts = present.sum(axis=1)
    sums = np.where(present, np.nan_to_num(res.dice, nan=0.0), 0.0).sum(axis=1)
    per_case = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float64)
    per_label = {f"dice_{labels.get(lab, str(lab))}": float(s["mean_dice"]) for lab, s in res.summary().items()}
    return per_case, per_label


def segmentation_scores(
    pred: torch.Tensor, target: torch.Tensor, labels: dict[int, str], lesion: int | None, fp_min_voxels: int = 0
) -> tuple[npt.NDArray[np.float64], dict[str, float | None]]:
    """Per-case scores and metrics of predicted label maps ``(N, 1, *S)`` against the targets.

    With a lesion label: per case the lesion Dice where the target holds the lesion (NaN elsewhere);
    metrics ``dice`` (their mean), ``fp_rate`` (lesion-free cases with more than ``fp_min_voxels``
    predicted lesion voxels) and the per-label Dice. Without: :func:`case_dice` (``fp_rate`` None).
    """
    per_case, per_label = case_dice(pred, target, labels)
    fp_rate: float | None = None
    if lesion is not None:
        res = dice_per_label(pred, target, {lesion: labels.get(lesion, str(lesion))})
        present = res.target_present[:, 0]
        per_case = np.where(present, np.nan_to_num(res.dice[:, 0], nan=0.0), np.nan).astype(np.float64)
        absent, fp = false_positive_flags(pred, target, lesion, fp_min_voxels)
        fp_rate = float(fp.sum() / absent.sum()) if absent.any() else None
    finite = per_case[np.isfinite(per_case)]
    metrics: dict[str, float | None] = {"dice": _clean(float(finite.mean())) if finite.size else None}
    metrics["fp_rate"] = fp_rate
    metrics.update({k: _clean(v) for k, v in per_label.items()})
    return per_case, metrics


# --------------------------------------------------------------------------------------------------
# segmentation training


def train_cell_segmenter(
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: MedsynthConfig,
    seed: int,
    augment: bool,
    labels: dict[int, str],
    device: torch.device | None = None,
    tracker: Tracker | None = None,
    val: ArraySet | None = None,
    progress: Progress | None = None,
) -> tuple[torch.nn.Module, ConvergenceRecord]:
    """Train the reference segmenter's UNet (``segmenter`` section) from scratch on one cell's data.

    A plain loop (AdamW, warm-up then the ``experiment.convergence`` schedule, clipping, DiceCE) with
    ``segmenter.train`` settings and at most ``experiment.segmenter_steps`` steps when set, until the
    mean per-case Dice on ``val`` stops improving (best weights kept). No augmentation except, with
    ``augment``, the classical MONAI set of :func:`medsynth.evaluation.classifier.classical_augment`
    (masks moved nearest-neighbour), so the arms differ only in their data. Inputs are zero-padded to
    a multiple of the UNet stride.

    Returns:
        A :class:`~medsynth.evaluation.segmenter.Segmenter` in eval mode and its convergence record.
    """
    from monai.losses import DiceCELoss

    from medsynth.evaluation.segmenter import Segmenter, build_segmenter, pad_to, predict, total_stride

    sc = cfg.segmenter
    ec = cfg.experiment
    oc = sc.train if ec.segmenter_steps is None else sc.train.model_copy(update={"steps": ec.segmenter_steps})
    dev = device or torch.device("cpu")
    tracker = tracker or NullTracker()
    num_classes = max(labels) + 1
    mult = total_stride(sc.strides)
    roi = tuple(int(math.ceil(s / mult) * mult) for s in images.shape[2:])
    x_all, y_all = pad_to(images.float(), roi), pad_to(masks.long(), roi)
    torch.manual_seed(int(np.random.default_rng([seed, 3]).integers(2**62)))
    net = build_segmenter(cfg, num_classes).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=oc.lr, weight_decay=oc.weight_decay)
    sched, on_eval = make_schedule(opt, oc.warmup_steps, oc.steps, ec.convergence)
    scaler = make_scaler(dev, oc.amp)  # fp16 (pre-Ampere GPU) needs loss scaling
    loss_fn = DiceCELoss(
        include_background=sc.include_background,
        to_onehot_y=True,
        softmax=True,
        lambda_dice=sc.dice_weight,
        lambda_ce=sc.ce_weight,
    )
    model = Segmenter(net, num_classes, roi, labels)
    lesion = segmentation_target(labels, ec.target_label)

    def train_step(step: int) -> float:
        idx = batch_indices(len(x_all), step, oc.batch_size, seed)
        x, y = x_all[idx], y_all[idx]
        if augment:
            x, y_aug = classical_augment(x, ec, seed, step, masks=y)
            y = y_aug if y_aug is not None else y
        x, y = x.to(dev), y.to(dev)
        with autocast(dev, oc.amp), seeded_global_rng(seed, step, 0, dev):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        optimizer_step(loss, net, opt, sched, oc.grad_clip, scaler=scaler)
        return float(loss.detach())

    evaluate = None
    if val is not None and len(val) > 0:

        def evaluate() -> float:
            pred = predict(model, val.images, sc.predict_batch_size)
            per_case, _ = segmentation_scores(pred, val.masks, labels, lesion)
            finite = per_case[np.isfinite(per_case)]
            return float(finite.mean()) if finite.size else float("nan")

    record = fit_until_converged(
        net, train_step, evaluate, oc.steps, ec.convergence, on_eval, tracker, "dice", progress
    )
    return model.eval(), record


# --------------------------------------------------------------------------------------------------
# one cell


def _presence(
    data: CellData,
    cfg: MedsynthConfig,
    augment: bool,
    seed: int,
    target: int,
    test: ArraySet,
    val: ArraySet | None,
    external: ArraySet | None,
    device: torch.device | None,
    tracker: Tracker,
) -> tuple[dict[str, Any], ConvergenceRecord]:
    ec = cfg.experiment
    y = presence_labels(data.masks, target, ec.min_target_voxels)
    y_val = presence_labels(val.masks, target, ec.min_target_voxels) if val is not None else None
    model, conv = train_classifier(
        data.images,
        y,
        ec,
        seed,
        augment=augment,
        device=device,
        tracker=tracker,
        val_images=val.images if val is not None else None,
        val_labels=y_val,
    )
    thr = None
    if val is not None and y_val is not None:
        thr = youden_threshold(y_val, predict_proba(model, val.images, ec.predict_batch_size))

    def score(split: ArraySet) -> tuple[dict[str, float | None], list[float | None]]:
        y_s = presence_labels(split.masks, target, ec.min_target_voxels)
        p = predict_proba(model, split.images, ec.predict_batch_size)
        m = binary_metrics(y_s, p, 0.5)
        metrics: dict[str, float | None] = {
            k: _clean(float(m[k])) for k in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity")
        }
        metrics["sens_at_spec90"] = _clean(sensitivity_at_specificity(y_s, p, 0.9))
        if thr is not None:
            my = binary_metrics(y_s, p, thr)
            metrics["balanced_accuracy_youden"] = _clean(float(my["balanced_accuracy"]))
            metrics["f1_youden"] = _clean(float(my["f1"]))
            metrics["threshold_youden"] = thr
        return metrics, [round(float(v), 6) for v in p]

    metrics, scores = score(test)
    out: dict[str, Any] = {"metrics": metrics, "test_scores": scores}
    if external is not None:
        out["external_metrics"], out["external_scores"] = score(external)
    return out, conv


def _segmentation(
    data: CellData,
    cfg: MedsynthConfig,
    augment: bool,
    seed: int,
    labels: dict[int, str],
    test: ArraySet,
    val: ArraySet | None,
    external: ArraySet | None,
    device: torch.device | None,
    tracker: Tracker,
) -> tuple[dict[str, Any], ConvergenceRecord]:
    from medsynth.evaluation.segmenter import predict

    model, conv = train_cell_segmenter(data.images, data.masks, cfg, seed, augment, labels, device, tracker, val=val)
    lesion = segmentation_target(labels, cfg.experiment.target_label)

    def score(split: ArraySet) -> tuple[dict[str, float | None], list[float | None]]:
        pred = predict(model, split.images, cfg.segmenter.predict_batch_size)
        per_case, metrics = segmentation_scores(pred, split.masks, labels, lesion, cfg.validation.fp_min_voxels)
        return metrics, [_clean(float(v)) for v in per_case]

    metrics, scores = score(test)
    out: dict[str, Any] = {"metrics": metrics, "test_scores": scores}
    if external is not None:
        out["external_metrics"], out["external_scores"] = score(external)
    return out, conv


def run_cell(
    cell: Cell,
    data: CellData,
    cfg: MedsynthConfig,
    labels: dict[int, str],
    test: ArraySet,
    val: ArraySet | None,
    device: torch.device | None = None,
    tracker: Tracker | None = None,
    external: ArraySet | None = None,
) -> CellRecord:
    """Train the cell's task network on ``data`` until it converges on ``val``; score it on ``test``
    (and ``external``).

    Args:
        cell: The cell (its task, arm, seed).
        data: Its training data (:func:`medsynth.evaluation.selection.select_cell`).
        cfg: Resolved config.
        labels: Label vocabulary.
        test: Test items (the fixed patient-level test split).
        val: Validation items (early stopping; presence: the Youden threshold), or None.
        device: Training device.
        tracker: The cell's tracked run (train loss, validation curve, chosen step).
        external: External test items, or None.

    Returns:
        The :class:`CellRecord` (``seconds`` left 0; the grid sets it).
    """
    tracker = tracker or NullTracker()
    augment = cell.arm == "real_classical"
    if cell.task == "presence":
        target = resolve_target_label(labels, cfg.experiment.target_label)
        out, conv = _presence(data, cfg, augment, cell.seed, target, test, val, external, device, tracker)
    else:
        out, conv = _segmentation(data, cfg, augment, cell.seed, labels, test, val, external, device, tracker)
    import os
    import threading

    worker: dict[str, str | int] = {"pid": os.getpid(), "thread": threading.current_thread().name}
    return CellRecord(cell=cell.name, **cell.params(), **data.info(), **out, convergence=conv, worker=worker)
