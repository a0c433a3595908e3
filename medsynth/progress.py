"""Progress reporting for long loops: a rich bar in a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Protocol

log = logging.getLogger("medsynth.progress")


class Progress(Protocol):
    """What long-running library functions call to report progress."""

    def advance(self, n: int = 1, info: str = "") -> None:
        """Record ``n`` more units done; ``info`` is a short status (e.g. a loss)."""


class NullProgress:
    """A progress sink that ignores everything (the default of library functions)."""

    def advance(self, n: int = 1, info: str = "") -> None:
        """Ignore progress."""


class LogProgress:
    """Plain periodic log lines with rate and ETA (for CI, files and non-terminals).

    Args:
        total: Units of work expected; 0 when unknown (a stage that learns its size while running): lines then
            show the count and rate without a total or ETA, as they do once the count passes the total.
        desc: What is being done.
        every_s: Minimum seconds between lines.
    """

    def __init__(self, total: int, desc: str, every_s: float = 10.0) -> None:
        self.total, self.desc, self.every_s = max(total, 0), desc, every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1, info: str = "") -> None:
        """Add ``n`` units and print a line if ``every_s`` passed or the work is complete."""
        self.done += n
        now = time.monotonic()
        known = self.done <= self.total
        if now - self.last >= self.every_s or (known and self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            if not known:
                log.info("%s: %d done (%.1f/s) %s", self.desc, self.done, rate, info)
                return
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d (%.1f/s, ETA %.0fs) %s", self.desc, self.done, self.total, rate, eta, info)


class BarProgress:
    """A rich progress bar with elapsed time and ETA; use as a context manager."""

    def __init__(self, total: int, desc: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        self._task = self._bar.add_task(desc, total=total if total > 0 else None, info="")  # None: indeterminate

    def __enter__(self) -> BarProgress:
        self._bar.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._bar.stop()

    def advance(self, n: int = 1, info: str = "") -> None:
        """Advance the bar by ``n`` and show ``info``."""
        self._bar.update(self._task, advance=n, info=info)


class _LogContext(LogProgress):
    def __enter__(self) -> _LogContext:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        return None


def progress_for(total: int, desc: str) -> BarProgress | _LogContext:
    """A context-managed progress reporter: a bar on an interactive terminal, log lines otherwise."""
    if sys.stderr.isatty():
        return BarProgress(total, desc)
    return _LogContext(total, desc)
