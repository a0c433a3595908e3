"""The grid runner of the downstream experiment: every cell, resumable per cell.

Every ``(task, arm, fraction, ratio, seed)`` cell (:func:`medsynth.evaluation.selection.grid_cells`)
trains a task network from scratch on its data (:func:`medsynth.evaluation.selection.select_cell`)
until its validation score stops improving (:func:`medsynth.evaluation.cells.run_cell`) and is
scored on the fixed patient-level test split (and on the external test set, when given). Before any
training, :func:`~medsynth.evaluation.selection.check_no_leak` refuses a grid whose training data
(real items or the source patients of synthetic items) shares a patient with the test, validation or
external split; each cell is checked again. Finished cells are recorded in ``cells.jsonl`` (an
:class:`~medsynth.ledger.ItemLedger` keyed by :func:`grid_key`) and skipped when the grid runs again
with the same inputs. The summary (:mod:`medsynth.evaluation.experiment_report`) is recomputed from
the records each time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.config.experiment import Task
from medsynth.config.schema import MedsynthConfig
from medsynth.config.training import RUNTIME_FIELDS
from medsynth.data.dataset import ArraySet
from medsynth.evaluation.cells import CellRecord, resolve_target_label, run_cell
from medsynth.evaluation.experiment_plot import plot_summary
from medsynth.evaluation.experiment_report import (
    GrowthCheck,
    SummaryRow,
    real_only_growth,
    summarise,
    write_summary,
)
from medsynth.evaluation.pool import SyntheticPool
from medsynth.evaluation.selection import Cell, PatientLeakError, check_no_leak, grid_cells, resolve_tasks, select_cell
from medsynth.fileio import sha256_json, write_text_atomic
from medsynth.ledger import ItemLedger
from medsynth.progress import NullProgress, Progress
from medsynth.tracking.base import NullTracker, Tracker
from medsynth.training.common import set_threads

log = logging.getLogger(__name__)

__all__ = [
    "CELLS_FILE",
    "CELL_SCORES_FILE",
    "CellMap",
    "GridResult",
    "TrackerFactory",
    "grid_key",
    "run_grid",
    "sequential_map",
]

CELLS_FILE = "cells.jsonl"
CELL_SCORES_FILE = "cell_scores.json"
"""Per-item test scores of the current grid's cells with the test item ids (sliced by the bias report)."""
PLOT_FILE = "downstream_vs_fraction.png"
GRID_VERSION = 2
"""Bumped when a cell's result changes for the same inputs (2: early stopping, tasks list, new metrics)."""

TrackerFactory = Callable[[str, dict[str, Any]], contextlib.AbstractContextManager[Tracker]]
"""``tracker_factory(cell_name, params)``: a context manager yielding the tracker of one cell's run."""

CellMap = Callable[[Callable[[Cell], dict[str, Any]], list[Cell], Callable[[dict[str, Any]], None]], None]
"""How grid cells are executed: ``cell_map(work, cells, on_done)``."""


@dataclass(frozen=True)
class GridResult:
    """What :func:`run_grid` produced.

    Attributes:
        tasks: The tasks of the grid.
        cells: The record of every cell (read back from ``cells.jsonl`` or new).
        summary: One row per (task, arm, fraction, ratio) (the content of ``summary.csv``).
        growth: Per task, whether the real-only arm grows with the real fraction.
        trained: Names of the cells trained by this call (the others were already recorded).
        skipped: Names of the cells found in ``cells.jsonl``.
        cells_path: ``cells.jsonl``.
        summary_csv: ``summary.csv``.
        summary_md: ``summary.md``.
        plot: The figure (metric and Δ vs real fraction, one column per task).
    """

    tasks: list[Task]
    cells: list[CellRecord]
    summary: list[SummaryRow]
    growth: dict[str, GrowthCheck]
    trained: list[str]
    skipped: list[str]
    cells_path: Path
    summary_csv: Path
    summary_md: Path
    plot: Path

    @property
    def metric(self) -> str:
        """Primary metric of the first task ('auroc' or 'dice')."""
        return "auroc" if self.tasks[0] == "presence" else "dice"


def _ids_digest(data: ArraySet | None) -> str | None:
    if data is None:
        return None
    return sha256_json([data.item_ids, data.patients])


def grid_key(
    cfg: MedsynthConfig,
    train: ArraySet,
    val: ArraySet | None,
    test: ArraySet,
    pool: SyntheticPool | None,
    external: ArraySet | None = None,
) -> str:
    """Input key of the cells: everything a cell's result depends on except its own coordinates."""
    ec = cfg.experiment.model_dump(mode="json")
    for k in (
        "tasks",
        "fractions",
        "ratios",
        "seeds",
        "arms",
        "classical_ratios",
        "n_bootstrap",
        "ci",
        "bootstrap_seed",
        "predict_batch_size",
    ):
        ec.pop(k, None)
    ec["train"] = {k: v for k, v in ec["train"].items() if k not in RUNTIME_FIELDS}
    seg = cfg.segmenter.model_dump(mode="json")
    seg["train"] = {k: v for k, v in seg["train"].items() if k not in RUNTIME_FIELDS}
    seg.pop("predict_batch_size", None)
    return sha256_json(
        {
            "version": GRID_VERSION,
            "experiment": ec,
            "segmenter": seg,
            "fp_min_voxels": cfg.validation.fp_min_voxels,
            "spatial_dims": cfg.preprocess.spatial_dims,
            "pool": (pool.key or sha256_json([pool.source_items, pool.variants, len(pool)])) if pool else None,
            "train": _ids_digest(train),
            "val": _ids_digest(val),
            "test": _ids_digest(test),
            "external": _ids_digest(external),
        }
    )


def eval_subset(data: ArraySet | None, max_items: int | None) -> ArraySet | None:
    """At most ``max_items`` items spread evenly over the split (every patient stays represented where possible)."""
    if data is None or max_items is None or len(data) <= max_items:
        return data
    keep = np.unique(np.linspace(0, len(data) - 1, max_items).round().astype(np.int64))
    return data.subset([int(i) for i in keep])


def write_cell_scores(path: Path, key: str, test: ArraySet, records: list[CellRecord]) -> Path:
    """``cell_scores.json``: the test item ids/patients and each cell's per-item test scores (compact, aligned)."""
    cells = [
        {
            k: v
            for k, v in r.model_dump(mode="json").items()
            if k in ("cell", "task", "arm", "fraction", "ratio", "seed")
        }
        | {"test_scores": r.test_scores}
        for r in records
    ]
    payload = {"key": key, "test_items": test.item_ids, "test_patients": test.patients, "cells": cells}
    return write_text_atomic(path, json.dumps(payload, separators=(",", ":")) + "\n")


def sequential_map(
    work: Callable[[Cell], dict[str, Any]], cells: list[Cell], on_done: Callable[[dict[str, Any]], None]
) -> None:
    """Run cells one after another in this process (the default :data:`CellMap`)."""
    for cell in cells:
        on_done(work(cell))


def _log_convergence(tracker: Tracker, rec: CellRecord) -> None:
    c = rec.convergence
    metrics = {f"test_{k}": v for k, v in rec.metrics.items() if v is not None}
    metrics.update({"chosen_step": float(c.chosen_step), "stopped_step": float(c.stopped_step)})
    if rec.external_metrics:
        metrics.update({f"external_{k}": v for k, v in rec.external_metrics.items() if v is not None})
    tracker.log_metrics(metrics)


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
    external: ArraySet | None = None,
) -> GridResult:
    """Train and evaluate every cell of the grid; write ``cells.jsonl``, ``summary.csv``/``.md`` and the plot.

    Args:
        cfg: Resolved config (``experiment``; ``segmenter`` for the segmentation task).
        train: Real training split.
        val: Patient-level validation split (early stopping of every cell; presence: the Youden
            threshold), or None (cells train their maximum steps).
        test: The fixed patient-level test split (first ``experiment.max_eval_items`` items).
        pool: Synthetic pool from :func:`~medsynth.evaluation.pool.make_pool` (None when no cell
            uses synthetic data).
        out_dir: Output folder.
        tracker_factory: ``tracker_factory(cell_name, params)`` → context manager yielding the
            cell's tracker; the cell's params, counts, validation curve, chosen step and test metrics
            are logged to it.
        progress: Advanced once per cell (trained or skipped).
        device: Training device (default CPU).
        cell_map: ``cell_map(work, cells, on_done)`` runs ``work(cell)`` for every cell and calls
            ``on_done(record)`` as each finishes (in the calling process). Default: one after
            another here; an orchestrator passes one that fans cells out (threads, Dask, ...).
        external: External test items (another site or cohort), scored by every cell and
            reported separately; never used for training or model selection.

    Returns:
        A :class:`GridResult`.

    Raises:
        PatientLeakError: If a cell's training data (or the pool) shares a patient with the test,
            validation or external split.
    """
    ec = cfg.experiment
    set_threads(ec.train.num_threads)
    progress = progress or NullProgress()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_e = eval_subset(test, ec.max_eval_items)
    val_e = eval_subset(val, ec.convergence.max_val_items)
    ext_e = eval_subset(external, ec.max_eval_items)
    assert test_e is not None
    # fail fast, before any training: every cell draws from these patients (checked again per cell)
    evals = [("test", test), ("validation", val), ("external test", external)]
    for what, split in evals:
        if split is not None:
            check_no_leak(train.patients, split.patients, what)
            if pool is not None:
                check_no_leak(pool.source_patients, split.patients, what)
    if external is not None and val is not None:  # the validation split selects models: keep it apart too
        both = sorted(set(val.patients) & set(external.patients))
        if both:
            raise PatientLeakError(
                f"{len(both)} patient(s) are both in the validation split (model selection) and in the external "
                f"test set: {', '.join(both[:5])}"
            )
    cells = grid_cells(cfg)
    if pool is None and any(c.ratio > 0 for c in cells):
        raise ValueError("the grid has cells with synthetic data (ratio > 0) but no pool was given; run make_pool")
    if any(c.task == "presence" for c in cells):
        resolve_target_label(train.labels, ec.target_label)  # a config error before any training
    key = grid_key(cfg, train, val_e, test_e, pool, ext_e)
    cells_path = out / CELLS_FILE
    ledger = ItemLedger(cells_path, key)
    done: dict[str, CellRecord] = {}
    for name, raw in ledger.done().items():
        try:
            done[name] = CellRecord.model_validate(raw)
        except ValueError:
            log.warning("ignoring unreadable record of cell %s in %s", name, cells_path)
    trained: list[str] = []
    skipped: list[str] = []
    factory = tracker_factory or (lambda _n, _p: contextlib.nullcontext(NullTracker()))

    def work(cell: Cell) -> dict[str, Any]:
        """Train and evaluate one cell (runs wherever ``cell_map`` sends it)."""
        data = select_cell(train, pool, cell.fraction, cell.ratio, cell.seed, cell.arm)
        for what, split in evals:
            if split is not None:
                check_no_leak(data, split.patients, what)
        t0 = time.monotonic()
        with factory(cell.name, cell.params()) as tracker:
            tracker.log_params({**cell.params(), **data.info()})
            rec = run_cell(cell, data, cfg, train.labels, test_e, val_e, device, tracker, ext_e)
            _log_convergence(tracker, rec)
        rec = rec.model_copy(update={"seconds": round(time.monotonic() - t0, 3)})
        return rec.model_dump(mode="json")

    def on_done(raw: dict[str, Any]) -> None:
        """Record a finished cell at once (so an interrupted grid resumes after it)."""
        rec = CellRecord.model_validate(raw)
        ledger.record(rec.cell, raw)
        done[rec.cell] = rec
        trained.append(rec.cell)
        progress.advance(1, rec.cell)

    for cell in cells:
        if cell.name in done:
            skipped.append(cell.name)
            progress.advance(1, f"{cell.name} (recorded)")
    todo = [c for c in cells if c.name not in done]
    (cell_map or sequential_map)(work, todo, on_done)
    records = [done[c.name] for c in cells]
    write_cell_scores(out / CELL_SCORES_FILE, key, test_e, records)
    tasks = resolve_tasks(cfg)
    summary: list[SummaryRow] = []
    growth: dict[str, GrowthCheck] = {}
    for task in tasks:
        rows = summarise([r for r in records if r.task == task], test_e, task, cfg, ext_e)
        summary += rows
        growth[task] = real_only_growth(rows, task)
    csv_path, md_path = write_summary(out, summary, growth, cfg, train.labels, len(test_e), ext_e)
    plot = plot_summary(out / PLOT_FILE, summary, ec.ci)
    return GridResult(tasks, records, summary, growth, trained, skipped, cells_path, csv_path, md_path, plot)
