"""Input keys and stamps: the one "already up to date?" rule for every stage.

A stage's key hashes its code version, the config sections it reads (without run-time-only fields),
the content digest of its external inputs, and the *fingerprint* of each upstream stage (that
stage's key and output digest). So a changed section re-runs exactly that stage and its
dependents, and a bumped version invalidates everything downstream. A finished stage writes
``stage.json`` (its stamp: key, output digest, typed result, the MLflow run that computed it) into
its folder; it is up to date when the stamp's key equals the current key and its outputs still
have the recorded digest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from medsynth.config.schema import MedsynthConfig
from medsynth.config.training import RUNTIME_FIELDS
from medsynth.fileio import sha256_json, write_json_atomic
from medsynth.pipeline.declare import Stage

STAMP = "stage.json"

RUNTIME_ONLY = tuple(RUNTIME_FIELDS)
"""Fields that change how fast a stage runs, not what it produces: left out of input keys."""


class Stamp(BaseModel):
    """What a finished stage records beside its outputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    version: int
    key: str
    digest: str
    result: dict[str, Any]
    computed_by: str | None = None
    model_uri: str | None = None
    finished: str = ""

    @property
    def fingerprint(self) -> str:
        """What downstream keys hash of this stage: its key and its output digest."""
        return sha256_json([self.key, self.digest])


def _strip_runtime(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _strip_runtime(v) for k, v in data.items() if k not in RUNTIME_ONLY}
    return data


def section(cfg: MedsynthConfig, dotted: str) -> Any:
    """A config section (dotted path) as JSON data, without run-time-only fields."""
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    return _strip_runtime(data)


def sections(cfg: MedsynthConfig, stage: Stage) -> dict[str, Any]:
    """Every section a stage reads, by dotted name, without the fields the stage ``ignores``."""
    out = {name: section(cfg, name) for name in sorted(stage.reads)}
    for dotted in stage.ignores:
        head, _, field = dotted.rpartition(".")
        if isinstance(out.get(head), dict):
            out[head].pop(field, None)
    return out


def stamp_path(root: Path, stage: Stage) -> Path:
    """Where a stage's stamp lives."""
    return root / stage.folder_name / STAMP


def read_stamp(root: Path, stage: Stage) -> Stamp | None:
    """The stage's stamp, or None when it never finished (or the stamp is unreadable)."""
    path = stamp_path(root, stage)
    if not path.is_file():
        return None
    try:
        return Stamp.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def write_stamp(root: Path, stage: Stage, stamp: Stamp) -> Path:
    """Write the stamp atomically (the last file a stage writes)."""
    return write_json_atomic(stamp_path(root, stage), stamp.model_dump(mode="json"))


def clear_stamp(root: Path, stage: Stage) -> None:
    """Forget that a stage finished (before it re-runs, so a kill never leaves a stale stamp)."""
    stamp_path(root, stage).unlink(missing_ok=True)


def compute_key(cfg: MedsynthConfig, stage: Stage, upstream: dict[str, str]) -> str:
    """A stage's input key.

    Args:
        cfg: Resolved config.
        stage: The declaration.
        upstream: Fingerprint of each upstream stage (``"off"`` for a disabled one).

    Returns:
        Hex SHA-256.
    """
    return sha256_json(
        {
            "stage": stage.name,
            "version": stage.version,
            "sections": sections(cfg, stage),
            "inputs": stage.inputs(cfg) if stage.inputs else None,
            "upstream": {k: upstream[k] for k in sorted(upstream)},
        }
    )


def now_iso() -> str:
    """UTC timestamp for stamps."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def result_digest(result: dict[str, Any]) -> str:
    """Digest of a result (the default output digest)."""
    return sha256_json(json.loads(json.dumps(result, default=str)))
