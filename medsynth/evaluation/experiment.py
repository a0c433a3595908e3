"""The downstream augmentation experiment (facade): does synthetic data help a task network trained on
little real data?

A grid of task networks trained on real, real + synthetic, classically augmented and synthetic-only
data, evaluated on the fixed patient-level test split. The pieces live in one module per concern:

* :mod:`medsynth.evaluation.pool` — the synthetic pool (variants of every training mask, keyed, resumable);
* :mod:`medsynth.evaluation.selection` — cells, patient-level selection and leak checks;
* :mod:`medsynth.evaluation.cells` — training and scoring one cell per task (early stopping);
* :mod:`medsynth.evaluation.convergence` — early stopping, LR schedule, best-on-validation weights;
* :mod:`medsynth.evaluation.grid` — the grid runner with per-cell resume;
* :mod:`medsynth.evaluation.experiment_report` — statistics (through :mod:`medsynth.evaluation.stats`)
  and the summary table; :mod:`medsynth.evaluation.experiment_plot` — the figure.

This module re-exports their public names for callers that want the whole experiment at once.
"""

from __future__ import annotations

from medsynth.evaluation.cells import (
    CellRecord,
    case_dice,
    presence_labels,
    resolve_target_label,
    run_cell,
    segmentation_target,
    train_cell_segmenter,
)
from medsynth.evaluation.experiment_report import SUMMARY_CSV, SUMMARY_MD, GrowthCheck, SummaryRow, summarise
from medsynth.evaluation.grid import CELLS_FILE, CellMap, GridResult, TrackerFactory, grid_key, run_grid
from medsynth.evaluation.pool import POOL_FILE, PoolGenerator, SyntheticPool, make_pool
from medsynth.evaluation.selection import (
    Cell,
    CellData,
    PatientLeakError,
    check_no_leak,
    grid_cells,
    resolve_tasks,
    select_cell,
    select_patients,
)

__all__ = [
    "CELLS_FILE",
    "POOL_FILE",
    "SUMMARY_CSV",
    "SUMMARY_MD",
    "Cell",
    "CellData",
    "CellMap",
    "CellRecord",
    "GridResult",
    "GrowthCheck",
    "PatientLeakError",
    "PoolGenerator",
    "SummaryRow",
    "SyntheticPool",
    "TrackerFactory",
    "case_dice",
    "check_no_leak",
    "grid_cells",
    "grid_key",
    "make_pool",
    "presence_labels",
    "resolve_target_label",
    "resolve_tasks",
    "run_cell",
    "run_grid",
    "segmentation_target",
    "select_cell",
    "select_patients",
    "summarise",
    "train_cell_segmenter",
]
