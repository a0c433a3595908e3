"""MLflow servers started by medsynth: the local UI (``medsynth ui``) and the team server (``medsynth server``).

Both run ``mlflow server`` as a child process in its own process group and forward SIGINT/SIGTERM to
that group, then wait for it (killing it if it does not stop within ``grace_s``), so stopping medsynth
never leaves a server or worker bound to the port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from urllib.parse import unquote

from medsynth.config.schema import MedsynthConfig
from medsynth.errors import MedsynthError

SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: 2 processes instead of ~15


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri.removeprefix("sqlite:///").split("?", 1)[0]))


def run_forwarding(cmd: Sequence[str], env: Mapping[str, str] | None = None, grace_s: float = 20.0) -> int:
    """Run ``cmd`` in its own process group; SIGINT/SIGTERM to this process are forwarded to the group.

    Args:
        cmd: The server command line.
        env: Its environment (default: this process's).
        grace_s: After a forwarded signal, how long to wait before killing the group.

    Returns:
        The child's exit status (0 when it stopped on a forwarded signal).
    """
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, start_new_session=True)
    stopping: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=grace_s if stopping else None)
                break
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # workers that outlived their parent
            os.killpg(proc.pid, signal.SIGKILL)
    return 0 if stopping else rc


def ui_command(cfg: MedsynthConfig, port: int, host: str = "127.0.0.1") -> list[str]:
    """The ``mlflow server`` command serving a config's local store.

    Raises:
        MedsynthError: The config tracks to a server already, or its store does not exist (the message
            says where it looked).
    """
    from medsynth.tracking.mlflow_store import artifact_location, tracking_uri

    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        uri = f"sqlite:///{(Path(cfg.output_dir) / 'mlflow.db').resolve()}"
    db = sqlite_file(uri)
    if db is None:
        raise MedsynthError(f"{uri}: tracking points at a server already; open it in a browser")
    if not db.is_file():
        err = MedsynthError(f"no MLflow store at {db} (config {cfg.name!r}, output_dir {cfg.output_dir!r})")
        err.hint = "run the pipeline first, run from the folder it ran in, or pass its config"
        raise err
    uri = tracking_uri(cfg)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    art = artifact_location(cfg)
    if art:
        cmd += ["--default-artifact-root", art]
    return cmd
