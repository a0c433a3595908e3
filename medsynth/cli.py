"""The ``medsynth`` command line: one command with grouped subcommands.

Every subcommand calls the same library functions as the Prefect flows in ``flows/``. Heavy
imports (torch, MONAI, Prefect) happen inside the commands so that ``medsynth --help`` is instant.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from medsynth.errors import ConfigError, MedsynthError

app = typer.Typer(
    name="medsynth",
    help="Mask-conditioned MRI synthesis: check and preprocess data, train a ControlNet latent diffusion "
    "model, synthesise image/mask pairs, validate them, and run augmentation experiments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Dataset tools: quality checks and the built-in phantom dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")
train_app = typer.Typer(
    help="Train the generative models: autoencoder -> latents -> diffusion UNet -> ControlNet.", no_args_is_help=True
)
app.add_typer(train_app, name="train")
config_app = typer.Typer(help="Configuration: show a resolved config, print the reference.", no_args_is_help=True)
app.add_typer(config_app, name="config")

_STATE: dict[str, Any] = {"verbose": False}

ConfigArg = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config file, or the name of a shipped config (demo, lgg-2d, ...).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set preprocess.spacing=[1,1,1] (repeatable)."),
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "alembic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _version(value: bool) -> None:
    if value:
        from medsynth.provenance import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _STATE["verbose"] = verbose
    _setup_logging(verbose)


def _load(config: Path | None, overrides: list[str] | None) -> Any:
    from medsynth.config import load_config
    from medsynth.config.shipped import resolve_config

    return load_config(resolve_config(config), overrides or [])


def _exclusive(cfg: Any) -> Any:
    """The config's output lock + recovery of a killed run (:func:`medsynth.locking.config_run`)."""
    from medsynth.locking import config_run

    return config_run(cfg)


@data_app.command("check")
def data_check(
    target: Annotated[str, typer.Argument(help="A YAML config, or a dataset folder / CSV manifest.")],
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default <output_dir>/<name>/qc).")] = None,
    labels: Annotated[
        str | None, typer.Option(help="For a bare dataset path: label vocabulary, e.g. '0:background,1:tumour'.")
    ] = None,
    remap: Annotated[str | None, typer.Option(help="For a bare dataset path: value remapping, e.g. '255:1'.")] = None,
) -> None:
    """Check every image/mask pair and write a QC report (JSON, Markdown summary, PNG overlays)."""
    from medsynth.config.loader import validate_config
    from medsynth.config.schema import MedsynthConfig
    from medsynth.data.qc_report import REPORT_MD, enforce_policy, run_check
    from medsynth.progress import progress_for

    if target.endswith((".yaml", ".yml")):
        cfg = _load(Path(target), set_)
    else:
        data: dict[str, Any] = {"root": target}
        if labels:
            data["labels"] = {int(k): v for k, v in (p.split(":", 1) for p in labels.split(","))}
        if remap:
            data["label_remap"] = {int(k): int(v) for k, v in (p.split(":", 1) for p in remap.split(","))}
        from medsynth.config.loader import apply_overrides

        raw = apply_overrides({"name": Path(target).stem or "dataset", "data": data}, set_ or [])
        cfg = validate_config(raw, "command line", MedsynthConfig)
    out_dir = out or Path(cfg.output_dir) / cfg.name / "qc"
    from medsynth.data.layouts import discover

    n = len(discover(cfg.data).cases)
    with progress_for(n, "checking") as prog:
        report = run_check(cfg, out_dir, prog)
    orphans = f", {len(report.orphan_masks)} masks without an image" if report.orphan_masks else ""
    typer.echo(f"{report.n_cases} cases, {report.n_bad} bad{orphans}; report: {out_dir / REPORT_MD}")
    if report.labels is not None:
        names = ", ".join(f"{k}={v}" for k, v in sorted(report.labels.items()))
        typer.echo(f"labels: {names} ({report.labels_detail})")
    enforce_policy(report)


@data_app.command("phantom")
def data_phantom(
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    dim: Annotated[int, typer.Option(help="2: per-patient PNG slices; 3: MSD-style NIfTI volumes.")] = 2,
    n: Annotated[int, typer.Option(help="Number of patients.")] = 24,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    size: Annotated[int, typer.Option(help="In-plane size in voxels.")] = 64,
    slices_per_patient: Annotated[int, typer.Option(help="2D: slices per patient.")] = 8,
    lesion_probability: Annotated[float, typer.Option(help="Probability that a patient has a lesion.")] = 0.6,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Generate the procedural brain phantom dataset (labels: background, CSF, GM, WM, lesion)."""
    from medsynth.data.phantom import write_phantom_dataset

    path = write_phantom_dataset(
        out,
        dim=dim,
        n=n,
        seed=seed,
        size=size,
        slices_per_patient=slices_per_patient,
        lesion_probability=lesion_probability,
        overwrite=overwrite,
    )
    typer.echo(f"phantom dataset written to {path}")


@app.command("plan")
def plan_cmd(
    data: Annotated[str, typer.Argument(help="Dataset folder or CSV manifest.")],
    out: Annotated[
        Path | None, typer.Option(help="Planned config (default <output-dir>/<name>/plan/<name>.yaml).")
    ] = None,
    device: Annotated[str, typer.Option(help="Target device: cpu or cuda.")] = "cpu",
    memory_gib: Annotated[float | None, typer.Option(help="Memory to plan batch sizes for (CPU 8, CUDA 16).")] = None,
    budget_min: Annotated[
        float | None, typer.Option(help="Training time budget in minutes (CPU 60, CUDA 240).")
    ] = None,
    max_cases: Annotated[int, typer.Option(help="Cases read for the fingerprint (a seeded sample).")] = 64,
    set_: SetOpt = None,
) -> None:
    """Fingerprint a dataset and write a commented config sized for a device, memory and time budget."""
    from medsynth.config.data import DataConfig
    from medsynth.config.loader import apply_overrides, validate_config
    from medsynth.data.fingerprint import fingerprint, safe_name, write_fingerprint
    from medsynth.planning import plan_config, write_plan
    from medsynth.progress import progress_for

    if device not in ("cpu", "cuda"):
        raise ConfigError("command line", f"--device must be cpu or cuda (got {device!r})")
    raw = apply_overrides({"root": data}, [s.removeprefix("data.") for s in set_ or []])
    data_cfg = validate_config(raw, "command line", DataConfig)
    name = safe_name(data)
    target = out or Path("outputs") / name / "plan" / f"{name}.yaml"
    if target.exists():
        raise MedsynthError(f"{target}: output already exists (choose another --out)")
    with progress_for(max_cases, "fingerprinting") as prog:
        fp = fingerprint(data_cfg, max_cases=max_cases, progress=prog)
    js, md = write_fingerprint(fp, target.parent)
    the_plan = plan_config(fp, device, memory_gib, budget_min, name=name)  # type: ignore[arg-type]
    write_plan(the_plan, target)
    typer.echo(f"fingerprint: {js} and {md}")
    for p in fp["problems"]:
        typer.echo(f"suspected problem: {p}")
    for w in the_plan.warnings:
        typer.secho(f"warning: {w}", fg="yellow")
    typer.echo(f"config: {target}  (next: medsynth data check {target}; medsynth run {target})")


@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    import yaml

    typer.echo(yaml.safe_dump(_load(config, set_).model_dump(mode="json"), sort_keys=False))


@config_app.command("reference")
def config_reference_cmd(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the configuration reference generated from the pydantic models (docs/configuration.md)."""
    from medsynth.config.reference import config_reference
    from medsynth.fileio import write_text_atomic

    text = config_reference()
    if out:
        write_text_atomic(out, text)
    else:
        typer.echo(text)


DeviceOpt = Annotated[str | None, typer.Option(help="Torch device (default: cuda if available, else cpu).")]


def _progress_for(total: int, desc: str) -> Any:
    from medsynth.progress import progress_for

    return progress_for(total, desc)


def _add_stage_commands() -> None:
    from medsynth.cli_stages import add_stage_commands

    add_stage_commands(app, {"train": train_app}, _load, _progress_for)


_add_stage_commands()


@app.command("status")
def status_cmd(config: ConfigArg, set_: SetOpt = None) -> None:
    """Every stage of the pipeline for a config: up to date, or what would run (and why)."""
    from medsynth.pipeline import stage_order
    from medsynth.pipeline.keys import read_stamp
    from medsynth.pipeline.runner import is_up_to_date, stage_root, stale_stages

    cfg = _load(config, set_)
    root = stage_root(cfg)
    stale = set(stale_stages(cfg))
    for stage in stage_order(pipeline_only=True):
        stamp = read_stamp(root, stage)
        if not stage.enabled(cfg):
            state = "disabled by the config"
        elif stage.name not in stale:
            state = f"up to date (finished {stamp.finished if stamp else '?'})"
        elif stamp is None:
            state = "never finished: would run"
        elif is_up_to_date(cfg, stage.name):
            state = "an upstream stage will run: would run after it"
        else:
            state = "inputs changed (config section, code version or upstream outputs): would run"
        typer.echo(f"{stage.name:<12} {root / stage.folder_name!s:<50} {state}")


@app.command("promote")
def promote_cmd(
    config: ConfigArg,
    alias: Annotated[str, typer.Option(help="Registry alias to set.")] = "champion",
    version: Annotated[str | None, typer.Option(help="Version (default: newest with the validated weights).")] = None,
    min_dice_ratio: Annotated[float, typer.Option(help="Lowest Dice ratio synthetic/real of any label.")] = 0.5,
    max_memorised: Annotated[float, typer.Option(help="Highest fraction of images flagged as memorised.")] = 0.05,
    set_: SetOpt = None,
) -> None:
    """Set a registry alias (models:/<name>@<alias>) on the generator once its validation report passes."""
    from medsynth.pipeline.promote import promote

    done = promote(_load(config, set_), alias, version, min_dice_ratio, max_memorised)
    checks = ", ".join(f"{k}={v}" for k, v in done.checks.items())
    typer.echo(f"{done.uri} -> version {done.version} ({checks})")


@app.command("ui")
def ui_cmd(
    config: Annotated[Path | None, typer.Argument(help="Config whose store to serve (default: the demo).")] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Start the MLflow UI on loopback for the project's tracking store and print its address.

    Ctrl-C / SIGTERM stop the server (forwarded to it); with no store where the config puts it, the
    command says where it looked and exits non-zero.
    """
    from medsynth.tracking.server import SERVER_ENV, run_forwarding, ui_command

    cfg = _load(config, [])
    cmd = ui_command(cfg, port)
    typer.echo(f"MLflow UI for {cmd[cmd.index('--backend-store-uri') + 1]}: http://127.0.0.1:{port}  (Ctrl-C to stop)")
    rc = run_forwarding(cmd, {**os.environ, **SERVER_ENV})
    if rc:
        raise typer.Exit(rc)


@app.command("server")
def server_cmd(
    backend_store_uri: Annotated[
        str, typer.Option(help="Tracking + registry database, e.g. postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow.")
    ],
    artifacts_destination: Annotated[
        Path, typer.Option(help="Folder where the server stores artifacts (served to clients through it).")
    ] = Path("mlartifacts-server"),
    host: Annotated[str, typer.Option(help="Interface to bind (loopback; use a TLS reverse proxy for a team).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 2,
    auth_db_uri: Annotated[
        str | None, typer.Option(help="Users/permissions database (default: the backend store).")
    ] = None,
    default_permission: Annotated[
        str, typer.Option(help="Permission of logged-in users on others' resources: READ, EDIT, NO_PERMISSIONS.")
    ] = "READ",
    allowed_hosts: Annotated[
        str | None, typer.Option(help="Comma-separated Host headers accepted (the proxy's public name).")
    ] = None,
) -> None:
    """Start the team tracking server: MLflow with a database store, served artifacts and basic-auth logins.

    The admin password comes from $MLFLOW_AUTH_ADMIN_PASSWORD (never the command line); see docs/scaling.md.
    """
    import tempfile

    from medsynth.tracking.server import (
        LOOPBACK,
        run_forwarding,
        team_server_command,
        team_server_env,
        write_auth_config,
    )

    if host not in LOOPBACK:
        typer.secho(f"warning: binding {host}: serve it only behind a TLS reverse proxy (docs/scaling.md)", err=True)
    with tempfile.TemporaryDirectory(prefix="medsynth-auth-") as tmp:
        ini = write_auth_config(Path(tmp) / "auth.ini", auth_db_uri or backend_store_uri, "admin", default_permission)
        env = team_server_env(ini)
        cmd = team_server_command(backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts)
        typer.echo(f"MLflow team server on http://{host}:{port} (basic auth; Ctrl-C to stop)")
        rc = run_forwarding(cmd, env)
    if rc:
        raise typer.Exit(rc)


@app.command("runs")
def runs_cmd(
    config: Annotated[Path | None, typer.Argument(help="Config whose runs to list (default: the demo).")] = None,
) -> None:
    """Print the latest finished pipeline run of a config: its stage runs, wall times, key metrics and models."""
    from medsynth.pipeline import stage_order
    from medsynth.tracking.mlflow_store import tracking_uri
    from medsynth.tracking.query import load_pipeline

    cfg = _load(config, [])
    rec = load_pipeline(tracking_uri(cfg), cfg.tracking.experiment or cfg.name)
    p = rec.parent
    typer.echo(f"experiment {rec.experiment} ({rec.tracking_uri})")
    typer.echo(f"pipeline {p.name}  run {p.run_id}  {p.status}  {p.wall_s or 0:.0f} s")
    order = {s.name: i for i, s in enumerate(stage_order())}
    for name, r in sorted(rec.stages.items(), key=lambda kv: order.get(kv[0], len(order))):
        own = "" if r.tags.get("mlflow.parentRunId") == p.run_id else "  (computed by an earlier execution)"
        keys = [k for k in sorted(r.metrics) if "/" in k][:4]
        metrics = ", ".join(f"{k}={r.metrics[k]:.4g}" for k in keys)
        typer.echo(f"  {name:<12} run {r.run_id}  {r.wall_s or 0:7.1f} s  {metrics}{own}")
    if rec.cells:
        typer.echo(f"  experiment grid: {len(rec.cells)} cell runs")
    for m in rec.models:
        typer.echo(f"  model {m}")


@app.command("report")
def report_cmd(
    config: Annotated[
        list[Path] | None, typer.Option("--config", "-c", help="Config whose latest finished pipeline to report.")
    ] = None,
    experiment: Annotated[
        list[str] | None, typer.Option("--experiment", "-e", help="MLflow experiment name (with --tracking-uri).")
    ] = None,
    tracking_uri_: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="Store of --experiment (default: $MLFLOW_TRACKING_URI or outputs/)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("whitepaper"),
    bench_dir: Annotated[Path | None, typer.Option(help="Benchmark results to include (sampler trade-off).")] = Path(
        "benchmarks/results"
    ),
    skip_missing: Annotated[
        bool, typer.Option(help="Leave out experiments without a finished pipeline run instead of failing.")
    ] = False,
) -> None:
    """Build the whitepaper (Markdown + HTML + figures) from the tracked runs of one or more pipelines."""
    from medsynth.report.whitepaper import build_whitepaper
    from medsynth.tracking.mlflow_store import tracking_uri

    targets: list[tuple[str, str]] = []
    for c in config or []:
        cfg = _load(c, [])
        targets.append((tracking_uri(cfg), cfg.tracking.experiment or cfg.name))
    default_uri = tracking_uri_ or os.environ.get("MLFLOW_TRACKING_URI")
    if default_uri is None:
        default_uri = f"sqlite:///{(Path('outputs') / 'mlflow.db').resolve()}"
    targets += [(default_uri, e) for e in experiment or []]
    if not targets:
        raise ConfigError(
            "command line", "nothing to report", hint="pass --config configs/<name>.yaml or --experiment <name>"
        )
    uris = {u for u, _ in targets}
    if len(uris) > 1:
        raise MedsynthError(f"the experiments live in different stores: {sorted(uris)}")
    command = "medsynth report " + " ".join(sys.argv[2:])
    md = build_whitepaper(
        uris.pop(), [e for _, e in targets], out, bench_dir, command=command, skip_missing=skip_missing
    )
    typer.echo(f"whitepaper: {md}")


@app.command("run")
def run(
    config: Annotated[Path | None, typer.Argument(help="Pipeline config (default: the phantom demo).")] = None,
    set_: SetOpt = None,
) -> None:
    """Run the orchestrated pipeline (a Prefect flow); with no config, the demo on the built-in phantom."""
    import importlib

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from medsynth.config.shipped import resolve_config

    cfg_path = resolve_config(config)
    cfg = _load(cfg_path, set_)  # fail fast on config errors, before Prefect starts
    with _exclusive(cfg):  # and on a run of the same config in progress (the flow takes the lock again)
        pipeline = importlib.import_module("flows.pipeline")
        result = pipeline.pipeline_flow(str(cfg_path), list(set_ or []))
    typer.echo(f"pipeline finished: {result}")


def main() -> None:
    """Console entry point: run the app, turning expected errors into one line plus a hint."""
    try:
        app()
    except MedsynthError as exc:
        if _STATE["verbose"]:
            raise
        typer.secho(f"error: {exc}", err=True, fg="red")
        if getattr(exc, "hint", ""):
            typer.secho(f"hint: {exc.hint}", err=True)
        typer.secho("(run with --verbose for the full traceback)", err=True, dim=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
