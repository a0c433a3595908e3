"""A stage declared in this file gets caching, a CLI command, a Prefect task and an MLflow run from its
declaration alone; a changed config section re-runs exactly the stages that depend on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsynth.config.loader import load_config
from medsynth.config.schema import MedsynthConfig
from medsynth.pipeline import Stage, StageResult, StageRun, register_stage, run_stage, stage_order
from medsynth.pipeline.registry import unregister_stage
from medsynth.pipeline.runner import stale_stages

CALLS: list[str] = []


def _work(run: StageRun) -> StageResult:
    """A toy stage: writes one file from its sections, counts its calls."""
    CALLS.append(run.stage.name)
    run.out.mkdir(parents=True, exist_ok=True)
    value = float(len(CALLS))
    (run.out / "value.txt").write_text(f"{value}\n", encoding="utf-8")
    return StageResult(metrics={f"{run.stage.name}/value": value}, outputs={"value": str(run.out / "value.txt")})


TOYS = ("toy_a", "toy_b", "toy_c")


@pytest.fixture
def toys() -> Iterator[None]:
    """Three declared stages: a reads qc; b reads sampling and runs after a; c reads synthesis alone."""
    stage_order()  # the built-in stages first
    register_stage(Stage("toy_a", _work, reads=("qc",), cli=("toy-a",), help="toy a"))
    register_stage(Stage("toy_b", _work, reads=("sampling",), after=("toy_a",), cli=("toy-b",), help="toy b"))
    register_stage(Stage("toy_c", _work, reads=("synthesis",), cli=("toy-c",), help="toy c"))
    CALLS.clear()
    yield
    for name in TOYS:
        unregister_stage(name)


def _cfg(tmp_path: Path, *overrides: str, tracking: bool = False) -> MedsynthConfig:
    path = tmp_path / "toy.yaml"
    raw = {"name": "toy", "output_dir": str(tmp_path / "out"), "data": {"root": str(tmp_path / "data")}}
    raw["tracking"] = {"enabled": tracking}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_config(path, list(overrides))


def _run_all(cfg: MedsynthConfig) -> dict[str, bool]:
    return {name: run_stage(cfg, name).cached for name in TOYS}


def test_declared_stage_is_cached_by_its_key(toys: None, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert _run_all(cfg) == dict.fromkeys(TOYS, False)
    assert _run_all(cfg) == dict.fromkeys(TOYS, True)
    assert list(TOYS) == CALLS  # each ran once
    again = run_stage(cfg, "toy_a")
    assert again.cached and again.result is not None and again.result.metrics == {"toy_a/value": 1.0}
    (tmp_path / "out" / "toy" / "toy_a" / "stage.json").unlink()  # outputs no longer vouched for
    assert not run_stage(cfg, "toy_a").cached


def test_changing_one_section_reruns_exactly_its_dependents(toys: None, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _run_all(cfg)
    toys_stale = lambda c: [s for s in stale_stages(c) if s in TOYS]  # noqa: E731
    assert toys_stale(cfg) == []
    qc = _cfg(tmp_path, "qc.n_overlays=3")
    assert toys_stale(qc) == ["toy_a", "toy_b"]  # b depends on a
    sampling = _cfg(tmp_path, "sampling.steps=7")
    assert toys_stale(sampling) == ["toy_b"]
    synthesis = _cfg(tmp_path, "synthesis.n_per_mask=3")
    assert toys_stale(synthesis) == ["toy_c"]
    threads = _cfg(tmp_path, "autoencoder.train.num_threads=1")  # run-time only, and not read by the toys
    assert toys_stale(threads) == []
    CALLS.clear()
    assert _run_all(qc) == {"toy_a": False, "toy_b": False, "toy_c": True}
    assert CALLS == ["toy_a", "toy_b"]


def test_bumping_a_code_version_invalidates_downstream(toys: None, tmp_path: Path) -> None:
    from dataclasses import replace

    from medsynth.pipeline import get_stage

    cfg = _cfg(tmp_path)
    _run_all(cfg)
    register_stage(replace(get_stage("toy_a"), version=2))
    assert [s for s in stale_stages(cfg) if s in TOYS] == ["toy_a", "toy_b"]
    CALLS.clear()
    assert _run_all(cfg) == {"toy_a": False, "toy_b": False, "toy_c": True}  # b's key holds a's fingerprint
    assert CALLS == ["toy_a", "toy_b"]


def test_upstream_never_run_is_a_one_line_error(toys: None, tmp_path: Path) -> None:
    from medsynth.errors import MedsynthError

    with pytest.raises(MedsynthError, match="needs the outputs of stage 'toy_a'"):
        run_stage(_cfg(tmp_path), "toy_b")


def test_declared_stage_gets_a_cli_command(toys: None, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from medsynth.cli import _load, _progress_for
    from medsynth.cli_stages import add_stage_commands

    app = typer.Typer()
    add_stage_commands(app, {"train": typer.Typer()}, _load, _progress_for)
    _cfg(tmp_path)
    res = CliRunner().invoke(app, ["toy-b", "-c", str(tmp_path / "toy.yaml")])
    assert res.exit_code == 0, res.output
    assert "toy_a: done" in res.output and "toy_b: done" in res.output and "toy_b/value = 2" in res.output
    res = CliRunner().invoke(app, ["toy-b", "-c", str(tmp_path / "toy.yaml")])
    assert "toy_b: up to date (cached)" in res.output
    assert CALLS == ["toy_a", "toy_b"]


def test_declared_stage_gets_a_prefect_task_and_an_mlflow_run(
    toys: None, prefect_harness: None, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from flows.stage import run_stage_prefect
    from medsynth.tracking.mlflow_store import tracking_uri

    cfg = _cfg(tmp_path, tracking=True)
    cfg_json: dict[str, Any] = cfg.model_dump(mode="json")
    first = run_stage_prefect("toy_a", cfg_json)
    second = run_stage_prefect("toy_a", cfg_json)
    assert not first["cached"] and second["cached"] and CALLS == ["toy_a"]
    client = MlflowClient(tracking_uri(cfg))
    a, b = client.get_run(first["run_id"]), client.get_run(second["run_id"])
    assert a.data.tags["medsynth.stage"] == "toy_a" and a.data.tags["medsynth.cached"] == "false"
    assert b.data.tags["medsynth.cached"] == "true" and b.data.tags["medsynth.computed_by"] == a.info.run_id
    assert b.data.metrics == a.data.metrics == {"toy_a/value": 1.0}
    assert a.data.params and all(k.startswith("qc.") for k in a.data.params)  # its own section only
