"""``medsynth ui``: SIGTERM/SIGINT reach its MLflow server (nothing left on the port); no store -> where it looked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path) -> Path:
    cfg = {
        "name": "uitest",
        "output_dir": str(tmp_path / "out"),
        "data": {"root": str(tmp_path / "data"), "labels": {0: "background", 1: "a"}},
        "preprocess": {"spatial_dims": 2, "spatial_size": [16, 16]},
    }
    path = tmp_path / "ui.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the server's processes")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_forwards_signals_to_its_server(tmp_path: Path, sig: signal.Signals) -> None:
    from medsynth.config import load_config
    from medsynth.tracking.mlflow_store import MlflowSession

    cfg_path = _config(tmp_path)
    MlflowSession(load_config(cfg_path)).start_run("a run")  # the store exists
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medsynth.cli", "ui", str(cfg_path), "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the UI did not come up"
            time.sleep(0.5)
        server = _descendants(proc.pid)
        assert server
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    assert not [p for p in server if _alive(p)]  # no server or worker left
    with socket.socket() as s:
        # SO_REUSEADDR: connections the server closed may sit in TIME_WAIT; a LISTENING socket still fails bind
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # the port is free again: no server left listening


def test_ui_without_a_store_says_where_it_looked(tmp_path: Path) -> None:
    cfg_path = _config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(
        [sys.executable, "-m", "medsynth.cli", "ui", str(cfg_path)],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert f"no MLflow store at {tmp_path / 'out' / 'mlflow.db'}" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing created
