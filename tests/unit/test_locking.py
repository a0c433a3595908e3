"""One writer per output folder; a killed run's leftovers and RUNNING MLflow runs are cleaned at the next start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medsynth.config import load_config
from medsynth.locking import OutputLockedError, config_run, output_lock

ROOT = Path(__file__).resolve().parents[2]

HOLD = """
import sys, time
from medsynth.config import load_config
from medsynth.locking import config_run
from medsynth.tracking.mlflow_store import MlflowSession
cfg = load_config(sys.argv[1])
with config_run(cfg):
    MlflowSession(cfg).start_run("stage-that-gets-killed")  # left RUNNING
    root = cfg.output_dir + "/" + cfg.name
    import pathlib
    pathlib.Path(root, "preprocess", ".staging-123").mkdir(parents=True)
    pathlib.Path(root, "preprocess", ".staging-123", "case.npz").write_bytes(b"half")
    pathlib.Path(root, ".synthetic.abcd.partial").mkdir()
    pathlib.Path(root, "keep.json").write_text("{}")
    print("ready", flush=True)
    time.sleep(600)
"""


def _config(tmp_path: Path) -> Path:
    cfg = {
        "name": "locked",
        "output_dir": str(tmp_path / "out"),
        "data": {"root": str(tmp_path / "data"), "labels": {0: "background", 1: "a"}},
        "preprocess": {"spatial_dims": 2, "spatial_size": [16, 16]},
    }
    path = tmp_path / "locked.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _hold(cfg_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(cfg_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def test_second_run_fails_fast_naming_the_holder_then_recovers_after_a_kill(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.tracking.mlflow_store import tracking_uri

    cfg_path = _config(tmp_path)
    cfg = load_config(cfg_path)
    proc = _hold(cfg_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError) as err, config_run(cfg):
            pass
        assert time.monotonic() - t0 < 5
        assert f"PID {proc.pid} on host {socket.gethostname()}" in str(err.value)
        for cmd in (["train", "autoencoder", "-c"], ["run"], ["synthesize", "--out", str(tmp_path / "s"), "-c"]):
            res = CliRunner().invoke(app, [*cmd, str(cfg_path)])  # every writing command, before any work
            assert isinstance(res.exception, OutputLockedError) and f"PID {proc.pid}" in str(res.exception), cmd
        assert time.monotonic() - t0 < 30
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    root = Path(cfg.output_dir) / cfg.name
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name("locked")
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["RUNNING"]
    assert (root / "preprocess" / ".staging-123").is_dir()
    with config_run(cfg):  # the killed holder's lock died with it
        assert not (root / "preprocess" / ".staging-123").exists()
        assert not (root / ".synthetic.abcd.partial").exists()
        assert (root / "keep.json").is_file()
        runs = client.search_runs([exp.experiment_id])
        assert [r.info.status for r in runs] == ["KILLED"]


def test_lock_is_reentrant_in_one_process_and_released(tmp_path: Path) -> None:
    with output_lock(tmp_path / "o") as first:
        assert first
        with output_lock(tmp_path / "o") as nested:
            assert not nested
        assert (tmp_path / "o" / ".medsynth.lock.json").is_file()
    assert not (tmp_path / "o" / ".medsynth.lock.json").exists()
    with output_lock(tmp_path / "o") as again:
        assert again
