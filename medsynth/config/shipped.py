"""The configs shipped with medsynth (package data) and how a ``--config`` argument finds them.

The repository's ``configs/`` folder is installed as ``medsynth/configs`` (package data), so a
non-editable install has the demo and the dataset configs too. A config argument is a path; when no
such file exists and it is a bare name (``demo``, ``lgg-2d.yaml``), the shipped config of that name is used.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from medsynth.errors import ConfigError

DEMO = "demo"


def shipped_dir() -> Path:
    """The folder of the shipped configs inside the installed package."""
    return Path(str(resources.files("medsynth") / "configs"))


def shipped_names() -> list[str]:
    """Names (without ``.yaml``) of the shipped configs."""
    d = shipped_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def resolve_config(arg: str | Path | None) -> Path:
    """The config file for a command-line argument.

    Args:
        arg: A path to a YAML file, a bare shipped name (``demo``, ``lgg-2d``, ``lgg-2d.yaml``), or None
            for the demo.

    Returns:
        An existing file: ``arg`` itself when it exists, else the shipped config of that name.

    Raises:
        ConfigError: Neither a file nor a shipped name; the message lists the shipped names.
    """
    p = Path(arg) if arg is not None else Path(DEMO)
    if p.is_file():
        return p
    if arg is None or len(p.parts) == 1:
        name = p.name.removesuffix(".yaml").removesuffix(".yml")
        cand = shipped_dir() / f"{name}.yaml"
        if cand.is_file():
            return cand
    raise ConfigError(
        p, "config file does not exist", hint=f"shipped configs (usable by name): {', '.join(shipped_names())}"
    )
