"""Load a YAML config, apply dotted command-line overrides, validate, and save the resolved config."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from medsynth.config.schema import MedsynthConfig
from medsynth.errors import ConfigError
from medsynth.fileio import write_json_atomic, write_text_atomic

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
M = TypeVar("M", bound=BaseModel)

RESOLVED_YAML = "config.resolved.yaml"
RESOLVED_JSON = "config.resolved.json"


def expand_env(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` from the environment; an unset VAR without default is an error."""

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError("environment", f"variable ${{{name}}} is not set and has no default")

    return _ENV.sub(repl, text)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value); the value is read as YAML."""
    if "=" not in item:
        raise ConfigError("command line", f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError("command line", f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError("command line", f"override {item!r}: value is not valid YAML ({exc})") from exc
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with every dotted override set (intermediate dicts created)."""
    out: dict[str, Any] = dict(_deepcopy(raw))
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return out


def _deepcopy(obj: Any) -> Any:  # plain-data copy (YAML values only)
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


def format_validation_error(exc: ValidationError, source: str) -> ConfigError:
    """Turn a pydantic error into one :class:`ConfigError` naming each bad key and the file."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            lines.append(f"key '{key}': {err['msg']} (got {err.get('input')!r})")
    return ConfigError(source, "; ".join(lines), hint="see docs/configuration.md for every key and its type")


def validate_config(raw: dict[str, Any], source: str, model: type[M]) -> M:
    """Validate a raw mapping against ``model``, raising :class:`ConfigError` on failure."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise format_validation_error(exc, source) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with environment expansion; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, "config file does not exist", hint="configs/ holds the shipped configs")
    try:
        data = yaml.safe_load(expand_env(p.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        raise ConfigError(p, f"not valid YAML ({exc})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(p, "top level must be a mapping of sections")
    data = dict(data)
    base = data.pop("extends", None)
    if base is not None:  # a config may extend another one (path relative to itself)
        parent = read_yaml((p.parent / str(base)).resolve())
        data = _merge(parent, data)
    out: dict[str, Any] = data
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(_deepcopy(base))
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> MedsynthConfig:
    """Load and validate a medsynth config.

    Args:
        path: YAML file (may ``extends:`` another YAML file).
        overrides: Dotted ``key=value`` strings applied after the file, e.g.
            ``["preprocess.spacing=[1,1,1]"]``. Values are parsed as YAML.

    Returns:
        The frozen, validated :class:`MedsynthConfig`.

    Raises:
        ConfigError: Naming the file (or "command line") and each bad key.
    """
    raw = apply_overrides(read_yaml(path), overrides)
    source = f"{path}" + (f" (with overrides {list(overrides)})" if overrides else "")
    return validate_config(raw, source, MedsynthConfig)


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """The JSON-compatible dict of a config (what is saved and hashed)."""
    return cfg.model_dump(mode="json")


def save_resolved(cfg: BaseModel, out_dir: str | Path) -> Path:
    """Write the resolved config as YAML and JSON into ``out_dir`` (atomically); returns the YAML path."""
    d = Path(out_dir)
    data = config_dict(cfg)
    write_json_atomic(d / RESOLVED_JSON, data)
    return write_text_atomic(d / RESOLVED_YAML, yaml.safe_dump(data, sort_keys=False))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (for tracking params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
