"""Formatting shared by the report sections: numbers, durations, run ids and Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medsynth.evaluation.stats import format_value


def num(v: Any, digits: int = 3) -> str:
    """A number for a table (counts logged as floats print as integers; missing: an en dash)."""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1 and digits > 0 and abs(v) < 1e15:
        return str(int(v))  # counts logged as float metrics
    return format_value(v, digits, missing="–")


def duration(seconds: float | None) -> str:
    """Wall time as ``3m05s``."""
    if seconds is None:
        return "–"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run_ref(run_id: str) -> str:
    """A run id as the report cites it (first 8 characters, code-formatted)."""
    return f"`{run_id[:8]}`"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table as lines."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def no_run_line(stage: str) -> str:
    """The n/a line of an optional stage (``<stage>.enabled``) that has no tracked run for a config."""
    return (
        f"n/a: no tracked run of the {stage} stage for this config (`{stage}.enabled: true` adds it to `medsynth run`)."
    )
