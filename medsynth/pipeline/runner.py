"""Run a declared stage: key, up-to-date check, tracking, stamp — the same for every stage.

The CLI, the Prefect flows and tests all run stages through :func:`run_stage`, so a stage behaves the
same however it is started. A stage whose stamp carries the current key (and whose outputs still
have the recorded digest) is not run again: its MLflow run is tagged ``medsynth.cached=true``, links
the run that computed it (``medsynth.computed_by``) and shows that run's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from medsynth.config.schema import MedsynthConfig
from medsynth.errors import MedsynthError
from medsynth.pipeline.declare import ChildRuns, FanOut, Stage, StageResult, StageRun, sequential
from medsynth.pipeline.keys import (
    Stamp,
    clear_stamp,
    compute_key,
    now_iso,
    read_stamp,
    result_digest,
    sections,
    write_stamp,
)
from medsynth.pipeline.registry import get_stage, upstream_closure
from medsynth.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOutcome:
    """What running (or skipping) a stage gave.

    Attributes:
        stage: Stage name.
        key: Its input key.
        result: The typed result (None when the stage is disabled by the config).
        cached: True when the outputs were up to date and nothing ran.
        run_id: The MLflow run of this execution (None when tracking is off).
        computed_by: The MLflow run that computed the outputs (this run when not cached).
        model_uri: The registered model version of the outputs, if any.
    """

    stage: str
    key: str
    result: StageResult | None
    cached: bool
    run_id: str | None = None
    computed_by: str | None = None
    model_uri: str | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON summary (what flows pass on and the pipeline summary file records)."""
        res = self.result.model_dump(mode="json") if self.result is not None else None
        return {
            "stage": self.stage,
            "cached": self.cached,
            "skipped": self.result is None,
            "key": self.key,
            "run_id": self.run_id,
            "computed_by": self.computed_by,
            "model_uri": self.model_uri,
            "result": res,
        }


def stage_root(cfg: MedsynthConfig) -> Path:
    """``<output_dir>/<config name>``: every stage's folder lives below it."""
    return Path(cfg.output_dir) / cfg.name


def upstream_fingerprints(cfg: MedsynthConfig, stage: Stage) -> dict[str, str]:
    """The fingerprint of each upstream stage; a one-line error when one never finished."""
    root = stage_root(cfg)
    out: dict[str, str] = {}
    for name in stage.after:
        up = get_stage(name)
        if not up.enabled(cfg):
            out[name] = "off"
            continue
        stamp = read_stamp(root, up)
        if stamp is None:
            raise MedsynthError(
                f"{root / up.folder_name}: stage {stage.name!r} needs the outputs of stage {name!r}, which never "
                f"finished (hint: run `medsynth run <config>`, or the {name!r} stage first)"
            )
        out[name] = stamp.fingerprint
    return out


def stage_key(cfg: MedsynthConfig, name: str) -> str:
    """The current input key of a stage (its upstream stages must have finished)."""
    stage = get_stage(name)
    return compute_key(cfg, stage, upstream_fingerprints(cfg, stage))


def is_up_to_date(cfg: MedsynthConfig, name: str) -> bool:
    """True when a stage would not run again (stamp key = current key, outputs unchanged)."""
    stage = get_stage(name)
    try:
        key = stage_key(cfg, name)
    except MedsynthError:
        return False
    return _valid_stamp(cfg, stage, key) is not None


def stale_stages(cfg: MedsynthConfig) -> list[str]:
    """The stages a pipeline run would execute now: their own key changed, or a stage they need will run.

    Disabled stages are never stale. This is what ``medsynth status`` shows, computed without running
    anything.
    """
    from medsynth.pipeline.registry import stage_order

    stale: list[str] = []
    for stage in stage_order(pipeline_only=True):
        if not stage.enabled(cfg):
            continue
        if set(stage.after) & set(stale) or not is_up_to_date(cfg, stage.name):
            stale.append(stage.name)
    return stale


def _valid_stamp(cfg: MedsynthConfig, stage: Stage, key: str) -> Stamp | None:
    root = stage_root(cfg)
    stamp = read_stamp(root, stage)
    if stamp is None or stamp.key != key:
        return None
    if stage.digest is not None:
        probe = StageRun(cfg, stage, key, root)
        try:
            if stage.digest(probe) != stamp.digest:
                return None
        except (OSError, ValueError, MedsynthError):
            return None
    return stamp


def _params(cfg: MedsynthConfig, stage: Stage) -> dict[str, Any]:
    from medsynth.config.loader import flatten

    return flatten(sections(cfg, stage))


def run_stage(
    cfg: MedsynthConfig,
    name: str,
    *,
    options: BaseModel | None = None,
    resume: bool = True,
    device: str | None = None,
    progress: Progress | None = None,
    parent_run_id: str | None = None,
    track: bool = True,
    fan_out: FanOut = sequential,
    child_runs: Callable[[MedsynthConfig, str | None], ChildRuns] | None = None,
    force: bool = False,
) -> StageOutcome:
    """Run one declared stage unless its outputs are up to date.

    Args:
        cfg: Resolved config.
        name: Stage name.
        options: The stage's own options (an instance of its ``options`` model).
        resume: Continue from checkpoints / item ledgers with the same key.
        device: Torch device (None: CUDA if available, else CPU).
        progress: Progress reporter handed to the stage.
        parent_run_id: MLflow run to nest the stage run under (the pipeline's); None: a top-level run.
        track: Record an MLflow stage run (when the config's tracking is enabled).
        fan_out: How independent items run (sequentially, or through Prefect's task runner).
        child_runs: Factory ``(cfg, stage_run_id) -> ChildRuns`` for tracked child runs (grid cells).
        force: Run even when up to date.

    Returns:
        A :class:`StageOutcome`.
    """
    from medsynth.locking import config_run

    with config_run(cfg):  # the only writer of this config's outputs (re-entrant within a process)
        return _run_stage(
            cfg, name, options, resume, device, progress, parent_run_id, track, fan_out, child_runs, force
        )


def _run_stage(
    cfg: MedsynthConfig,
    name: str,
    options: BaseModel | None,
    resume: bool,
    device: str | None,
    progress: Progress | None,
    parent_run_id: str | None,
    track: bool,
    fan_out: FanOut,
    child_runs: Callable[[MedsynthConfig, str | None], ChildRuns] | None,
    force: bool,
) -> StageOutcome:
    from medsynth.tracking.stage import StageTracking, tracked_stage

    stage = get_stage(name)
    root = stage_root(cfg)
    if stage.options is not None and options is None:
        options = stage.options()
    if not stage.enabled(cfg):
        log.info("stage %s: disabled by the config", name)
        return StageOutcome(name, "off", None, cached=True)
    managed = stage.is_managed(options)
    # an ad hoc run (e.g. synthesis into a folder of the user's, or from a registered model) is not
    # the pipeline's output: it is neither cached nor stamped, and needs no finished upstream stages
    key = compute_key(cfg, stage, upstream_fingerprints(cfg, stage)) if managed else "ad-hoc"
    stamp = _valid_stamp(cfg, stage, key) if managed and not force else None
    tracking: AbstractContextManager[StageTracking] = (
        tracked_stage(cfg, name, parent_run_id, _params(cfg, stage))
        if track and cfg.tracking.enabled
        else nullcontext(StageTracking())
    )
    with tracking as st:
        if stamp is not None:
            result = stage.result.model_validate(stamp.result)
            st.set_tags({"medsynth.cached": "true", "medsynth.key": key})
            if stamp.computed_by:
                st.set_tags({"medsynth.computed_by": stamp.computed_by})
            st.mirror_metrics(stamp.computed_by, result.metrics, step=result.step)
            log.info("stage %s: up to date (key %s), nothing to do", name, key[:12])
            return StageOutcome(name, key, result, True, st.run_id, stamp.computed_by, stamp.model_uri)
        if managed:
            clear_stamp(root, stage)
        run = StageRun(
            cfg,
            stage,
            key,
            root,
            tracker=st.tracker,
            device=device,
            resume=resume,
            options=options,
            fan_out=fan_out,
        )
        if progress is not None:
            run.progress = progress
        if child_runs is None and st.run_id is not None:
            from medsynth.tracking.stage import ChildRunFactory

            run.child_runs = ChildRunFactory(cfg, st.run_id)
        elif child_runs is not None:
            run.child_runs = child_runs(cfg, st.run_id)
        result = stage.fn(run)
        if not isinstance(result, stage.result):
            raise TypeError(f"stage {name!r} returned {type(result).__name__}, not {stage.result.__name__}")
        st.set_tags({"medsynth.cached": "false", "medsynth.key": key})
        if st.run_id:
            st.set_tags({"medsynth.computed_by": st.run_id})
        st.tracker.log_metrics(result.metrics, step=result.step)
        for ds in getattr(result, "datasets", []):
            st.log_dataset(ds["name"], ds["source"], ds["digest"], ds["context"])
        for folder, paths in result.artifacts.items():
            for p in paths:
                st.tracker.log_artifact(Path(p), folder)
        model_uri = st.register(stage.register, result.model) if stage.register and result.model else None
        if managed:
            data = result.model_dump(mode="json")
            digest = stage.digest(run) if stage.digest is not None else result_digest(data)
            write_stamp(
                root,
                stage,
                Stamp(
                    stage=name,
                    version=stage.version,
                    key=key,
                    digest=digest,
                    result=data,
                    computed_by=st.run_id,
                    model_uri=model_uri,
                    finished=now_iso(),
                ),
            )
        return StageOutcome(name, key, result, False, st.run_id, st.run_id, model_uri)


def run_with_upstream(
    cfg: MedsynthConfig,
    name: str,
    *,
    options: BaseModel | None = None,
    progress_for: Callable[[Stage], AbstractContextManager[Progress]] | None = None,
    force: bool = False,
    **kwargs: Any,
) -> dict[str, StageOutcome]:
    """Run a stage after every stage it depends on (each skipped when up to date), like ``make``.

    Args:
        cfg: Resolved config.
        name: The target stage.
        options: The target stage's options.
        progress_for: Makes the progress reporter of each stage run (e.g. a bar with the stage's steps).
        force: Run the target stage even when it is up to date (its upstream stages only when needed).
        **kwargs: Passed to :func:`run_stage` for every stage.

    Returns:
        Outcome per stage, in pipeline order.
    """
    out: dict[str, StageOutcome] = {}
    for stage in upstream_closure(name):
        ctx = progress_for(stage) if progress_for is not None else nullcontext(None)
        with ctx as prog:
            out[stage.name] = run_stage(
                cfg,
                stage.name,
                options=options if stage.name == name else None,
                progress=prog,
                force=force and stage.name == name,
                **kwargs,
            )
    return out
