"""Typed configuration: pydantic models (frozen, unknown keys rejected) loaded from YAML."""

from medsynth.config.loader import load_config, save_resolved
from medsynth.config.schema import MedsynthConfig

__all__ = ["MedsynthConfig", "load_config", "save_resolved"]
