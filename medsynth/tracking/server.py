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


AUTH_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def write_auth_config(
    path: str | Path, database_uri: str, admin_username: str = "admin", default_permission: str = "READ"
) -> Path:
    """Write the ini file of MLflow's basic-auth app (``MLFLOW_AUTH_CONFIG_PATH``), readable by its owner only.

    The admin password is never written: MLflow takes it from ``MLFLOW_AUTH_ADMIN_PASSWORD`` when it
    creates the admin on first start against an empty user store.

    Args:
        path: The ini file to write.
        database_uri: Store of users and permissions (may be the tracking database: own tables and
            migration table).
        admin_username: The admin created on first start.
        default_permission: What a logged-in user may do on resources nobody granted them
            (``READ``, ``EDIT``, ``MANAGE`` or ``NO_PERMISSIONS``).
    """
    p = Path(path)
    text = (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin_username}\n"
        f"authorization_function = {AUTH_FUNCTION}\n"
        "grant_default_workspace_access = false\n"
    )
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return p


def team_server_command(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 2,
    allowed_hosts: str | None = None,
) -> list[str]:
    """``mlflow server`` with a database backend, artifacts served through the server, and basic auth.

    Args:
        backend_store_uri: Tracking and registry database, e.g. ``postgresql+psycopg2://mlflow@db:5432/mlflow``.
        artifacts_destination: Local folder (or object-store URI) the server writes artifacts to;
            clients reach it only through the server (``mlflow-artifacts:/``), with their credentials.
        host: Interface to bind; loopback by default (put a TLS reverse proxy in front for a team).
        port: Port.
        workers: Server worker processes.
        allowed_hosts: Comma-separated ``Host`` headers the server accepts (DNS-rebinding guard); None
            keeps MLflow's default (localhost names only).
    """
    art = str(artifacts_destination)
    if "://" not in art:
        Path(art).mkdir(parents=True, exist_ok=True)
        art = str(Path(art).resolve())
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"]
    cmd += ["--backend-store-uri", backend_store_uri, "--serve-artifacts", "--artifacts-destination", art]
    cmd += ["--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def team_server_env(auth_config: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the team server: auth config path, a Flask secret (random unless set), no job runner.

    Raises:
        MedsynthError: ``MLFLOW_AUTH_ADMIN_PASSWORD`` is not set (MLflow needs it to create the admin).
    """
    import secrets

    env = dict(base if base is not None else os.environ)
    if not env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        err = MedsynthError("MLFLOW_AUTH_ADMIN_PASSWORD is not set: the server's admin needs a password")
        err.hint = "export MLFLOW_AUTH_ADMIN_PASSWORD=... (read once, when the user store is empty)"
        raise err
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
    return {**env, **SERVER_ENV}
