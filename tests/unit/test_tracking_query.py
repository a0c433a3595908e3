"""Reports find their runs: the latest pipeline, or stages run one at a time when there is no pipeline run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from medsynth.errors import DataError
from medsynth.tracking.query import load_pipeline


def _run(client: object, exp: str, stage: str, **tags: str) -> str:
    from mlflow import MlflowClient

    assert isinstance(client, MlflowClient)
    run = client.create_run(exp, tags={"medsynth.stage": stage, **tags}, run_name=stage)
    client.set_terminated(run.info.run_id, "FINISHED")
    time.sleep(0.01)  # distinct start times
    return str(run.info.run_id)


def test_stage_runs_without_a_pipeline_are_reported_latest_first(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("solo", artifact_location=(tmp_path / "art").as_uri())
    with pytest.raises(DataError, match="no finished pipeline run and no finished stage run"):
        load_pipeline(uri, "solo")
    _run(client, exp, "autoencoder")  # superseded by the later autoencoder run
    ae = _run(client, exp, "autoencoder")
    cached = _run(client, exp, "preprocess", **{"medsynth.cached": "true", "medsynth.computed_by": ae})
    adapt = _run(client, exp, "adaptation")
    child = client.create_run(exp, tags={"medsynth.stage": "unet", "mlflow.parentRunId": adapt})
    client.set_terminated(child.info.run_id, "FINISHED")  # nested: not a stage run of its own
    rec = load_pipeline(uri, "solo")
    assert rec.stage_only and rec.parent.run_id == adapt
    assert {k: v.run_id for k, v in rec.stages.items()} == {"autoencoder": ae, "preprocess": ae, "adaptation": adapt}
    assert cached not in {v.run_id for v in rec.stages.values()}  # the cached run points at the one that computed
    pipe = _run(client, exp, "pipeline")
    assert not load_pipeline(uri, "solo").stage_only and load_pipeline(uri, "solo").parent.run_id == pipe
