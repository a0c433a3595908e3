"""One CLI command per declared stage, derived from its declaration (never written per stage).

``medsynth <stage> -c CONFIG`` (or ``medsynth train <stage>`` for training stages) runs the stage
after everything it needs, each stage skipped when up to date — the same :func:`run_stage` as the
Prefect flows. The stage's ``options`` model becomes command-line options (field name, type, default
and docstring).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer

from medsynth.pipeline.declare import Stage

ConfigArg = Annotated[Path, typer.Option("--config", "-c", help="YAML config file (see configs/).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set preprocess.spacing=[1,1,1] (repeatable)."),
]
DeviceOpt = Annotated[str | None, typer.Option(help="Torch device (default: cuda if available, else cpu).")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the latest checkpoint.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run the stage even when its outputs are up to date.")]


def _option_params(stage: Stage) -> list[inspect.Parameter]:
    if stage.options is None:
        return []
    out = []
    for name, field in stage.options.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = field.description or ""
        annotation = Annotated[field.annotation, typer.Option(flag, help=help_)]  # type: ignore[name-defined]
        out.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=annotation)
        )
    return out


def _echo_outcome(outcome: Any) -> None:
    res = outcome.result
    if res is None:
        typer.echo(f"{outcome.stage}: disabled by the config")
        return
    state = "up to date (cached)" if outcome.cached else "done"
    typer.echo(f"{outcome.stage}: {state}")
    if res.message:
        typer.echo(res.message)
    for k, v in res.metrics.items():
        typer.echo(f"  {k} = {v:.4g}")
    for k, v in res.outputs.items():
        typer.echo(f"  {k}: {v}")
    if outcome.model_uri:
        typer.echo(f"  model: {outcome.model_uri}")
    md = res.outputs.get("summary_md")
    if md and Path(md).is_file():
        typer.echo(Path(md).read_text(encoding="utf-8"))


def stage_command(
    stage: Stage,
    load: Callable[[Path, list[str] | None], Any],
    progress_for: Callable[[int, str], AbstractContextManager[Any]],
) -> Callable[..., None]:
    """The Typer command of one stage: config, overrides, device, resume, force, plus the stage's options."""

    def command(
        config: Path,
        set_: list[str] | None = None,
        device: str | None = None,
        resume: bool = True,
        force: bool = False,
        **options: Any,
    ) -> None:
        from medsynth.pipeline import run_with_upstream

        opts = stage.options(**options) if stage.options is not None else None
        extra = list(set_ or [])
        if opts is not None and hasattr(opts, "overrides"):
            extra += opts.overrides()
        cfg = load(config, extra)

        def progress(s: Stage) -> AbstractContextManager[Any]:
            return progress_for(s.progress_total(cfg) if s.progress_total else 0, s.name)

        if opts is not None and getattr(opts, "standalone", lambda: False)():
            from medsynth.pipeline import run_stage

            with progress(stage) as prog:
                outcomes = {stage.name: run_stage(cfg, stage.name, options=opts, progress=prog, device=device)}
        else:
            outcomes = run_with_upstream(
                cfg, stage.name, options=opts, progress_for=progress, device=device, resume=resume, force=force
            )
        for name, outcome in outcomes.items():
            if name != stage.name:
                typer.echo(f"{name}: {'up to date' if outcome.cached else 'done'}")
        _echo_outcome(outcomes[stage.name])

    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=ConfigArg),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SetOpt),
        inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=DeviceOpt),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=ResumeOpt),
        inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=ForceOpt),
        *_option_params(stage),
    ]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = stage.help + (
        f"\n\nRuns after: {', '.join(stage.after)} (each skipped when up to date)." if stage.after else ""
    )
    command.__name__ = f"{stage.name}_cmd"
    return command


def add_stage_commands(
    app: typer.Typer,
    groups: dict[str, typer.Typer],
    load: Callable[[Path, list[str] | None], Any],
    progress_for: Callable[[int, str], AbstractContextManager[Any]],
) -> None:
    """Register a command for every declared stage that has a ``cli`` path."""
    from medsynth.pipeline import stage_order

    for stage in stage_order():
        if stage.cli is None:
            continue
        *group, name = stage.cli
        target = groups[group[0]] if group else app
        target.command(name, help=stage.help)(stage_command(stage, load, progress_for))
