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


class NonFiniteLossError(MedsynthError, FloatingPointError):
    """A training loss (or its gradient norm) became NaN/inf: the stage stops before the bad update.

    Checkpoints already on disk were written from finite updates and are kept; a resumed run
    continues from the latest of them.

    Args:
        what: ``loss`` or ``gradient norm``.
        value: The non-finite value.
        step: 0-based optimiser step at which it happened (None when unknown).
        where: The stage's run folder (None when unknown).
    """

    def __init__(self, what: str, value: float, step: int | None = None, where: str | Path | None = None) -> None:
        self.step, self.where = step, where
        at = f" at step {step + 1}" if step is not None else ""
        loc = f"{where}: " if where is not None else ""
        self.hint = "lower train.lr, set train.grad_clip, or check the data; then resume (--resume)"
        super().__init__(
            f"{loc}non-finite {what} ({value}){at}: training stopped before the update; "
            "the last good checkpoint is kept"
        )
