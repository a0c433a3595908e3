"""Every declared stage as a Prefect task (or subflow), derived from its declaration.

A stage without independent items runs as one task with one retry for transient failures (never
for medsynth's own input/config errors). A stage that fans out items (preprocessing chunks, grid
cells) runs as a subflow with the config's task runner (threads, or Dask through prefect-dask); each
item is a task with the same retry rule. Nothing here is written per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_from_json, publish_summary, task_runner
from medsynth.config.loader import load_config
from medsynth.errors import MedsynthError
from medsynth.pipeline import get_stage, run_stage, upstream_closure
from medsynth.pipeline.declare import sequential


def transient(task_: Any, run: Any, state: Any) -> bool:
    """Retry condition: retry anything but medsynth's own input/config errors."""
    try:
        state.result()
    except MedsynthError:
        return False
    except Exception:
        return True
    return False


@task(name="stage-item", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def item_task(work: Callable[[Any], Any], item: Any) -> Any:
    """One independent item of a stage (a chunk of cases, a grid cell)."""
    return work(item)


def prefect_fan_out(work: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
    """Submit every item to the flow's task runner; yield each result as it completes."""
    from prefect.futures import as_completed

    futures = [item_task.submit(work, i) for i in items]
    for fut in as_completed(futures):
        yield fut.result()


def _run(name: str, cfg_json: dict[str, Any], parent_run_id: str | None, options: dict[str, Any] | None) -> Any:
    cfg = config_from_json(cfg_json)
    stage = get_stage(name)
    opts = stage.options.model_validate(options) if stage.options is not None and options is not None else None
    fan_out = prefect_fan_out if stage.fan_out else sequential
    outcome = run_stage(cfg, name, options=opts, parent_run_id=parent_run_id, fan_out=fan_out)
    summary = outcome.summary()
    publish_summary(cfg, name, summary)
    return summary


@task(name="stage", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def stage_task(
    name: str, cfg_json: dict[str, Any], parent_run_id: str | None = None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one declared stage (skipped when its outputs are up to date)."""
    out: dict[str, Any] = _run(name, cfg_json, parent_run_id, options)
    return out


@flow(name="stage")
def stage_subflow(
    name: str, cfg_json: dict[str, Any], parent_run_id: str | None = None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one declared stage whose items fan out through this flow's task runner."""
    out: dict[str, Any] = _run(name, cfg_json, parent_run_id, options)
    return out


def run_stage_prefect(
    name: str, cfg_json: dict[str, Any], parent_run_id: str | None = None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A declared stage as its Prefect task, or as a subflow with the config's task runner when it fans out."""
    stage = get_stage(name)
    if stage.fan_out:
        sub = stage_subflow.with_options(name=f"stage-{name}", task_runner=task_runner(config_from_json(cfg_json)))
        out: dict[str, Any] = sub(name, cfg_json, parent_run_id, options)
        return out
    out = stage_task.with_options(name=f"stage-{name}")(name, cfg_json, parent_run_id, options)
    return out


@flow(name="medsynth-stage")
def stage_flow(config_path: str, stage: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """One stage and everything it needs (each skipped when up to date), as a deployable flow."""
    cfg = load_config(config_path, overrides or [])
    cfg_json = cfg.model_dump(mode="json")
    return {s.name: run_stage_prefect(s.name, cfg_json) for s in upstream_closure(stage)}
