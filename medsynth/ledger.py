"""Item-level resume: an append-only ledger of finished items under one input key.

Every stage that produces many independent items (synthetic images, pool variants, grid cells)
records each finished item here as it completes. After a kill, a re-run with the same key reads the
ledger and skips what is already done; a different key (changed inputs) ignores old lines. Lines are
appended with flush + fsync, and a line cut short by a kill is ignored, so the ledger never lies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def _default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


class ItemLedger:
    """Finished items of one stage run, keyed by the stage's input key.

    Args:
        path: The ledger file (JSON lines), e.g. ``<stage dir>/items.jsonl``.
        key: The input key the items were produced under; lines with another key are ignored.
    """

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = key

    def done(self) -> dict[str, dict[str, Any]]:
        """Records of the items finished under this key, by item id (the last record of an id wins)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return out
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            if isinstance(rec, dict) and rec.get("key") == self.key and "item" in rec:
                out[str(rec["item"])] = rec.get("record", {})
        return out

    def todo(self, item_ids: Iterable[str]) -> list[str]:
        """The ids of ``item_ids`` not yet finished under this key (input order kept)."""
        done = self.done()
        return [i for i in item_ids if i not in done]

    def record(self, item_id: str, record: dict[str, Any] | None = None) -> None:
        """Append one finished item (durable before it returns)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = False
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as fh:  # only the last byte: appends stay O(1) on long ledgers
                fh.seek(-1, os.SEEK_END)
                needs_newline = fh.read(1) != b"\n"
        line = json.dumps({"key": self.key, "item": item_id, "record": record or {}}, default=_default)
        with open(self.path, "a", encoding="utf-8") as fh:
            if needs_newline:
                fh.write("\n")
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def reset(self) -> None:
        """Forget every item (a run that starts over)."""
        self.path.unlink(missing_ok=True)
