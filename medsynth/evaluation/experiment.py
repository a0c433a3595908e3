"""The downstream augmentation experiment: a grid of task networks trained on real, real + synthetic,
classically augmented and synthetic-only data, evaluated on the fixed patient-level test split.

**Synthetic pool** (:func:`make_pool`). Every TRAINING mask gets ``experiment.pool_per_mask``
synthetic variants, generated once: variant ``k`` conditions on the mask edited by
``pool_edits[k % len]`` (``none``, ``flip``, ``elastic`` or a chain; the edit's random draws from
``(sampling seed, item index, k)``), and the images of a batch of masks are drawn with a seed derived
from ``(sampling seed, k, index of the batch's first item)``, so a pool is reproducible given the
generator, the sampler settings (batch size included) and the masks. Each pool item keeps its
SOURCE item and SOURCE PATIENT; the conditioning (possibly edited) mask is the synthetic item's
label map. The pool is stored as ``pool.npz`` (images as float16, masks uint8, provenance, key),
written atomically and reused when its key (generator weight hashes, sampler settings, masks,
variants, edits) matches.

**Cells** (:func:`select_cell`). For seed ``s`` the training patients are put in a seeded random
order; fraction ``f`` takes the first ``max(1, ceil(f * n_patients))`` of them, so for one seed the
subsets are nested across fractions. Every item of those patients is real data of the cell
(``n_real`` items). Synthetic items are drawn ONLY from pool items whose source patient is in that
subset (no information from other patients, and none from the test split, can enter): candidates are
ordered by variant, then by a seeded permutation, and the first ``ratio * n_real`` are taken — with a
full pool (``pool_per_mask >= ratio``) that is exactly variants ``0..ratio-1`` of every real mask, and
the synthetic sets are nested across ratios. A cell that needs more than its candidates repeats
them (sampling with replacement, recorded as ``synthetic_with_replacement``). Arms:

* ``real``: the real subset, plus ``ratio * n_real`` synthetic items when ``ratio > 0``;
* ``real_classical``: the real subset with classical MONAI augmentation, ratio 0 only;
* ``synthetic_only``: ``ratio * n_real`` synthetic items of the subset's masks and no real item, for
  ratios >= 1 only (ratio 0 would be an empty training set; ratio 1 is the 1:1 replacement of the
  real data by synthetic data).

**Grid** (:func:`run_grid`). Every ``(arm, fraction, ratio, seed)`` cell trains a network from scratch
(presence classifier: :mod:`medsynth.evaluation.classifier`; segmentation: the reference segmenter's
UNet) and is scored on the test split. Before training, :func:`check_no_leak` raises if a patient of
the cell's training data (real items or the source patients of its synthetic items) is in the test
(or validation) split. Finished cells are appended to ``cells.jsonl`` (with the test predictions) and
skipped when the grid is run again with the same inputs.

**Statistics** (:func:`summarise`). Per ``(arm, fraction, ratio)``: mean ± sd over seeds of each
metric, and a ``ci`` percentile bootstrap interval over TEST PATIENTS (the units a new test set
would resample; three seeds are too few for an interval over seeds) of the **seed-mean metric**:
each replicate resamples patients with replacement (all of a patient's items, multiplicity as case
weights), recomputes every seed's metric on the resample and averages over seeds. For AUROC this is
the weighted Mann-Whitney AUROC per seed; for Dice the per-case Dice (mean over the foreground labels
the case holds) averaged over seeds, with :func:`medsynth.evaluation.stats.bootstrap_mean`. The
paired comparison with the real-only ratio-0 cell of the same fraction uses the same seeds and the
same resampled patients for both: the difference of the seed means, its bootstrap interval, and a
p-value — for AUROC the two-sided bootstrap p-value ``min(1, 2 * min(P*(Δ <= 0), P*(Δ >= 0)))`` (with
the +1 correction), consistent with the interval; for Dice the Wilcoxon signed-rank test on
per-patient mean differences (:func:`medsynth.evaluation.stats.paired_comparison`). Balanced accuracy
and F1 are reported at threshold 0.5 and, when a validation split with both classes is given, at
each cell's Youden threshold chosen on that validation split (``*_youden``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch

from medsynth.config.experiment import Arm
from medsynth.config.schema import MedsynthConfig
from medsynth.config.stages import SamplingConfig
from medsynth.data.dataset import ArraySet
from medsynth.errors import ConfigError, DataError, MedsynthError
from medsynth.evaluation.classifier import (
    binary_metrics,
    classical_augment,
    predict_proba,
    train_classifier,
    weighted_auroc,
    youden_threshold,
)
from medsynth.evaluation.metrics import dice_per_label
from medsynth.evaluation.stats import bootstrap_mean, format_value, mean_sd, paired_comparison
from medsynth.fileio import sha256_json, write_atomic, write_text_atomic
from medsynth.progress import NullProgress, Progress
from medsynth.tracking.base import NullTracker, Tracker
from medsynth.training.common import (
    autocast,
    batch_indices,
    make_optimizer,
    optimizer_step,
    seeded_global_rng,
    set_threads,
)

log = logging.getLogger(__name__)

__all__ = [
    "CELLS_FILE",
    "POOL_FILE",
    "Cell",
    "CellData",
    "GridResult",
    "PatientLeakError",
    "PoolGenerator",
    "SyntheticPool",
    "check_no_leak",
    "grid_cells",
    "make_pool",
    "presence_labels",
    "resolve_target_label",
    "resolve_task",
    "run_grid",
    "select_cell",
    "select_patients",
    "summarise",
    "train_cell_segmenter",
]

POOL_FILE = "pool.npz"
CELLS_FILE = "cells.jsonl"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
Task = Literal["presence", "segmentation"]
TrackerFactory = Callable[[str, dict[str, Any]], contextlib.AbstractContextManager[Tracker]]
"""``tracker_factory(cell_name, params)``: a context manager yielding the tracker of one cell's run."""


class PatientLeakError(MedsynthError, ValueError):
    """A patient of a cell's training data (real or a synthetic item's source) is in the evaluation split."""


class PoolGenerator(Protocol):
    """What :func:`make_pool` needs of a generator (a :class:`~medsynth.synthesis.generator.MaskGenerator`)."""

    hashes: dict[str, str]

    def generate(self, masks: torch.Tensor | None, sampling: SamplingConfig, seed: int) -> torch.Tensor:
        """Images ``(B, 1, *S)`` in ``[0, 1]`` for masks ``(B, 1, *S)``."""
        ...


# --------------------------------------------------------------------------------------------------
# task and labels


def resolve_task(cfg: MedsynthConfig) -> Task:
    """``experiment.task``, with 'auto' = presence for 2D data and segmentation for 3D."""
    task = cfg.experiment.task
    if task == "auto":
        return "presence" if cfg.preprocess.spatial_dims == 2 else "segmentation"
    return task


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


def presence_labels(
    masks: torch.Tensor | npt.NDArray[Any], target_label: int, min_voxels: int = 1
) -> npt.NDArray[np.int64]:
    """``(N,)`` 1 where a mask ``(N, 1, *S)`` holds at least ``min_voxels`` voxels of ``target_label``, else 0."""
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    counts = (m.reshape(m.shape[0], -1) == int(target_label)).sum(1)
    return (counts >= int(min_voxels)).numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------------
# synthetic pool


@dataclass(frozen=True)
class SyntheticPool:
    """Synthetic images generated from the training masks, with their provenance.

    Attributes:
        images: ``(M, 1, *S)`` float16 images in ``[0, 1]`` (converted to float32 when selected).
        masks: ``(M, 1, *S)`` uint8 conditioning masks (possibly edited) = the items' labels.
        source_items: Item id of the training mask each item was generated from.
        source_patients: Patient of that training mask.
        variants: Variant index ``k`` of each item (``0 .. pool_per_mask - 1``).
        edits: The mask edit of each item ('none', 'flip', ...).
        key: Input key (generator hashes, sampler, masks, variants, edits); "" for hand-made pools.
        path: The ``.npz`` file, when stored.
    """

    images: torch.Tensor
    masks: torch.Tensor
    source_items: list[str]
    source_patients: list[str]
    variants: list[int]
    edits: list[str]
    key: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        n = int(self.images.shape[0])
        sizes = {int(self.masks.shape[0]), len(self.source_items), len(self.source_patients), len(self.variants)}
        if sizes | {len(self.edits)} != {n}:
            raise ValueError("pool images, masks, source items/patients, variants and edits differ in length")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @staticmethod
    def empty(spatial: Sequence[int]) -> SyntheticPool:
        """A pool with no item (grids without synthetic cells)."""
        shape = (0, 1, *[int(s) for s in spatial])
        return SyntheticPool(
            torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.uint8), [], [], [], []
        )

    def save(self, path: str | Path) -> Path:
        """Write the pool as an ``.npz`` atomically."""
        arrays = {
            "images": self.images.to(torch.float16).numpy(),
            "masks": self.masks.to(torch.uint8).numpy(),
            "source_items": np.asarray(self.source_items, dtype=str),
            "source_patients": np.asarray(self.source_patients, dtype=str),
            "variants": np.asarray(self.variants, dtype=np.int64),
            "edits": np.asarray(self.edits, dtype=str),
            "key": np.asarray(self.key),
        }
        return write_atomic(path, lambda p: np.savez_compressed(p, **arrays))  # type: ignore[arg-type]

    @staticmethod
    def load(path: str | Path) -> SyntheticPool:
        """Read a pool written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as z:
            return SyntheticPool(
                torch.from_numpy(z["images"]),
                torch.from_numpy(z["masks"]),
                [str(s) for s in z["source_items"]],
                [str(s) for s in z["source_patients"]],
                [int(v) for v in z["variants"]],
                [str(s) for s in z["edits"]],
                str(z["key"]),
                Path(path),
            )


def _masks_digest(data: ArraySet) -> str:
    h = hashlib.sha256(np.ascontiguousarray(data.masks.numpy()).tobytes())
    h.update(json.dumps([data.item_ids, data.patients]).encode())
    return h.hexdigest()


def pool_key(gen_hashes: dict[str, str], sampling: SamplingConfig, train: ArraySet, cfg: MedsynthConfig) -> str:
    """Input key of a pool: generator weights, sampler settings, training masks, variants and edits."""
    ec = cfg.experiment
    return sha256_json(
        {
            "generator": dict(sorted(gen_hashes.items())),
            "sampling": sampling.model_dump(mode="json"),
            "masks": _masks_digest(train),
            "per_mask": ec.pool_per_mask,
            "edits": list(ec.pool_edits),
            "elastic": [cfg.synthesis.elastic_sigma, cfg.synthesis.elastic_magnitude],
        }
    )


def make_pool(
    gen: PoolGenerator,
    train: ArraySet,
    cfg: MedsynthConfig,
    out_dir: str | Path,
    progress: Progress | None = None,
) -> SyntheticPool:
    """Generate ``experiment.pool_per_mask`` synthetic variants of EVERY training mask, once.

    Variant ``k`` of item ``i`` conditions on the mask edited by ``pool_edits[k % len]`` (random draws
    from ``(sampling.seed, i, k)``); images are generated in batches of ``sampling.batch_size`` masks
    of one variant, each batch with a seed derived from ``(sampling.seed, k, first item index)``.
    ``sampling`` is ``experiment.pool_sampling`` or the top-level ``sampling`` section.

    Args:
        gen: The trained generator (``generate`` and ``hashes``).
        train: The real TRAINING split (only its masks and provenance are used).
        cfg: Resolved config (``experiment``, ``sampling``, ``synthesis`` elastic parameters).
        out_dir: Folder of ``pool.npz``; an existing pool with the same key is loaded instead.
        progress: Advanced once per generated image.

    Returns:
        The pool (items ordered variant-major: all items of variant 0, then variant 1, ...).
    """
    from medsynth.synthesis.edits import apply_edit
    from medsynth.synthesis.masks import MaskItem

    ec = cfg.experiment
    sampling = ec.pool_sampling or cfg.sampling
    progress = progress or NullProgress()
    key = pool_key(gen.hashes, sampling, train, cfg)
    path = Path(out_dir) / POOL_FILE
    if path.is_file():
        try:
            stored = SyntheticPool.load(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable pool %s: %s", path, exc)
        else:
            if stored.key == key:
                log.info("reusing synthetic pool %s (%d items)", path, len(stored))
                return stored
    per_mask = ec.pool_per_mask
    if per_mask == 0 or len(train) == 0:
        return SyntheticPool.empty(train.masks.shape[2:])
    items = [
        MaskItem(iid, train.masks[i].numpy().astype(np.uint8), train.affines[i], pat, "cache:train")
        for i, (iid, pat) in enumerate(zip(train.item_ids, train.patients, strict=True))
    ]
    n, bs = len(train), sampling.batch_size
    images, masks, src_items, src_pats, variants, edits = [], [], [], [], [], []
    for k in range(per_mask):
        spec = ec.pool_edits[k % len(ec.pool_edits)]
        edited = np.stack(
            [
                apply_edit(spec, it, items, np.random.default_rng([sampling.seed, i, k]), cfg.synthesis, train.labels)[
                    0
                ]
                for i, it in enumerate(items)
            ]
        )
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            seed = int(np.random.default_rng([sampling.seed, k, start, 17]).integers(2**31 - 1))
            batch = torch.from_numpy(edited[start:stop])
            out = gen.generate(batch, sampling, seed)
            images.append(out.float().clamp(0, 1).to(torch.float16).cpu())
            masks.append(batch)
            progress.advance(stop - start, f"pool variant {k + 1}/{per_mask}")
        src_items += list(train.item_ids)
        src_pats += list(train.patients)
        variants += [k] * n
        edits += [spec] * n
    pool = SyntheticPool(torch.cat(images), torch.cat(masks), src_items, src_pats, variants, edits, key, path)
    pool.save(path)
    return pool


# --------------------------------------------------------------------------------------------------
# cells: patient-level selection


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    arm: Arm
    fraction: float
    ratio: int
    seed: int

    @property
    def name(self) -> str:
        """Stable id, e.g. ``real-f0.1-r2-s0``."""
        return f"{self.arm}-f{self.fraction:g}-r{self.ratio}-s{self.seed}"

    def params(self) -> dict[str, Any]:
        """The cell's parameters (logged to its tracked run)."""
        return {"arm": self.arm, "fraction": self.fraction, "ratio": self.ratio, "seed": self.seed}


def grid_cells(cfg: MedsynthConfig) -> list[Cell]:
    """Every cell of the grid: ``real`` at every ratio, ``real_classical`` at ratio 0 and
    ``synthetic_only`` at the ratios >= 1, for every fraction and seed (in that order)."""
    ec = cfg.experiment
    cells: list[Cell] = []
    for arm in ec.arms:
        if arm == "real":
            ratios = list(ec.ratios)
        elif arm == "real_classical":
            ratios = [0]
        else:
            ratios = [r for r in ec.ratios if r >= 1]
        for fraction in ec.fractions:
            for ratio in ratios:
                for seed in ec.seeds:
                    cells.append(Cell(arm, fraction, ratio, seed))
    return cells


def select_patients(patients: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded ``fraction`` of the distinct patients: the first ``max(1, ceil(fraction * n))`` of a
    permutation that depends only on ``seed`` (so subsets are nested across fractions)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    uniq = sorted(set(patients))
    if not uniq:
        raise ValueError("no patient to select from")
    order = np.random.default_rng([seed, 101]).permutation(len(uniq))
    n = max(1, math.ceil(fraction * len(uniq) - 1e-9))
    return [uniq[i] for i in order[:n]]


@dataclass(frozen=True)
class CellData:
    """The training data of one cell.

    Attributes:
        images: ``(N, 1, *S)`` float32 (real items first, then synthetic ones).
        masks: ``(N, 1, *S)`` uint8 label maps (the real masks; the conditioning masks of synthetic items).
        patients: Patient of each item — for a synthetic item, the patient of its source mask.
        item_ids: Real item id, or ``"<source item>#syn<k>"`` for synthetic items.
        synthetic: ``(N,)`` bool.
        real_patients: The selected training patients.
        n_real: Real items used for training (0 for ``synthetic_only``).
        n_real_available: Real items of the selected patients (the base of the ratio).
        n_synthetic: Synthetic items.
        with_replacement: The synthetic draw repeated pool items (not enough candidates).
        pool_indices: Indices of the synthetic items in the pool.
    """

    images: torch.Tensor
    masks: torch.Tensor
    patients: list[str]
    item_ids: list[str]
    synthetic: npt.NDArray[np.bool_]
    real_patients: list[str]
    n_real: int
    n_real_available: int
    n_synthetic: int
    with_replacement: bool
    pool_indices: list[int] = field(default_factory=list)

    def presence(self, target_label: int, min_voxels: int = 1) -> npt.NDArray[np.int64]:
        """Presence labels of the items (see :func:`presence_labels`)."""
        return presence_labels(self.masks, target_label, min_voxels)

    def info(self) -> dict[str, Any]:
        """Counts for the record of the cell."""
        return {
            "n_real": self.n_real,
            "n_real_available": self.n_real_available,
            "n_synthetic": self.n_synthetic,
            "n_real_patients": len(self.real_patients),
            "synthetic_with_replacement": self.with_replacement,
        }


def _draw_synthetic(pool: SyntheticPool, patients: set[str], n: int, seed: int) -> tuple[list[int], bool]:
    if n == 0:
        return [], False
    cand = np.array([i for i, p in enumerate(pool.source_patients) if p in patients], dtype=np.int64)
    if cand.size == 0:
        raise DataError(
            pool.path or "synthetic pool",
            f"holds no item generated from the selected patients ({sorted(patients)[:5]} ...)",
            hint="generate the pool from the same training split",
        )
    rank = np.random.default_rng([seed, 202]).permutation(len(pool))
    variants = np.asarray(pool.variants, dtype=np.int64)
    ordered = cand[np.lexsort((rank[cand], variants[cand]))]  # by variant, then seeded rank
    repeats = math.ceil(n / ordered.size)
    return [int(i) for i in np.tile(ordered, repeats)[:n]], repeats > 1


def select_cell(
    train: ArraySet,
    pool: SyntheticPool | None,
    fraction: float,
    ratio: int,
    seed: int,
    arm: str,
) -> CellData:
    """The training data of cell ``(arm, fraction, ratio, seed)`` (see the module doc).

    Args:
        train: The real training split.
        pool: Synthetic items with source patients (may be None for cells without synthetic data).
        fraction: Fraction of the training patients (nested across fractions for one seed).
        ratio: Synthetic items per real item of the selected patients.
        seed: Seed of the patient order and of the synthetic draw.
        arm: 'real', 'real_classical' (ratio 0) or 'synthetic_only' (ratio >= 1).

    Returns:
        A :class:`CellData`.

    Raises:
        ValueError: On an arm/ratio combination that is not part of the design, or a missing pool.
        DataError: If the pool holds no item of the selected patients.
    """
    if arm not in ("real", "real_classical", "synthetic_only"):
        raise ValueError(f"unknown arm {arm!r}")
    if ratio < 0 or (arm == "real_classical" and ratio != 0) or (arm == "synthetic_only" and ratio < 1):
        raise ValueError(f"arm {arm!r} does not take ratio {ratio} (real_classical: 0; synthetic_only: >= 1)")
    pats = select_patients(train.patients, fraction, seed)
    chosen = set(pats)
    real_idx = [i for i, p in enumerate(train.patients) if p in chosen]
    n_avail = len(real_idx)
    n_syn = ratio * n_avail
    if n_syn and pool is None:
        raise ValueError(f"cell {arm} ratio {ratio} needs a synthetic pool")
    syn_idx, repl = _draw_synthetic(pool, chosen, n_syn, seed) if pool is not None else ([], False)
    if arm == "synthetic_only":
        real_idx = []
    parts_x = [train.images[real_idx].float()]
    parts_y = [train.masks[real_idx].to(torch.uint8)]
    patients = [train.patients[i] for i in real_idx]
    ids = [train.item_ids[i] for i in real_idx]
    if syn_idx and pool is not None:
        parts_x.append(pool.images[syn_idx].float())
        parts_y.append(pool.masks[syn_idx].to(torch.uint8))
        patients += [pool.source_patients[i] for i in syn_idx]
        ids += [f"{pool.source_items[i]}#syn{pool.variants[i]}" for i in syn_idx]
    synthetic = np.r_[np.zeros(len(real_idx), bool), np.ones(len(syn_idx), bool)]
    return CellData(
        torch.cat(parts_x),
        torch.cat(parts_y),
        patients,
        ids,
        synthetic,
        pats,
        len(real_idx),
        n_avail,
        len(syn_idx),
        repl,
        syn_idx,
    )


def check_no_leak(train_patients: Sequence[str] | CellData, eval_patients: Sequence[str], what: str = "test") -> None:
    """Raise :class:`PatientLeakError` if a training patient (real or synthetic source) is in the evaluation split."""
    pats = train_patients.patients if isinstance(train_patients, CellData) else train_patients
    both = sorted(set(pats) & set(eval_patients))
    if both:
        shown = ", ".join(both[:5]) + (" ..." if len(both) > 5 else "")
        raise PatientLeakError(
            f"{len(both)} patient(s) are both in the training data of a cell and in the {what} split: {shown}"
        )


# --------------------------------------------------------------------------------------------------
# segmentation arm


def train_cell_segmenter(
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: MedsynthConfig,
    seed: int,
    augment: bool,
    labels: dict[int, str],
    device: torch.device | None = None,
    tracker: Tracker | None = None,
) -> torch.nn.Module:
    """Train the reference segmenter's UNet (``segmenter`` section) from scratch on one cell's data.

    A plain loop (AdamW + warm-up, clipping, DiceCE) with ``segmenter.train`` settings and
    ``experiment.segmenter_steps`` steps when set. No augmentation except, with ``augment``, the
    classical MONAI set of :func:`medsynth.evaluation.classifier.classical_augment` (masks moved
    nearest-neighbour), so the arms differ only in their data. Inputs are zero-padded to a multiple
    of the UNet stride.

    Returns:
        A :class:`~medsynth.evaluation.segmenter.Segmenter` in eval mode.
    """
    from monai.losses import DiceCELoss

    from medsynth.evaluation.segmenter import Segmenter, build_segmenter, pad_to, total_stride

    sc = cfg.segmenter
    oc = (
        sc.train
        if cfg.experiment.segmenter_steps is None
        else sc.train.model_copy(update={"steps": cfg.experiment.segmenter_steps})
    )
    dev = device or torch.device("cpu")
    tracker = tracker or NullTracker()
    num_classes = max(labels) + 1
    mult = total_stride(sc.strides)
    roi = tuple(int(math.ceil(s / mult) * mult) for s in images.shape[2:])
    x_all, y_all = pad_to(images.float(), roi), pad_to(masks.long(), roi)
    torch.manual_seed(int(np.random.default_rng([seed, 3]).integers(2**62)))
    net = build_segmenter(cfg, num_classes).to(dev)
    opt, sched = make_optimizer(net.parameters(), oc)
    loss_fn = DiceCELoss(
        include_background=sc.include_background,
        to_onehot_y=True,
        softmax=True,
        lambda_dice=sc.dice_weight,
        lambda_ce=sc.ce_weight,
    )
    net.train()
    for step in range(oc.steps):
        idx = batch_indices(len(x_all), step, oc.batch_size, seed)
        x, y = x_all[idx], y_all[idx]
        if augment:
            x, y_aug = classical_augment(x, cfg.experiment, seed, step, masks=y)
            y = y_aug if y_aug is not None else y
        x, y = x.to(dev), y.to(dev)
        with autocast(dev, oc.amp), seeded_global_rng(seed, step, 0, dev):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        optimizer_step(loss, net, opt, sched, oc.grad_clip)
        if (step + 1) % 10 == 0 or step + 1 == oc.steps:
            tracker.log_metrics({"train_loss": float(loss.detach())}, step=step + 1)
    return Segmenter(net, num_classes, roi, labels).eval()


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


# --------------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class GridResult:
    """What :func:`run_grid` produced.

    Attributes:
        task: 'presence' or 'segmentation'.
        metric: The primary metric ('auroc' or 'dice').
        cells: The record of every cell of the grid (read back from ``cells.jsonl`` or new).
        summary: One row per (arm, fraction, ratio) (the content of ``summary.csv``).
        trained: Names of the cells trained by this call (the others were already recorded).
        skipped: Names of the cells found in ``cells.jsonl``.
        cells_path: ``cells.jsonl``.
        summary_csv: ``summary.csv``.
        summary_md: ``summary.md``.
        plot: ``<metric>_vs_fraction.png``.
    """

    task: Task
    metric: str
    cells: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    trained: list[str]
    skipped: list[str]
    cells_path: Path
    summary_csv: Path
    summary_md: Path
    plot: Path


def _ids_digest(data: ArraySet | None) -> str | None:
    if data is None:
        return None
    return sha256_json([data.item_ids, data.patients])


def grid_key(
    cfg: MedsynthConfig,
    task: Task,
    target: int | None,
    train: ArraySet,
    val: ArraySet | None,
    test: ArraySet,
    pool: SyntheticPool | None,
) -> str:
    """Input key of the cells: everything a cell's result depends on except its own coordinates."""
    ec = cfg.experiment.model_dump(mode="json")
    for k in ("fractions", "ratios", "seeds", "arms", "n_bootstrap", "ci", "bootstrap_seed", "predict_batch_size"):
        ec.pop(k, None)
    ec["train"] = {k: v for k, v in ec["train"].items() if k != "num_threads"}
    seg = cfg.segmenter.model_dump(mode="json") if task == "segmentation" else None
    if seg is not None:
        seg["train"] = {k: v for k, v in seg["train"].items() if k != "num_threads"}
    return sha256_json(
        {
            "task": task,
            "target": target,
            "experiment": ec,
            "segmenter": seg,
            "spatial_dims": cfg.preprocess.spatial_dims,
            "pool": (pool.key or sha256_json([pool.source_items, pool.variants, len(pool)])) if pool else None,
            "train": _ids_digest(train),
            "val": _ids_digest(val),
            "test": _ids_digest(test),
        }
    )


def _read_cells(path: Path, key: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        if isinstance(rec, dict) and rec.get("key") == key and "cell" in rec:
            out[str(rec["cell"])] = rec
    return out


def _append_cell(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as fh:
        if needs_newline:
            fh.write("\n")
        fh.write(json.dumps(rec, default=_json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def _clean(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _eval_subset(data: ArraySet | None, max_items: int | None) -> ArraySet | None:
    if data is None or max_items is None or len(data) <= max_items:
        return data
    keep = np.unique(np.linspace(0, len(data) - 1, max_items).round().astype(np.int64))
    return data.subset([int(i) for i in keep])  # spread over the split: every patient stays represented


CellMap = Callable[[Callable[["Cell"], dict[str, Any]], list["Cell"], Callable[[dict[str, Any]], None]], None]
"""How grid cells are executed: ``cell_map(work, cells, on_done)``."""


def sequential_map(
    work: Callable[[Cell], dict[str, Any]], cells: list[Cell], on_done: Callable[[dict[str, Any]], None]
) -> None:
    """Run cells one after another in this process (the default :data:`CellMap`)."""
    for cell in cells:
        on_done(work(cell))


def run_grid(
    cfg: MedsynthConfig,
    train: ArraySet,
    val: ArraySet | None,
    test: ArraySet,
    pool: SyntheticPool | None,
    out_dir: str | Path,
    tracker_factory: TrackerFactory | None = None,
    progress: Progress | None = None,
    device: torch.device | None = None,
    cell_map: CellMap | None = None,
) -> GridResult:
    """Train and evaluate every cell of the grid; write ``cells.jsonl``, ``summary.csv``/``.md`` and the plot.

    Args:
        cfg: Resolved config (``experiment``; ``segmenter`` for the segmentation task).
        train: Real training split.
        val: Validation split (presence task: the Youden threshold of each cell), or None.
        test: The fixed patient-level test split (first ``experiment.max_eval_items`` items).
        pool: Synthetic pool from :func:`make_pool` (None when no cell uses synthetic data).
        out_dir: Output folder.
        tracker_factory: ``tracker_factory(cell_name, params)`` → context manager yielding the
            cell's tracker; the cell's params, counts and test metrics are logged to it.
        progress: Advanced once per cell (trained or skipped).
        device: Training device (default CPU).
        cell_map: ``cell_map(work, cells, on_done)`` runs ``work(cell)`` for every cell and calls
            ``on_done(record)`` as each finishes (in the calling process). Default: one after
            another here; an orchestrator passes one that fans cells out (threads, Dask, ...).

    Returns:
        A :class:`GridResult`.

    Raises:
        PatientLeakError: If a cell's training data (or the pool) shares a patient with the test
            split, or (presence task) with the validation split.
    """
    ec = cfg.experiment
    task = resolve_task(cfg)
    set_threads(ec.train.num_threads)
    progress = progress or NullProgress()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_e = _eval_subset(test, ec.max_eval_items)
    val_e = _eval_subset(val, ec.max_eval_items)
    assert test_e is not None
    # fail fast, before any training: every cell draws from these patients (checked again per cell)
    check_no_leak(train.patients, test.patients, "test")
    if pool is not None:
        check_no_leak(pool.source_patients, test.patients, "test")
    target = resolve_target_label(train.labels, ec.target_label) if task == "presence" else None
    key = grid_key(cfg, task, target, train, val_e, test_e, pool)
    cells_path = out / CELLS_FILE
    done = _read_cells(cells_path, key)
    cells = grid_cells(cfg)
    if pool is None and any(c.ratio > 0 for c in cells):
        raise ValueError("the grid has cells with synthetic data (ratio > 0) but no pool was given; run make_pool")
    trained: list[str] = []
    skipped: list[str] = []
    y_test = presence_labels(test_e.masks, target, ec.min_target_voxels) if target is not None else None
    y_val = presence_labels(val_e.masks, target, ec.min_target_voxels) if target is not None and val_e else None
    factory = tracker_factory or (lambda _n, _p: contextlib.nullcontext(NullTracker()))

    def work(cell: Cell) -> dict[str, Any]:
        """Train and evaluate one cell (runs wherever ``cell_map`` sends it)."""
        data = select_cell(train, pool, cell.fraction, cell.ratio, cell.seed, cell.arm)
        check_no_leak(data, test.patients, "test")
        if val is not None and task == "presence":  # the validation split picks the Youden threshold
            check_no_leak(data, val.patients, "validation")
        params = {**cell.params(), "task": task}
        t0 = time.monotonic()
        with factory(cell.name, params) as tracker:
            tracker.log_params({**params, **data.info(), **({"target_label": target} if target else {})})
            if task == "presence":
                assert target is not None and y_test is not None
                rec = _presence_cell(cell, data, cfg, target, test_e, y_test, val_e, y_val, device, tracker)
            else:
                rec = _segmentation_cell(cell, data, cfg, train.labels, test_e, device, tracker)
            tracker.log_metrics({f"test_{k}": v for k, v in rec["metrics"].items() if v is not None})
        rec = {"cell": cell.name, "key": key, **cell.params(), "task": task, **data.info(), **rec}
        rec["seconds"] = round(time.monotonic() - t0, 3)
        rec["worker"] = {"pid": os.getpid(), "thread": threading.current_thread().name}  # where it ran
        return rec

    def on_done(rec: dict[str, Any]) -> None:
        """Record a finished cell at once (so an interrupted grid resumes after it)."""
        _append_cell(cells_path, rec)
        done[rec["cell"]] = rec
        trained.append(rec["cell"])
        progress.advance(1, rec["cell"])

    for cell in cells:
        if cell.name in done:
            skipped.append(cell.name)
            progress.advance(1, f"{cell.name} (recorded)")
    todo = [c for c in cells if c.name not in done]
    (cell_map or sequential_map)(work, todo, on_done)
    records = [done[c.name] for c in cells]
    summary = summarise(records, test_e, task, cfg, target)
    metric = "auroc" if task == "presence" else "dice"
    target_name = train.labels.get(target, str(target)) if target is not None else None
    csv_path, md_path = _write_summary(out, summary, task, cfg, target, target_name, len(test_e))
    plot = _plot(out / f"{metric}_vs_fraction.png", summary, metric, cfg.experiment.ci)
    return GridResult(task, metric, records, summary, trained, skipped, cells_path, csv_path, md_path, plot)


def _presence_cell(
    cell: Cell,
    data: CellData,
    cfg: MedsynthConfig,
    target: int,
    test: ArraySet,
    y_test: npt.NDArray[np.int64],
    val: ArraySet | None,
    y_val: npt.NDArray[np.int64] | None,
    device: torch.device | None,
    tracker: Tracker,
) -> dict[str, Any]:
    ec = cfg.experiment
    y = data.presence(target, ec.min_target_voxels)
    model = train_classifier(
        data.images, y, ec, cell.seed, augment=cell.arm == "real_classical", device=device, tracker=tracker
    )
    p_test = predict_proba(model, test.images, ec.predict_batch_size)
    m = binary_metrics(y_test, p_test, 0.5)
    metrics: dict[str, float | None] = {
        k: _clean(float(m[k])) for k in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity")
    }
    thr = None
    if val is not None and y_val is not None:
        thr = youden_threshold(y_val, predict_proba(model, val.images, ec.predict_batch_size))
    if thr is not None:
        my = binary_metrics(y_test, p_test, thr)
        metrics.update(
            {
                "balanced_accuracy_youden": _clean(float(my["balanced_accuracy"])),
                "f1_youden": _clean(float(my["f1"])),
                "threshold_youden": thr,
            }
        )
    return {
        "n_train_pos": int(y.sum()),
        "n_train_neg": int(len(y) - y.sum()),
        "metrics": metrics,
        "test_scores": [round(float(v), 6) for v in p_test],
    }


def _segmentation_cell(
    cell: Cell,
    data: CellData,
    cfg: MedsynthConfig,
    labels: dict[int, str],
    test: ArraySet,
    device: torch.device | None,
    tracker: Tracker,
) -> dict[str, Any]:
    from medsynth.evaluation.segmenter import predict

    model = train_cell_segmenter(
        data.images, data.masks, cfg, cell.seed, cell.arm == "real_classical", labels, device, tracker
    )
    pred = predict(model, test.images, cfg.segmenter.predict_batch_size)
    per_case, per_label = case_dice(pred, test.masks, labels)
    finite = per_case[np.isfinite(per_case)]
    metrics: dict[str, float | None] = {"dice": _clean(float(finite.mean())) if finite.size else None}
    metrics.update({k: _clean(v) for k, v in per_label.items()})
    return {"metrics": metrics, "test_scores": [_clean(float(v)) for v in per_case]}


# --------------------------------------------------------------------------------------------------
# statistics


def _patient_weights(patients: Sequence[str], n_boot: int, seed: int) -> npt.NDArray[np.float64]:
    """``(n_boot, n_items)``: each item weighted by how often its patient is drawn in each resample."""
    uniq, inv = np.unique(np.asarray(list(patients), dtype=str), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(uniq), np.full(len(uniq), 1.0 / len(uniq)), size=n_boot).astype(np.float64)
    return np.asarray(draws[:, inv], dtype=np.float64)


def _interval(reps: npt.NDArray[np.float64], ci: float) -> tuple[float, float]:
    r = reps[np.isfinite(reps)]
    if r.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2.0
    lo, hi = np.percentile(r, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


def _boot_p(reps: npt.NDArray[np.float64]) -> float:
    r = reps[np.isfinite(reps)]
    if r.size == 0:
        return float("nan")
    lo = (1 + np.sum(r <= 0)) / (r.size + 1)
    hi = (1 + np.sum(r >= 0)) / (r.size + 1)
    return float(min(1.0, 2 * min(lo, hi)))


def _scores(rec: dict[str, Any]) -> npt.NDArray[np.float64]:
    return np.array([np.nan if v is None else float(v) for v in rec["test_scores"]], dtype=np.float64)


def summarise(
    records: list[dict[str, Any]],
    test: ArraySet,
    task: Task,
    cfg: MedsynthConfig,
    target: int | None = None,
) -> list[dict[str, Any]]:
    """One row per ``(arm, fraction, ratio)``: seed mean ± sd of each metric, the patient-bootstrap
    interval of the seed-mean primary metric, and the paired comparison with the real-only ratio-0
    cell of the same fraction (see the module doc for the definitions).

    Args:
        records: Cell records of :func:`run_grid` (with ``test_scores`` over the items of ``test``).
        test: The evaluated test items (labels and patients).
        task: 'presence' or 'segmentation'.
        cfg: Resolved config (``experiment.n_bootstrap``, ``ci``, ``bootstrap_seed``).
        target: Presence task: the target label (default: resolved from ``test.labels``).
    """
    ec = cfg.experiment
    groups: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((str(rec["arm"]), float(rec["fraction"]), int(rec["ratio"])), []).append(rec)
    by_seed = {g: {int(r["seed"]): r for r in recs} for g, recs in groups.items()}
    metric = "auroc" if task == "presence" else "dice"
    names = (
        ["auroc", "balanced_accuracy", "f1", "balanced_accuracy_youden", "f1_youden"]
        if task == "presence"
        else ["dice"]
    )
    y = w = None
    if task == "presence":
        if target is None:
            target = resolve_target_label(test.labels, ec.target_label)
        y = presence_labels(test.masks, target, ec.min_target_voxels)
        w = _patient_weights(test.patients, ec.n_bootstrap, ec.bootstrap_seed)

    def seed_reps(recs: dict[int, dict[str, Any]], seeds: list[int]) -> npt.NDArray[np.float64]:
        assert y is not None and w is not None
        return np.asarray(np.mean([weighted_auroc(y, _scores(recs[s]), w) for s in seeds], axis=0), np.float64)

    def seed_case_mean(recs: dict[int, dict[str, Any]], seeds: list[int]) -> npt.NDArray[np.float64]:
        return np.asarray(np.mean([_scores(recs[s]) for s in seeds], axis=0), np.float64)

    rows: list[dict[str, Any]] = []
    for (arm, fraction, ratio), recs in sorted(groups.items(), key=lambda kv: (_arm_order(kv[0][0]), kv[0][1:])):
        seeds = sorted(by_seed[(arm, fraction, ratio)])
        row: dict[str, Any] = {
            "task": task,
            "arm": arm,
            "fraction": fraction,
            "ratio": ratio,
            "n_seeds": len(seeds),
            "n_real_patients": float(np.mean([r["n_real_patients"] for r in recs])),
            "n_real": float(np.mean([r["n_real"] for r in recs])),
            "n_synthetic": float(np.mean([r["n_synthetic"] for r in recs])),
            "synthetic_with_replacement": any(bool(r.get("synthetic_with_replacement")) for r in recs),
            "metric": metric,
        }
        for name in names:
            vals = [r["metrics"].get(name) for r in recs]
            m, s = mean_sd([np.nan if v is None else float(v) for v in vals])
            row[f"{name}_mean"], row[f"{name}_sd"] = _clean(m), _clean(s)
        cur = by_seed[(arm, fraction, ratio)]
        if task == "presence":
            lo, hi = _interval(seed_reps(cur, seeds), ec.ci)
        else:
            est = bootstrap_mean(seed_case_mean(cur, seeds), test.patients, ec.n_bootstrap, ec.ci, ec.bootstrap_seed)
            lo, hi = est.lo, est.hi
        row["ci_lo"], row["ci_hi"], row["ci"] = _clean(lo), _clean(hi), ec.ci
        row.update({"delta_vs_real": None, "delta_lo": None, "delta_hi": None, "p_value": None, "paired_seeds": 0})
        base = by_seed.get(("real", fraction, 0))
        if base is not None and (arm, ratio) != ("real", 0):
            common = sorted(set(seeds) & set(base))
            if common:
                row["paired_seeds"] = len(common)
                if task == "presence":
                    assert y is not None
                    point = float(
                        np.mean(
                            [
                                weighted_auroc(y, _scores(cur[s]))[0] - weighted_auroc(y, _scores(base[s]))[0]
                                for s in common
                            ]
                        )
                    )
                    reps = seed_reps(cur, common) - seed_reps(base, common)
                    dlo, dhi = _interval(reps, ec.ci)
                    row.update(
                        {
                            "delta_vs_real": _clean(point),
                            "delta_lo": _clean(dlo),
                            "delta_hi": _clean(dhi),
                            "p_value": _clean(_boot_p(reps)),
                        }
                    )
                else:
                    cmp = paired_comparison(
                        seed_case_mean(cur, common),
                        seed_case_mean(base, common),
                        test.patients,
                        ec.n_bootstrap,
                        ec.ci,
                        ec.bootstrap_seed,
                    )
                    d = cmp["difference"]
                    row.update(
                        {
                            "delta_vs_real": d["value"],
                            "delta_lo": d["lo"],
                            "delta_hi": d["hi"],
                            "p_value": cmp["p_value"],
                        }
                    )
        rows.append(row)
    return rows


def _arm_order(arm: str) -> int:
    return {"real": 0, "real_classical": 1, "synthetic_only": 2}.get(arm, 3)


# --------------------------------------------------------------------------------------------------
# outputs


def _fmt(v: Any, digits: int = 3) -> str:
    return format_value(v, digits, missing="–")


def _arm_label(arm: str, ratio: int) -> str:
    if arm == "real":
        return "real only" if ratio == 0 else f"real + {ratio}x synthetic"
    if arm == "real_classical":
        return "real + classical aug."
    return f"synthetic only ({ratio}x)"


def _write_summary(
    out: Path,
    rows: list[dict[str, Any]],
    task: Task,
    cfg: MedsynthConfig,
    target: int | None,
    target_name: str | None,
    n_test: int,
) -> tuple[Path, Path]:
    ec = cfg.experiment
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})
    csv_path = write_text_atomic(out / SUMMARY_CSV, buf.getvalue())

    metric = "AUROC" if task == "presence" else "Dice"
    key = "auroc" if task == "presence" else "dice"
    pct = f"{100 * ec.ci:g}%"
    lines = [
        "# Downstream augmentation experiment",
        "",
        f"Task: **{task}**"
        + (f" (presence of label {target} = {target_name!r})" if target is not None else "")
        + f"; {n_test} test items; seeds {list(ec.seeds)}.",
        "",
        f"- {metric}: mean ± sd over seeds; {pct} CI = percentile bootstrap over TEST PATIENTS "
        f"({ec.n_bootstrap} resamples) of the seed-mean {metric}.",
        "- Δ vs real only: seed-mean difference with the real-only ratio-0 cell of the same fraction "
        "(same seeds, same resampled test patients); p = "
        + ("two-sided bootstrap p-value." if task == "presence" else "Wilcoxon signed-rank on per-patient means."),
        "- Real fraction = fraction of the training PATIENTS; ratio = synthetic items per real item, drawn "
        "only from the pool items of those patients.",
    ]
    if task == "presence":
        lines.append(
            "- Balanced accuracy and F1 at threshold 0.5 (and at the Youden threshold chosen on the "
            "validation split, when given)."
        )
    lines += [
        "",
        f"| arm | real fraction | ratio | patients | n real | n synthetic | {metric} (mean ± sd) | {pct} CI |"
        + (" bal. acc. | F1 |" if task == "presence" else "")
        + f" Δ {metric} vs real [{pct} CI] | p |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if task == "presence" else "") + "---|---|",
    ]
    for r in rows:
        cells = [
            _arm_label(r["arm"], r["ratio"]) + (" (with replacement)" if r["synthetic_with_replacement"] else ""),
            _fmt(r["fraction"], 2),
            str(r["ratio"]),
            _fmt(r["n_real_patients"], 0),
            _fmt(r["n_real"], 0),
            _fmt(r["n_synthetic"], 0),
            f"{_fmt(r[f'{key}_mean'])} ± {_fmt(r[f'{key}_sd'])}",
            f"[{_fmt(r['ci_lo'])}, {_fmt(r['ci_hi'])}]",
        ]
        if task == "presence":
            cells += [
                f"{_fmt(r['balanced_accuracy_mean'])} ± {_fmt(r['balanced_accuracy_sd'])}",
                f"{_fmt(r['f1_mean'])} ± {_fmt(r['f1_sd'])}",
            ]
        delta = (
            f"{_fmt(r['delta_vs_real'], 3)} [{_fmt(r['delta_lo'])}, {_fmt(r['delta_hi'])}]"
            if r["delta_vs_real"] is not None
            else "–"
        )
        cells += [delta, _fmt(r["p_value"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    md_path = write_text_atomic(out / SUMMARY_MD, "\n".join(lines) + "\n")
    return csv_path, md_path


def _plot(path: Path, rows: list[dict[str, Any]], metric: str, ci: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["arm"], int(r["ratio"])), []).append(r)
    keys = sorted(series, key=lambda k: (_arm_order(k[0]), k[1]))
    n = max(len(keys), 1)
    for j, (arm, ratio) in enumerate(keys):
        pts = sorted(series[(arm, ratio)], key=lambda r: r["fraction"])
        jitter = 1.0 + 0.03 * (j - (n - 1) / 2)  # multiplicative offset: error bars stay apart on a log axis
        x = np.array([r["fraction"] * jitter for r in pts])
        yv = np.array([np.nan if r[f"{metric}_mean"] is None else r[f"{metric}_mean"] for r in pts], dtype=float)
        lo = np.array([np.nan if r["ci_lo"] is None else r["ci_lo"] for r in pts], dtype=float)
        hi = np.array([np.nan if r["ci_hi"] is None else r["ci_hi"] for r in pts], dtype=float)
        err = np.vstack([np.nan_to_num(yv - lo, nan=0.0).clip(0), np.nan_to_num(hi - yv, nan=0.0).clip(0)])
        style = "-" if arm == "real" else ("--" if arm == "synthetic_only" else ":")
        marker = "o" if arm == "real" else ("s" if arm == "synthetic_only" else "^")
        ax.errorbar(x, yv, yerr=err, fmt=marker + style, capsize=3, label=_arm_label(arm, ratio), ms=4)
    ax.set_xscale("log")
    fr = sorted({float(r["fraction"]) for r in rows})
    if fr:
        ax.set_xticks(fr)
        ax.set_xticklabels([f"{f:g}" for f in fr])
        ax.minorticks_off()
    ax.set_xlabel("fraction of real training patients")
    ax.set_ylabel(f"test {metric.upper() if metric == 'auroc' else 'Dice'} (mean over seeds)")
    ax.set_title(f"error bars: {100 * ci:g}% CI, bootstrap over test patients", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return path
