"""One writer per output folder, and recovery of what a killed run left behind.

:func:`config_run` wraps every command that writes a config's outputs (``<output_dir>/<name>/``):

- it takes an exclusive lock on ``<output_dir>/<name>/.medsynth.lock`` (``filelock``: an OS lock that
  dies with its process, so a killed run never leaves a stale lock). A second run of the same config
  fails at once with :class:`OutputLockedError`, naming the holder's PID, host, start time and command
  (kept in ``.medsynth.lock.json``). Within one process the lock is re-entrant (the CLI and the
  Prefect flow it calls may both take it).
- on first acquisition it removes the leftovers of killed runs in that folder (preprocessing
  ``.staging-*`` folders, ``.*.partial`` staging folders and files: nothing else can be writing them
  now) and marks the config's MLflow runs still RUNNING as KILLED (runs tagged with this output folder).

The lock is an ``flock``/``LockFileEx`` lock: reliable on local disks; on network file systems use
one output folder per machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from medsynth.config.schema import MedsynthConfig
from medsynth.errors import MedsynthError

log = logging.getLogger(__name__)

LOCK_FILE = ".medsynth.lock"
HOLDER_FILE = ".medsynth.lock.json"
_HELD: dict[Path, tuple[FileLock, int]] = {}
_GUARD = threading.Lock()


class OutputLockedError(MedsynthError):
    """Another process is writing the same output folder."""

    def __init__(self, folder: Path, holder: dict[str, Any]) -> None:
        self.folder, self.holder = folder, holder
        who = f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        since = f" since {holder['started']}" if holder.get("started") else ""
        cmd = f" ({holder['command']})" if holder.get("command") else ""
        self.hint = "wait for it to finish, stop it, or use another output_dir / name"
        super().__init__(f"{folder}: in use by {who}{since}{cmd}")


def holder_info() -> dict[str, Any]:
    """Who this process is: PID, host, start time (UTC) and command line."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
    }


def _read_holder(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / HOLDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def output_lock(folder: str | Path) -> Iterator[bool]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the block.

    Yields:
        True for the outermost acquisition in this process, False for a nested (re-entrant) one.

    Raises:
        OutputLockedError: Another process holds it (raised at once, naming the holder).
    """
    d = Path(folder).resolve()
    d.mkdir(parents=True, exist_ok=True)
    with _GUARD:
        held = _HELD.get(d)
        if held is not None:
            _HELD[d] = (held[0], held[1] + 1)
            first = False
        else:
            lock = FileLock(str(d / LOCK_FILE), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise OutputLockedError(d, _read_holder(d)) from None
            tmp = d / f"{HOLDER_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps(holder_info()), encoding="utf-8")
            tmp.replace(d / HOLDER_FILE)
            _HELD[d] = (lock, 1)
            first = True
    try:
        yield first
    finally:
        with _GUARD:
            lock, count = _HELD[d]
            if count > 1:
                _HELD[d] = (lock, count - 1)
            else:
                del _HELD[d]
                (d / HOLDER_FILE).unlink(missing_ok=True)
                lock.release()


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Remove what killed runs left in ``folder``: ``.staging-*`` folders and ``.*.partial`` folders/files.

    Call it only while holding :func:`output_lock` of ``folder``.

    Returns:
        The removed paths.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    found = sorted(
        {p for pat in (".staging-*", ".*.partial", "*.partial") for p in root.rglob(pat)}, key=lambda p: len(p.parts)
    )
    removed: list[Path] = []
    for p in found:
        if any(p.is_relative_to(r) for r in removed) or not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.warning(
            "removed %d leftovers of an interrupted run in %s: %s", len(removed), root, [str(p) for p in removed]
        )
    return removed


def output_root(cfg: MedsynthConfig) -> Path:
    """The folder a config's runs write: ``<output_dir>/<name>`` (absolute)."""
    return (Path(cfg.output_dir) / cfg.name).resolve()


@contextmanager
def config_run(cfg: MedsynthConfig) -> Iterator[None]:
    """Run a block as the only writer of the config's outputs, after recovering from a killed run.

    Raises:
        OutputLockedError: Another process runs the same config (same ``output_dir`` and ``name``).
    """
    root = output_root(cfg)
    with output_lock(root) as first:
        if first:
            clean_leftovers(root)
            if cfg.tracking.enabled:
                from medsynth.tracking.mlflow_store import mark_interrupted_runs

                try:
                    n = mark_interrupted_runs(cfg)
                except Exception as exc:  # a store that cannot be reached must not block the run
                    log.warning("could not check for interrupted MLflow runs: %s", exc)
                else:
                    if n:
                        log.warning("marked %d MLflow runs of an interrupted execution as KILLED", n)
        yield
