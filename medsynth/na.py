"""Small data: the one phrasing of a measurement that had too few items to be computed."""

from __future__ import annotations


def needs(n: int, what: str, have: int | None = None) -> str:
    """The report text of a measurement that had too few items: ``"n/a (needs >= 2 patients, has 1)"``."""
    got = "" if have is None else f", has {have}"
    return f"n/a (needs >= {n} {what}{got})"
