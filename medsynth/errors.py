"""Exception types with messages that name the offending file or key and the problem."""

from __future__ import annotations

from pathlib import Path


class MedsynthError(Exception):
    """Base class of every error medsynth raises on purpose (bad input, bad config)."""

    hint: str = ""


class DataError(MedsynthError, ValueError):
    """A problem with an input file or dataset.

    Args:
        path: The file or folder at fault.
        problem: What is wrong with it, in plain words.
        hint: Optional suggestion shown to the user.
    """

    def __init__(self, path: str | Path, problem: str, hint: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        super().__init__(f"{self.path}: {problem}")


class ConfigError(MedsynthError, ValueError):
    """A problem with a configuration file or command-line override.

    Args:
        source: The config file (or "command line") the bad value came from.
        problem: What is wrong, naming the key.
        hint: Optional suggestion shown to the user.
    """

    def __init__(self, source: str | Path, problem: str, hint: str = "") -> None:
        self.source = str(source)
        self.problem = problem
        self.hint = hint
        super().__init__(f"{self.source}: {problem}")


class OutputExistsError(MedsynthError, FileExistsError):
    """An output location already exists and overwriting was not requested."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.hint = "pass --overwrite to replace it, or choose another output folder"
        super().__init__(f"{self.path}: output already exists")
