"""The stage graph: every declared stage, in pipeline order, and the order of a sub-graph."""

from __future__ import annotations

from medsynth.errors import ConfigError
from medsynth.pipeline.declare import Stage

STAGES: dict[str, Stage] = {}
"""Declared stages by name, in declaration (= pipeline) order."""


def register_stage(stage: Stage) -> Stage:
    """Add a declaration to the graph (its upstream stages must be declared first)."""
    missing = [u for u in stage.after if u not in STAGES]
    if missing:
        raise ValueError(f"stage {stage.name!r} runs after undeclared stage(s) {missing}")
    STAGES[stage.name] = stage
    return stage


def unregister_stage(name: str) -> None:
    """Remove a declaration (tests that declare their own stages clean up with this)."""
    STAGES.pop(name, None)


def get_stage(name: str) -> Stage:
    """The declaration of a stage; a one-line error naming the known stages otherwise."""
    _load_builtin()
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError("pipeline", f"unknown stage {name!r}", hint=f"known stages: {', '.join(STAGES)}") from None


def stage_order(pipeline_only: bool = False) -> list[Stage]:
    """Every declared stage in pipeline order (declaration order is a topological order).

    Args:
        pipeline_only: Leave out on-demand stages (``in_pipeline=False``, e.g. ``export``).
    """
    _load_builtin()
    return [s for s in STAGES.values() if s.in_pipeline or not pipeline_only]


def upstream_closure(name: str) -> list[Stage]:
    """A stage and everything it depends on, in pipeline order."""
    need: set[str] = set()
    pending = [name]
    while pending:
        s = get_stage(pending.pop())
        if s.name not in need:
            need.add(s.name)
            pending.extend(s.after)
    return [s for s in stage_order() if s.name in need]


def _load_builtin() -> None:
    import medsynth.pipeline.stages  # noqa: F401  (declares the built-in stages on first import)
