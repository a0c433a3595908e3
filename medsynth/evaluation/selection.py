"""Patient-level selection of the grid's cells, and the leak checks.

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
* ``real_classical``: the same data as ``real`` at that ratio, trained with classical MONAI augmentation on
  every batch (ratio 0: classical augmentation alone; ratio > 0: synthetic data on top of it);
* ``synthetic_only``: ``ratio * n_real`` synthetic items of the subset's masks and no real item, for
  ratios >= 1 only (ratio 0 would be an empty training set; ratio 1 is the 1:1 replacement of the
  real data by synthetic data).

:func:`check_no_leak` raises if a patient of a cell's training data (real items or the source
patients of its synthetic items) is in an evaluation split (test, validation, external test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medsynth.config.experiment import Arm, Task
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet
from medsynth.errors import DataError, MedsynthError
from medsynth.evaluation.pool import SyntheticPool

__all__ = [
    "Cell",
    "CellData",
    "PatientLeakError",
    "check_no_leak",
    "grid_cells",
    "resolve_tasks",
    "select_cell",
    "select_patients",
]


class PatientLeakError(MedsynthError, ValueError):
    """A patient of a cell's training data (real or a synthetic item's source) is in the evaluation split."""


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a task network trained on one arm's data."""

    task: Task
    arm: Arm
    fraction: float
    ratio: int
    seed: int

    @property
    def name(self) -> str:
        """Stable id, e.g. ``presence-real-f0.1-r2-s0``."""
        return f"{self.task}-{self.arm}-f{self.fraction:g}-r{self.ratio}-s{self.seed}"

    def params(self) -> dict[str, Any]:
        """The cell's parameters (logged to its tracked run)."""
        return {"task": self.task, "arm": self.arm, "fraction": self.fraction, "ratio": self.ratio, "seed": self.seed}


def resolve_tasks(cfg: MedsynthConfig) -> list[Task]:
    """``experiment.tasks``; None = ``[presence, segmentation]`` for 2D data, ``[segmentation]`` for 3D."""
    tasks = cfg.experiment.tasks
    if tasks is None:
        return ["presence", "segmentation"] if cfg.preprocess.spatial_dims == 2 else ["segmentation"]
    return list(tasks)


def grid_cells(cfg: MedsynthConfig) -> list[Cell]:
    """Every cell of the grid, per task: ``real`` at every ratio, ``real_classical`` at
    ``experiment.real_classical_ratios`` and ``synthetic_only`` at the ratios >= 1, for every fraction
    and seed (in that order). The cells of
    the tasks share their training data (same patients and synthetic items for the same coordinates)."""
    ec = cfg.experiment
    cells: list[Cell] = []
    for task in resolve_tasks(cfg):
        for arm in ec.arms:
            if arm == "real":
                ratios = list(ec.ratios)
            elif arm == "real_classical":
                ratios = ec.real_classical_ratios
            else:
                ratios = [r for r in ec.ratios if r >= 1]
            for fraction in ec.fractions:
                for ratio in ratios:
                    for seed in ec.seeds:
                        cells.append(Cell(task, arm, fraction, ratio, seed))
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
        arm: 'real', 'real_classical' (the data of 'real'; the cell augments it) or 'synthetic_only' (ratio >= 1).

    Returns:
        A :class:`CellData`.

    Raises:
        ValueError: On an arm/ratio combination that is not part of the design, or a missing pool.
        DataError: If the pool holds no item of the selected patients.
    """
    if arm not in ("real", "real_classical", "synthetic_only"):
        raise ValueError(f"unknown arm {arm!r}")
    if ratio < 0 or (arm == "synthetic_only" and ratio < 1):
        raise ValueError(f"arm {arm!r} does not take ratio {ratio} (synthetic_only: >= 1)")
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
