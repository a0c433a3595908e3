"""Helpers shared by the Prefect flows: config loading and cache keys (thin; no science here)."""

from __future__ import annotations

from typing import Any

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.fileio import sha256_json


def config_from_json(cfg_json: dict[str, Any]) -> MedsynthConfig:
    """Rebuild the frozen config from the JSON dict passed between tasks."""
    return validate_config(cfg_json, "flow parameter", MedsynthConfig)


def key_of(*parts: Any) -> str:
    """A stable cache key from JSON-compatible parts."""
    return sha256_json(list(parts))
