"""What produced a result: medsynth version, source commit (and whether it was modified), library versions, config hash.

Every tracked run carries these as tags (``medsynth.version``, ``medsynth.git.*``, ``medsynth.env.*``,
``medsynth.config_hash``) so a number can be traced back to the code and config that made it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import medsynth

UNKNOWN = "unknown"


def source_root() -> Path:
    """The folder holding the ``medsynth`` package (a git work tree for a source checkout)."""
    return Path(medsynth.__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(source_root()), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=1)
def git_state() -> tuple[str, str]:
    """(commit, dirty) of the source checkout medsynth runs from.

    Returns:
        The full commit hash and ``"true"``/``"false"`` (tracked files modified), or ``("unknown",
        "unknown")`` for an installed wheel or a machine without git. Only the package's own work tree
        counts: a wheel installed inside some other repository reports unknown.
    """
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != source_root():
        return UNKNOWN, UNKNOWN
    commit = _git("rev-parse", "HEAD") or UNKNOWN
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = UNKNOWN if status is None else ("true" if status else "false")
    return commit, dirty


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def version_line() -> str:
    """One line for ``medsynth --version``: version, commit (+dirty) and the key library versions."""
    commit, dirty = git_state()
    src = "" if commit == UNKNOWN else f" (git {commit[:12]}{'+dirty' if dirty == 'true' else ''})"
    libs = ", ".join(f"{n} {_dist_version(n)}" for n in ("torch", "monai", "mlflow", "prefect"))
    return f"medsynth {medsynth.__version__}{src}; {libs}"


def config_hash(data: dict[str, Any]) -> str:
    """SHA-256 of a resolved config's JSON (keys sorted): equal configs hash equal, whatever the YAML layout."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def provenance_tags(config: dict[str, Any] | None = None) -> dict[str, str]:
    """Tags naming the code, libraries and (when given) the resolved config of a run."""
    commit, dirty = git_state()
    tags = {
        "medsynth.version": medsynth.__version__,
        "medsynth.git.commit": commit,
        "medsynth.git.dirty": dirty,
        "medsynth.env.torch": _dist_version("torch"),
        "medsynth.env.monai": _dist_version("monai"),
        "medsynth.env.mlflow": _dist_version("mlflow"),
    }
    if config is not None:
        tags["medsynth.config_hash"] = config_hash(config)
    return tags
