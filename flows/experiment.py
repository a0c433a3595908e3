"""Prefect flow for the downstream augmentation experiment: one task per grid cell.

Cells fan out through the config's task runner (threads, or Dask via prefect-dask); each cell is its
own MLflow run nested under the experiment stage run; the summary table and plot are artifacts of
the stage run. Finished cells are recorded as they complete, so an interrupted grid resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_from_json, numeric, publish_summary, task_runner
from medsynth import stages
from medsynth.tracking.base import NullTracker, Tracker
from medsynth.tracking.stage import tracked_stage


@task(name="grid-cell", cache_policy=NO_CACHE)
def cell_task(work: Callable[[Any], dict[str, Any]], cell: Any) -> dict[str, Any]:
    """Train and evaluate one grid cell."""
    return work(cell)


def prefect_cell_map(
    work: Callable[[Any], dict[str, Any]], cells: list[Any], on_done: Callable[[dict[str, Any]], None]
) -> None:
    """Submit every cell to the flow's task runner; record each result as it completes."""
    from prefect.futures import as_completed

    futures = [cell_task.submit(work, c) for c in cells]
    for fut in as_completed(futures):
        on_done(fut.result())


class CellRuns:
    """A picklable tracker factory: one MLflow run per cell, nested under the experiment stage run.

    It holds only the config and a run id, so it travels to Dask worker processes, which open their
    own connection to the tracking store.
    """

    def __init__(self, cfg_json: dict[str, Any], stage_run_id: str | None) -> None:
        self.cfg_json, self.stage_run_id = cfg_json, stage_run_id

    @contextmanager
    def __call__(self, name: str, params: dict[str, Any]) -> Iterator[Tracker]:
        """Open the cell's run (a no-op tracker when tracking is off)."""
        cfg = config_from_json(self.cfg_json)
        if self.stage_run_id is None or not cfg.tracking.enabled:
            yield NullTracker()
            return
        from medsynth.tracking.mlflow_store import MlflowSession, stage_run

        with stage_run(MlflowSession(cfg), name, self.stage_run_id) as tracker:
            assert tracker is not None
            tracker.set_tags({"medsynth.stage": "experiment-cell", **{f"cell.{k}": str(v) for k, v in params.items()}})
            yield tracker


def _experiment(cfg_json: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    cfg = config_from_json(cfg_json)
    with tracked_stage(cfg, "experiment", parent_run_id, section="experiment") as st:
        out = stages.run_experiment(cfg, tracker_factory=CellRuns(cfg_json, st.run_id), cell_map=prefect_cell_map)
        st.tracker.log_metrics(numeric(out))
        for key in ("summary_md", "summary_csv", "plot"):
            st.tracker.log_artifact(Path(out[key]), "experiment")
        publish_summary(cfg, "experiment", out, st)
    return out


@flow(name="experiment")
def experiment_flow(cfg_json: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Run the downstream grid with the config's task runner (set by :func:`run_experiment_flow`)."""
    return _experiment(cfg_json, parent_run_id)


def run_experiment_flow(cfg_json: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """The experiment flow with the task runner the config asks for (threads or Dask)."""
    cfg = config_from_json(cfg_json)
    return experiment_flow.with_options(task_runner=task_runner(cfg))(cfg_json, parent_run_id)
